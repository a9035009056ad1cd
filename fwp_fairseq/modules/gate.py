"""The forget gate of causal fast-weight attention and the range of the delta rule's beta
(beyond arXiv 2102.11174; fairseq flags --fwp-gate and --fwp-beta-range).

Gate (--fwp-gate scalar): one log-decay g_t <= 0 per head and step, a_t = exp(g_t) scales the
state before the write (S_t = a_t S_{t-1} + ...; the ops' `g`). Parameterised as in Mamba-2
(Dao & Gu, ICML 2024) and Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025):
    g_t = -exp(A_log) * softplus(w_g . x_t + dt_bias),
with A_log = 0 and dt_bias the inverse softplus of dt drawn log-uniformly in [1e-3, 1e-1] per
head (Mamba's dt initialisation), and w_g = 0 at the start, so that a_t starts in [0.90, 0.999].

beta range: "unit" is sigmoid (the paper), "double" is 2 * sigmoid (Grazzi et al., ICLR 2025,
"Unlocking state-tracking in linear RNNs through negative eigenvalues"): the transition
I - beta k k^T then has eigenvalue 1 - beta |k|^2 in (-1, 1] for |k| = 1 (L2-normalised keys),
a reflection at beta = 2."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._chunking import CHUNK
from .precision import to_accumulation

GATES = ("none", "scalar")
BETA_RANGES = ("unit", "double")
BETA_SCALE = {"unit": 1.0, "double": 2.0}


class ScalarGate(nn.Module):
    """x (T, B, C) -> g (B, H, T), the per-head log-decays (fp32, fp64 for fp64 x)."""

    def __init__(self, embed_dim, num_heads, dt_min=1e-3, dt_max=1e-1):
        super().__init__()
        self.proj = nn.Linear(embed_dim, num_heads, bias=False)
        self.a_log = nn.Parameter(torch.zeros(num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(num_heads))
        self.dt_min, self.dt_max = dt_min, dt_max
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.a_log)
        u = torch.rand(self.dt_bias.shape)
        dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        with torch.no_grad():
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def forward(self, x):
        # Not in half precision: the decays compound over many steps.
        w = to_accumulation(self.proj(x))
        dt = F.softplus(w + self.dt_bias.to(w.dtype))
        return (-torch.exp(self.a_log.to(w.dtype)) * dt).permute(1, 2, 0)


def decayed_cumsum(k, g, z0=None, chunk=CHUNK):
    """z_t = a_t z_{t-1} + k_t with a_t = exp(g_t): k (B, H, T, D), g (B, H, T), z0 (B, H, 1, D)
    or None (zero) -> z (B, H, T, D) in k's dtype. Within a chunk z_t = sum_s exp(G_t - G_s) k_s
    (G the cumulative sum of g) with G_t - G_s <= 0 for s <= t: no overflow; the chunk's last z
    carries into the next chunk. G is summed in fp64, as the ops sum the decays of S
    (ops/_chunking.chunk_decay): a difference of two fp32 sums keeps only eps * |G| (after strong
    decays 1e-4 of the factor), so S and z would decay differently."""
    B, H, T, D = k.shape
    out = []
    carry = z0
    for start in range(0, T, chunk):
        kc, gc = k[:, :, start:start + chunk], g[:, :, start:start + chunk].to(torch.float64)
        G = gc.cumsum(-1)
        diff = (G[..., :, None] - G[..., None, :]).to(k.dtype)
        n = G.size(-1)
        causal = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()
        weights = torch.exp(diff.masked_fill(~causal, float("-inf")))
        zc = weights @ kc
        if carry is not None:
            zc = zc + torch.exp(G.to(k.dtype))[..., None] * carry
        out.append(zc)
        carry = zc[:, :, -1:]
    return torch.cat(out, dim=2)


def check_gate_options(gate, beta_range, update, causal):
    """The layer's checks: a gate needs a causal recurrence, beta in (0, 2) the delta rule."""
    if gate not in GATES:
        raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
    if beta_range not in BETA_RANGES:
        raise ValueError(f"beta_range: expected one of {BETA_RANGES}, got {beta_range!r}")
    if gate != "none" and not causal:
        raise ValueError("gate: only causal self-attention has a recurrence to gate")
    if beta_range != "unit" and update != "delta":
        raise ValueError(f"beta_range: {beta_range!r} needs the delta rule (the sum rule has no beta)")
