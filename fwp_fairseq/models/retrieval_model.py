"""The one-layer attention model of the associative-retrieval experiment (paper section 6.1).

Each step t writes key token k_t with value token v_t. The value is its one-hot vector in R^S,
written as is (the memory must store it, not a learned code of it). The fast-weight key comes
from both: K_t = W_k [onehot(v_t); E(k_t)], so that, as in the paper's code, keys see values.
The query reads with Q = W_q E(query), E the same learned key embedding; the read-out v_hat
(B, Q, S) is compared to the one-hot answer by half_mse.

Kernels: softmax (the reference), or a positive phi (linear, dpfp, performer) with the sum rule
(W = sum_t v_t phi(K_t)^T, read normalised by z = sum_t phi(K_t)) or the delta rule
(sum-normalised phi, beta_t = sigmoid(w_beta . x_t), no attention normaliser).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model

from fwp_fairseq.modules.feature_maps import FEATURE_MAPS, FavorFeatureMap, build_feature_map, sum_normalize
from fwp_fairseq.ops import UPDATES, fast_weight_delta, fast_weight_read, fast_weight_state

# The reads are normalised (by z . phi(q), or sum-normalised phi): positive feature maps only.
RETRIEVAL_KERNELS = ChoiceEnum(["softmax"] + [name for name, fmap in FEATURE_MAPS.items() if not fmap.signed])
SUM_FORMS = ChoiceEnum(["auto", "fast_weight", "attention"])


@dataclass
class RetrievalModelConfig(FairseqDataclass):
    fwp_kernel: RETRIEVAL_KERNELS = field(
        default="linear", metadata={"help": "softmax attention, or the feature map phi of fast weights"})
    fwp_update: ChoiceEnum(UPDATES) = field(
        default="sum", metadata={"help": "fast weight update rule (ignored by softmax)"})
    fwp_dpfp_nu: int = field(default=1, metadata={"help": "DPFP order nu (d_dot = 2 * key_dim * nu)"})
    fwp_performer_features: int = field(default=64, metadata={"help": "FAVOR+ random features m (d_dot = 2m)"})
    fwp_performer_seed: int = field(default=1, metadata={"help": "seed of the FAVOR+ projections"})
    key_dim: int = field(default=64, metadata={"help": "d_key: the dimension phi is applied to"})
    key_embed_dim: int = field(default=0, metadata={
        "help": "key token embedding size (0: int(2.2 S), as the paper's code sizes it)"})
    sum_form: SUM_FORMS = field(default="auto", metadata={
        "help": "sum rule read: fast_weight (build W, then read), attention (the exact dual) or auto (cheaper)"})
    eps: float = field(default=1e-6, metadata={"help": "keeps normalisers away from zero"})


@register_model("fwp_retrieval", dataclass=RetrievalModelConfig)
class RetrievalModel(BaseFairseqModel):
    def __init__(self, cfg, num_values, key_vocab_size):
        super().__init__()
        self.update = cfg.fwp_update
        self.num_values = num_values
        self.eps = cfg.eps
        self.sum_form = cfg.sum_form
        embed_dim = cfg.key_embed_dim or int(2.2 * num_values)
        d = cfg.key_dim
        self.embed_keys = nn.Embedding(key_vocab_size, embed_dim)
        self.key_proj = nn.Linear(num_values + embed_dim, d)
        self.query_proj = nn.Linear(embed_dim, d)
        fast = cfg.fwp_kernel != "softmax"
        # beta_t = sigmoid(w_beta . x_t): one scalar per step, no bias (arXiv 2102.11174, section 4.2).
        uses_beta = fast and self.update == "delta"
        self.beta_proj = nn.Linear(num_values + embed_dim, 1, bias=False) if uses_beta else None
        self.feature_map = None  # softmax attention
        if fast:
            self.feature_map = build_feature_map(str(cfg.fwp_kernel), d, cfg.fwp_dpfp_nu,
                                                 cfg.fwp_performer_features, cfg.fwp_performer_seed)
        # Unit-variance embeddings and U(+-1/sqrt(d)) projections keep K, Q at O(1) for every S.
        nn.init.normal_(self.embed_keys.weight, 0.0, 1.0)
        for lin in (self.key_proj, self.query_proj):
            nn.init.uniform_(lin.weight, -1 / math.sqrt(d), 1 / math.sqrt(d))

    @classmethod
    def build_model(cls, cfg, task):
        return cls(cfg, task.num_values, task.key_vocab_size)

    @property
    def d_dot(self):
        return None if self.feature_map is None else self.feature_map.out_dim

    def set_num_updates(self, num_updates):
        """FAVOR+ draws new projections every training update (fairseq calls this after each)."""
        super().set_num_updates(num_updates)
        if isinstance(self.feature_map, FavorFeatureMap) and self.training:
            self.feature_map.redraw(num_updates)

    def _phi(self, x):
        f = self.feature_map(x)
        # FAVOR+ features are only defined up to a per-vector factor, so they are always
        # normalised; the delta rule needs sum normalisation for every phi (it diverges without).
        if self.feature_map.needs_normalisation or self.update == "delta":
            f = sum_normalize(f, self.eps)
        return f

    @staticmethod
    def _gather_linear(lin, embed, values, keys, num_values):
        """lin([onehot(values); embed(keys)]) without building that (B, T, S + E) input: the
        one-hot part of the product is a row lookup, and embedding-then-project is a lookup in
        the projected table. Same function and gradients, ~S times less work."""
        w_val, w_key = lin.weight[:, :num_values], lin.weight[:, num_values:]
        out = F.embedding(values, w_val.t()) + F.embedding(keys, embed.weight @ w_key.t())
        return out if lin.bias is None else out + lin.bias

    def forward(self, keys, values, queries):
        """keys, values: (B, T) token ids; queries: (B, Q) key ids -> v_hat (B, Q, S)."""
        S = self.num_values
        k = self._gather_linear(self.key_proj, self.embed_keys, values, keys, S)   # (B, T, d)
        q = F.embedding(queries, self.embed_keys.weight @ self.query_proj.weight.t()) + self.query_proj.bias
        if self.feature_map is None:
            attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(k.shape[-1]), dim=-1)
            return self._weighted_values(attn, values)
        pk, pq = self._phi(k), self._phi(q)
        if self.update == "sum":
            return self._sum_read(pk, pq, values)
        v = F.one_hot(values, S).to(k.dtype)
        beta = torch.sigmoid(self._gather_linear(self.beta_proj, self.embed_keys, values, keys, S))
        # One head: the ops take (B, H, T, D). Only the final memory is needed (queries come last).
        _, state = fast_weight_delta(pk[:, None], pk[:, None], v[:, None], beta.transpose(1, 2),
                                     output_final_state=True)
        return fast_weight_read(pq[:, None], state)[:, 0]

    def _weighted_values(self, weights, values):
        """weights (B, Q, T) @ onehot(values) (B, T, S), as a scatter-add: O(QT), not O(QTS)."""
        B, Q, T = weights.shape
        out = weights.new_zeros(B, Q, self.num_values)
        return out.scatter_add(2, values[:, None, :].expand(B, Q, T), weights)

    def _sum_read(self, pk, pq, values):
        """y = W phi(q) / (z . phi(q)) after all writes, W = sum_t v_t phi(k_t)^T, z = sum_t phi(k_t).

        Two exact forms: the fast-weight one (build W, then read: (T + Q) (S + 1) d_dot work) and
        its dual, attention without softmax (scores phi(k_t) . phi(q), then a weighted sum of the
        one-hot values: Q T d_dot work). With few queries per sequence the dual is far
        cheaper, which is what lets the demo run on a CPU; 'auto' picks the cheaper one."""
        T, Q, S = pk.shape[1], pq.shape[1], self.num_values
        form = self.sum_form
        if form == "auto":
            form = "attention" if Q * T < (T + Q) * (S + 1) else "fast_weight"
        if form == "attention":
            scores = pq @ pk.transpose(1, 2)  # (B, Q, T)
            return self._weighted_values(scores, values) / (scores.sum(-1, keepdim=True) + self.eps)
        # A ones column in v gives the normaliser z . phi(q) in the same read.
        v = F.one_hot(values, S).to(pk.dtype)
        ones = torch.ones_like(v[..., :1])
        state = fast_weight_state(pk[:, None], torch.cat([v, ones], dim=-1)[:, None])
        read = fast_weight_read(pq[:, None], state)[:, 0]
        return read[..., :-1] / (read[..., -1:] + self.eps)
