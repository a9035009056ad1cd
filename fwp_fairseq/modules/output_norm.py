"""Output norm of fast-weight attention (--fwp-output-norm; not in arXiv 2102.11174): the read-out
o of each head and step is RMS-normalised over its Dv entries with a learned scale (one per
entry, shared by the heads), and for "rms-gated" multiplied by SiLU(W_g x), W_g a new projection
(no bias) of the layer's input, before the output projection: Gated DeltaNet's output (Yang,
Kautz & Hatamizadeh, ICLR 2025; flash-linear-attention's FusedRMSNormGated).

The attention normaliser: o / (z . phi(q)) divides each head's read-out at a step by one scalar,
which the RMS norm divides out again (up to eps), so the normaliser is redundant here: with an
output norm it is off by default, and asking for it (--fwp-attn-normalize) is an error."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import to_accumulation

OUTPUT_NORMS = ("none", "rms", "rms-gated")


class OutputNorm(nn.Module):
    """o (B, H, T, Dv) and the layer input x (T, B, C) -> o normalised (and gated), same shape."""

    def __init__(self, kind, embed_dim, num_heads, head_dim, eps=1e-5):
        super().__init__()
        if kind not in OUTPUT_NORMS[1:]:
            raise ValueError(f"output_norm: expected one of {OUTPUT_NORMS}, got {kind!r}")
        self.kind, self.num_heads, self.eps = kind, num_heads, eps
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.gate_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=False) if kind == "rms-gated" else None

    def extra_repr(self):
        return f"kind={self.kind}, eps={self.eps}"

    def forward(self, o, x):
        oa = to_accumulation(o)  # the mean of squares in fp32 for half inputs
        oa = oa * torch.rsqrt(oa.square().mean(-1, keepdim=True) + self.eps) * self.weight.to(oa.dtype)
        if self.gate_proj is not None:
            g = self.gate_proj(x)  # (T, B, H*Dv)
            g = g.view(g.size(0), g.size(1), self.num_heads, -1).permute(1, 2, 0, 3)
            oa = oa * F.silu(to_accumulation(g))
        return oa.to(o.dtype)


def check_output_norm(output_norm, attn_normalize, names=None):
    """-> the attention normaliser's setting with this output norm: unchanged (None: the
    default) without one; off with one, where asking for it is a ValueError naming both."""
    names = names or {"output_norm": "output_norm", "attn_normalize": "attn_normalize"}
    if output_norm not in OUTPUT_NORMS:
        raise ValueError(f"{names['output_norm']}: expected one of {', '.join(OUTPUT_NORMS)}, got {output_norm!r}")
    if output_norm == "none":
        return attn_normalize
    if attn_normalize:
        raise ValueError(f"{names['attn_normalize']} and {names['output_norm']} {output_norm} contradict each "
                         "other: the RMS norm divides the normaliser's per-head scalar out again; drop one")
    return False
