"""FastWeightAttention: a drop-in for fairseq's MultiheadAttention (same forward signature,
T x B x C in and out, returns (output, None)) that attends through fast weights.

Three uses (../shared/PAPER.md sections 1-2):
- causal self-attention (decoder): sum or delta rule, W carried step to step;
- non-causal self-attention (encoder) and encoder-decoder attention: all (unpadded) keys are
  written with the sum rule, then every query reads. The update rule does not apply here.

There is no attention matrix, so attention dropout, attn_mask (causality is structural) and
need_weights do not apply; the returned weights are always None.

Incremental decoding keeps a constant-size state per layer in fairseq's incremental state:
"fw_state" S (B, H, d_dot, Dv) and, with the attention normaliser, "fw_z" (B, H, d_dot).
Encoder-decoder attention builds its state once from the encoder output and reuses it.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

from fairseq.incremental_decoding_utils import with_incremental_state

from ..ops import fast_weight_delta, fast_weight_read, fast_weight_state, fast_weight_sum
from .feature_maps import FavorFeatureMap, build_feature_map, l2_normalize, sum_normalize

KERNELS = ("linear", "performer", "dpfp", "identity")


def _acc(x):
    """Normalisers accumulate in fp32 (fp64 for fp64 inputs), like the fast-weight state."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _core_dtype(dtype):
    """dtype of phi(q), phi(k) and v entering the recurrence (the ops keep the state in fp32
    whatever it is): fp16 lacks the range for unnormalised features and for outputs that grow
    with T, so it runs in fp32; bf16 has fp32's range and stays bf16."""
    return torch.float32 if dtype == torch.float16 else dtype


UPDATES = ("sum", "delta")


@with_incremental_state
class FastWeightAttention(nn.Module):
    def __init__(self, embed_dim, num_heads, kdim=None, vdim=None, self_attention=False,
                 encoder_decoder_attention=False, causal=False, kernel="linear", update="sum",
                 dpfp_nu=1, performer_features=16, attn_normalize=None, sum_normalize=None,
                 seed=1, impl="auto", eps=1e-5, l2_normalize=False):
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim: {embed_dim} must be divisible by num_heads ({num_heads})")
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
        if update not in UPDATES:
            raise ValueError(f"update: expected one of {UPDATES}, got {update!r}")
        if self_attention == encoder_decoder_attention:
            raise ValueError("exactly one of self_attention and encoder_decoder_attention must be set")
        if causal and not self_attention:
            raise ValueError("causal: only self-attention can be causal")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.self_attention = self_attention
        self.encoder_decoder_attention = encoder_decoder_attention
        self.causal = causal
        self.kernel = kernel
        # Non-causal attention writes every key before reading: the sum rule, whatever --fwp-update.
        self.update = update if causal else "sum"
        # identity features are signed: a sum of them (sum normalisation, the normaliser z . phi(q))
        # can be zero or negative, so neither applies to them.
        signed = kernel == "identity"
        if attn_normalize is None:
            attn_normalize = self.update == "sum" and not signed
        if signed and attn_normalize:
            raise ValueError("attn_normalize: identity features are signed, z . phi(q) can be zero; "
                             "turn the attention normaliser off")
        self.attn_normalize = bool(attn_normalize)
        if l2_normalize:
            # An alternative to the paper's sum normalisation, not an addition to it.
            if sum_normalize:
                raise ValueError("sum_normalize and l2_normalize: phi is normalised one way, pick one")
            sum_normalize = False
        elif sum_normalize is None:
            # The paper sum-normalises with the delta rule and DPFP; performer always needs it.
            sum_normalize = not signed and (self.update == "delta" or kernel in ("performer", "dpfp"))
        if signed and sum_normalize:
            raise ValueError("sum_normalize: identity features are signed and can sum to zero; "
                             "use l2_normalize")
        if kernel == "performer" and not (sum_normalize or l2_normalize):
            # FavorFeatureMap subtracts a per-vector max before exp: features are only defined up
            # to a positive per-vector factor, which normalising removes.
            raise ValueError("sum_normalize: performer features must be normalised (sum or L2)")
        self.sum_normalize = bool(sum_normalize)
        self.l2_normalize = bool(l2_normalize)
        self.impl = impl
        self.eps = eps
        self.feature_map = build_feature_map(kernel, self.head_dim, nu=dpfp_nu,
                                             num_features=performer_features, seed=seed)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(self.kdim, embed_dim)
        self.v_proj = nn.Linear(self.vdim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # beta_t = sigmoid(w_beta . x_t): one scalar per head and step, no bias (the paper).
        self.beta_proj = nn.Linear(embed_dim, num_heads, bias=False) if self.update == "delta" else None
        self.num_updates = 0
        self.reset_parameters()

    def reset_parameters(self):
        # Same scheme as fairseq's attention, so that swapping the layer keeps the model's scale.
        gain = 2 ** -0.5 if self.kdim == self.embed_dim and self.vdim == self.embed_dim else 1.0
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.constant_(proj.bias, 0.0)
        if self.beta_proj is not None:
            nn.init.xavier_uniform_(self.beta_proj.weight)

    def extra_repr(self):
        return (f"kernel={self.kernel}, update={self.update}, causal={self.causal}, "
                f"attn_normalize={self.attn_normalize}, sum_normalize={self.sum_normalize}, "
                f"l2_normalize={self.l2_normalize}, "
                f"d_dot={self.feature_map.out_dim}")

    # -- fairseq hooks -------------------------------------------------------------------
    def set_num_updates(self, num_updates):
        """Called by the trainer at every update: FAVOR+ draws number `num_updates` in training."""
        self.num_updates = int(num_updates)

    def set_beam_size(self, beam_size):
        """Kept for MultiheadAttention's interface; the cached state is reordered explicitly."""

    def _get_input_buffer(self, incremental_state) -> Dict[str, Optional[Tensor]]:
        result = self.get_incremental_state(incremental_state, "fw_state")
        return result if result is not None else {}

    def _set_input_buffer(self, incremental_state, buffer):
        return self.set_incremental_state(incremental_state, "fw_state", buffer)

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Beam search: select (and possibly drop) rows of the batch in every cached tensor."""
        buffer = self._get_input_buffer(incremental_state)
        if buffer:
            for key, value in buffer.items():
                if value is not None:
                    buffer[key] = value.index_select(0, new_order)
            incremental_state = self._set_input_buffer(incremental_state, buffer)
        return incremental_state

    # -- forward -------------------------------------------------------------------------
    def _heads(self, x, bsz):
        """(T, B, H*D) -> (B, H, T, D)."""
        return x.view(x.size(0), bsz, self.num_heads, -1).permute(1, 2, 0, 3)

    def _phi(self, x):
        # In fp32 for half inputs: DPFP squares x (|x| ~ 1e3 gives 1e6, past fp16's range),
        # FAVOR+ exponentiates, and the normalising sum runs over d_dot features.
        dtype = x.dtype
        x = self.feature_map(_acc(x))
        if self.sum_normalize:
            x = sum_normalize(x, self.eps)
        elif self.l2_normalize:
            x = l2_normalize(x, self.eps)
        return x.to(_core_dtype(dtype))

    def _check(self, query, key, value, key_padding_mask):
        if query.dim() != 3 or query.size(-1) != self.embed_dim:
            raise ValueError(f"query: expected (T, B, {self.embed_dim}), got {tuple(query.shape)}")
        if key is not None:
            if key.dim() != 3 or key.size(-1) != self.kdim or key.size(1) != query.size(1):
                raise ValueError(f"key: expected (S, {query.size(1)}, {self.kdim}), got {tuple(key.shape)}")
            if value is None or value.shape[:2] != key.shape[:2] or value.size(-1) != self.vdim:
                raise ValueError(f"value: expected ({key.size(0)}, {key.size(1)}, {self.vdim}), "
                                 f"got {None if value is None else tuple(value.shape)}")
            if key_padding_mask is not None and tuple(key_padding_mask.shape) != (key.size(1), key.size(0)):
                raise ValueError(f"key_padding_mask: expected {(key.size(1), key.size(0))}, "
                                 f"got {tuple(key_padding_mask.shape)}")

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None,
                need_weights=True, static_kv=False, attn_mask=None, before_softmax=False,
                need_head_weights=False):
        if before_softmax:
            raise ValueError("before_softmax: fast-weight attention has no attention logits")
        if self.self_attention and key is None:
            key = value = query
        if self.encoder_decoder_attention and static_kv and incremental_state is not None \
                and self._get_input_buffer(incremental_state).get("fw_state") is not None:
            key = value = key_padding_mask = None  # decoding: the state built at step one is reused
        self._check(query, key, value, key_padding_mask)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(torch.bool)
        if self.training and isinstance(self.feature_map, FavorFeatureMap):
            # Redrawn every training update from (seed, update number): identical on all workers.
            self.feature_map.redraw(self.num_updates)
        tgt_len, bsz, _ = query.shape
        # Autocast would run the recurrence's products in half and cast the fp32 state and
        # normalisers down: it is off from phi to the output; projections keep the caller's.
        dev = query.device.type
        self._amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        qp = self.q_proj(query)
        with torch.autocast(dev, enabled=False):
            q = self._phi(self._heads(qp, bsz))
            if self.causal:
                out = self._causal(q, query, key, value, key_padding_mask, incremental_state)
            else:
                out = self._noncausal(q, key, value, key_padding_mask, incremental_state, static_kv)
        out = out.to(qp.dtype).permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim)
        return self.out_proj(out), None

    def _project(self, proj, x):
        """A projection under the caller's autocast, which forward turns off around the rest."""
        amp = getattr(self, "_amp", None)
        if amp is None:
            return proj(x)
        with torch.autocast(x.device.type, dtype=amp):
            return proj(x)

    def _keys_values(self, key, value, key_padding_mask, bsz):
        k = self._phi(self._heads(self._project(self.k_proj, key), bsz))
        v = self._heads(self._project(self.v_proj, value), bsz).to(k.dtype)  # the ops want one dtype
        if key_padding_mask is not None:
            # A zero key writes nothing (sum and delta rule alike) and adds nothing to z.
            k = k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        return k, v

    def _normalise(self, o, q, z):
        """o / (z . phi(q) + eps); z is (B, H, T or 1, d_dot) in fp32."""
        den = (_acc(q) * z).sum(-1, keepdim=True) + self.eps
        return (_acc(o) / den).to(o.dtype)

    def _noncausal(self, q, key, value, key_padding_mask, incremental_state, static_kv):
        bsz = q.size(0)
        buffer = self._get_input_buffer(incremental_state) if incremental_state is not None else {}
        if static_kv and buffer.get("fw_state") is not None:
            # Encoder-decoder attention while decoding: the state was built at the first step.
            state, z = buffer["fw_state"], buffer.get("fw_z")
        else:
            k, v = self._keys_values(key, value, key_padding_mask, bsz)
            state = fast_weight_state(k, v)
            z = _acc(k).sum(2, keepdim=True) if self.attn_normalize else None
            if incremental_state is not None and static_kv:
                self._set_input_buffer(incremental_state, {"fw_state": state, "fw_z": z})
        out = fast_weight_read(q, state)
        return self._normalise(out, q, z) if self.attn_normalize else out

    def _causal(self, q, query, key, value, key_padding_mask, incremental_state):
        bsz = q.size(0)
        k, v = self._keys_values(key, value, key_padding_mask, bsz)
        buffer = self._get_input_buffer(incremental_state) if incremental_state is not None else {}
        state0, z0 = buffer.get("fw_state"), buffer.get("fw_z")
        # Incremental decoding has its own state; otherwise continue the carried segment state.
        carry = self.carry_state and incremental_state is None
        if carry:
            state0, z0 = self._carried_in(bsz)
        keep_state = incremental_state is not None or carry
        z = None
        if self.attn_normalize:
            z = _acc(k).cumsum(2)  # z_t = z_{t-1} + phi(k_t)
            if z0 is not None:
                z = z + z0
        beta = None
        if self.update == "delta":
            beta = torch.sigmoid(self.beta_proj(query)).permute(1, 2, 0)  # (B, H, T)
            if self.attn_normalize:
                k, beta = self._normalised_delta_inputs(k, beta, z)
            beta = beta.to(q.dtype)
        if state0 is not None and q.size(2) == 1:
            out, state = self._one_step(q, k, v, beta, state0)
        elif beta is not None:
            out, state = fast_weight_delta(q, k, v, beta, initial_state=state0,
                                           output_final_state=keep_state, impl=self.impl)
        else:
            out, state = fast_weight_sum(q, k, v, initial_state=state0,
                                         output_final_state=keep_state, impl=self.impl)
        if self.attn_normalize:
            out = self._normalise(out, q, z)
        if carry:
            # Detached: backpropagation stays within the segment (truncated BPTT).
            self._carried[self._carry_slot()] = (
                state.detach(), z[:, :, -1:].detach() if z is not None else None)
        if incremental_state is not None:
            self._set_input_buffer(incremental_state, {
                "fw_state": state, "fw_z": z[:, :, -1:] if z is not None else None})
        return out

    # -- fast weights carried across segments (task fwp_stream_lm --fwp-carry-state) -------
    carry_state = False  # per layer, switched on by set_carry_state

    def set_carry_state(self, on=True):
        """Carry (S, z) from one forward to the next when no incremental_state is given: the
        batch rows must be contiguous streams whose consecutive segments arrive in order."""
        if on and not self.causal:
            raise ValueError("carry_state: only causal self-attention has a state to carry")
        self.carry_state = bool(on)
        self.reset_carried_state()

    def _carry_slot(self):
        # Training and evaluation streams (validation in the middle of an epoch) are distinct.
        return "train" if self.training else "eval"

    def reset_carried_state(self, slot=None):
        """Forget the carried state of `slot` ("train" / "eval"), or of both: W = 0, z = 0."""
        carried = self.__dict__.setdefault("_carried", {})
        if slot is None:
            carried.clear()
        else:
            carried.pop(slot, None)

    def reset_carried_rows(self, rows, slot="train"):
        """Forget the carried state of some streams only: rows is a (B,) bool mask."""
        carried = self.__dict__.setdefault("_carried", {}).get(slot)
        if carried is None or not bool(rows.any()):
            return
        keep = (~rows).to(device=carried[0].device, dtype=carried[0].dtype).view(-1, 1, 1, 1)
        state, z = carried
        self._carried[slot] = (state * keep, z * keep if z is not None else None)

    def _carried_in(self, bsz):
        carried = self.__dict__.setdefault("_carried", {}).get(self._carry_slot())
        if carried is None:
            return None, None
        if carried[0].size(0) != bsz:
            # A batch row is a stream: another batch size means other streams, not a continuation.
            raise RuntimeError(
                f"--fwp-carry-state: the carried fast weights hold {carried[0].size(0)} streams but "
                f"this batch has {bsz} rows; reset the state (model.reset_fast_weights()) when "
                "starting new streams")
        return carried

    @staticmethod
    def _one_step(q, k, v, beta, state):
        """One decoding step on the carried state S (B, H, d_dot, Dv), without the chunked
        machinery: S += k (v - S^T k)^T * beta (delta) or k v^T (sum); o = S^T q."""
        qa, ka, va = (x[:, :, 0].to(state.dtype) for x in (q, k, v))
        if beta is not None:
            v_bar = (ka.unsqueeze(-2) @ state).squeeze(-2)
            va = (va - v_bar) * beta[:, :, 0, None].to(state.dtype)
        state = state + ka.unsqueeze(-1) * va.unsqueeze(-2)
        out = (qa.unsqueeze(-2) @ state).to(q.dtype)  # (B, H, 1, Dv)
        return out, state

    def _normalised_delta_inputs(self, k, beta, z):
        """The delta rule with v_bar_t = W_{t-1} phi(k_t) / (z_{t-1} . phi(k_t)) is the plain
        delta rule on k' = k / d_t, beta' = beta * d_t with d_t = z_{t-1} . phi(k_t), since
        beta' k' = beta k. Where nothing was written yet W_{t-1} = 0 and any d works: use 1."""
        kf = _acc(k)
        z_prev = z - kf
        d = (z_prev * kf).sum(-1)
        d = torch.where(z_prev.sum(-1) > 0, d.clamp_min(self.eps), torch.ones_like(d))
        return (kf / d[..., None]).to(k.dtype), _acc(beta) * d
