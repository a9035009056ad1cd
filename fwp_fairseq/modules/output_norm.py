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

from . import cpu_kernels
from .precision import to_accumulation

OUTPUT_NORMS = ("none", "rms", "rms-gated")


class OutputNorm(nn.Module):
    """o (B, H, T, Dv) and the layer input x (T, B, C) -> o normalised (and gated), as
    (T, B, H*Dv) for the output projection."""

    def __init__(self, kind, embed_dim, num_heads, head_dim, eps=1e-5):
        super().__init__()
        if kind not in OUTPUT_NORMS[1:]:
            raise ValueError(f"output_norm: expected one of {OUTPUT_NORMS}, got {kind!r}")
        self.kind, self.num_heads, self.eps = kind, num_heads, eps
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.gate_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=False) if kind == "rms-gated" else None

    def extra_repr(self):
        return f"kind={self.kind}, eps={self.eps}"

    def forward(self, o, x, compiled=None):
        """-> (T, B, H*Dv), o's dtype: the layout of the output projection's input. compiled: the
        CPU kernel of cpu_kernels.py (None: where it applies; False: the PyTorch path, the
        reference)."""
        B, H, T, D = o.shape
        oa = to_accumulation(o)  # the mean of squares in fp32 for half inputs
        g = None if self.gate_proj is None else to_accumulation(self.gate_proj(x))  # (T, B, H*Dv)
        w = self.weight.to(oa.dtype)
        if compiled is None:
            compiled = cpu_kernels.applies(oa, w, *([] if g is None else [g]))
        if compiled:
            return _OutputNormCPU.apply(oa.contiguous(), None if g is None else g.contiguous(), w,
                                        self.eps).to(o.dtype)
        oa = oa * torch.rsqrt(oa.square().mean(-1, keepdim=True) + self.eps) * w
        if g is not None:
            oa = oa * F.silu(g.view(T, B, H, D).permute(1, 2, 0, 3))
        return oa.to(o.dtype).permute(2, 0, 1, 3).reshape(T, B, H * D)


class _OutputNormCPU(torch.autograd.Function):
    """csrc/output_norm_cpu.cpp: o (B, H, T, D), g (T, B, H*D) or None, w (D) -> (T, B, H*D).
    sigmoid(g) comes from PyTorch (vectorised) and is kept for the backward."""

    @staticmethod
    def forward(ctx, o, g, w, eps):
        sg = None if g is None else torch.sigmoid(g)
        out, r = cpu_kernels.extension().output_norm_forward(o, cpu_kernels.or_empty(g, o),
                                                             cpu_kernels.or_empty(sg, o), w, eps)
        ctx.save_for_backward(o, g, sg, w, r)
        return out

    @staticmethod
    def backward(ctx, grad):
        o, g, sg, w, r = ctx.saved_tensors
        need_o, need_g, need_w = ctx.needs_input_grad[:3]
        need_g = need_g and g is not None
        go, gg, gw = cpu_kernels.extension().output_norm_backward(
            grad.contiguous(), o, cpu_kernels.or_empty(g, o), cpu_kernels.or_empty(sg, o), w, r, need_o, need_g,
            need_w)
        return go if need_o else None, gg if need_g else None, gw if need_w else None, None


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
