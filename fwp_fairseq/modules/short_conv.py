"""Short causal convolution of causal fast-weight self-attention (--fwp-short-conv K; not in
arXiv 2102.11174): a depthwise convolution over time with kernel K, then SiLU, on each of the
q, k and v projections, as the DeltaNet of Yang et al. (NeurIPS 2024) and Gated DeltaNet (ICLR
2025) use it (flash-linear-attention's ShortConvolution).

The three projections go through one depthwise convolution over their 3C concatenated channels
(a depthwise convolution treats each channel alone: the same as three of C channels). Causal:
output t sees inputs t-K+1..t. Continuing a sequence needs only the last K-1 inputs (the
"tail", (B, 3C, K-1), batch first so that beam search reorders it with the decoding state):
incremental decoding keeps it in the incremental state, the carried state (fwp_stream_lm
--fwp-carry-state) from one segment to the next; without a tail the sequence starts on zeros.
Centred (causal=False; encoder self-attention, --fwp-short-conv-encoder): output t sees inputs
t-(K-1)//2 .. t+K-1-(K-1)//2, zeros beyond both ends and at padding, so that a padded sentence
gets the outputs of the same sentence alone."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShortConvolution(nn.Module):
    """x (T, B, channels), tail (B, channels, K-1) or None -> (silu(conv(x)), new tail)."""

    def __init__(self, channels, kernel, causal=True):
        super().__init__()
        if kernel < 1:
            raise ValueError(f"short_conv: kernel size must be >= 1 (0: no convolution), got {kernel}")
        self.channels, self.kernel, self.causal = channels, kernel, causal
        # No bias (flash-linear-attention's default): the projections before it have one.
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv1d's default scheme: uniform in +-1/sqrt(fan_in), fan_in = K for a depthwise kernel.
        bound = 1.0 / math.sqrt(self.kernel)
        nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self):
        return f"channels={self.channels}, kernel={self.kernel}, causal={self.causal}"

    def forward(self, x, tail=None, padding_mask=None):
        """padding_mask (B, T), True at padding: those inputs count as zero (fla masks them too)."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.t()[:, :, None], 0.0)
        K = self.kernel
        if not self.causal:  # a sentence at once: (K-1)//2 zeros before it, the rest after
            if tail is not None:
                raise ValueError("tail: a centred convolution sees the future; it cannot continue a sequence")
            before = (K - 1) // 2
            zeros = x.new_zeros(K - 1, x.size(1), self.channels)
            padded = torch.cat([zeros[:before], x, zeros[before:]], dim=0)
            return _ConvSiLU.apply(padded, self.weight[:, 0].to(x.dtype)), None
        if tail is None:
            head = x.new_zeros(K - 1, x.size(1), self.channels)
        else:
            head = tail.permute(2, 0, 1).to(x.dtype)
        padded = torch.cat([head, x], dim=0)  # (K-1+T, B, C)
        y = _ConvSiLU.apply(padded, self.weight[:, 0].to(x.dtype))
        return y, padded[padded.size(0) - (K - 1):].permute(1, 2, 0)


def _conv(padded, w, T):
    """sum_j w[:, j] * padded[j:j+T]: the causal depthwise convolution (T, B, C), computed in x's
    (T, B, C) layout as K multiply-adds into one buffer (conv1d would need (B, C, T): two
    transposed copies, which on the CPU cost more than the convolution)."""
    K = w.size(1)
    y = padded[K - 1:] * w[:, K - 1]
    for j in range(K - 1):
        y.addcmul_(padded[j:j + T], w[:, j])
    return y


class _ConvSiLU(torch.autograd.Function):
    """silu(_conv(padded, w)) with a hand-written backward: it keeps only padded and the
    pre-activation, and makes fewer passes over (T, B, C) than autograd through the K products."""

    @staticmethod
    def forward(ctx, padded, w):
        T = padded.size(0) - w.size(1) + 1
        y = _conv(padded, w, T)
        ctx.save_for_backward(padded, w, y)
        return F.silu(y)

    @staticmethod
    def backward(ctx, grad):
        padded, w, y = ctx.saved_tensors
        K, T = w.size(1), y.size(0)
        gy = torch.ops.aten.silu_backward(grad.contiguous(), y)
        g_padded = g_w = None
        if ctx.needs_input_grad[0]:
            g_padded = padded.new_zeros(padded.shape)
            for j in range(K):
                g_padded[j:j + T].addcmul_(gy, w[:, j])
        if ctx.needs_input_grad[1]:
            flat = gy.reshape(T, -1, gy.size(-1))
            g_w = torch.stack([(flat * padded[j:j + T].reshape(flat.shape)).sum((0, 1)) for j in range(K)], 1)
        return g_padded, g_w
