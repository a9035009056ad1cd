"""Short causal convolution of causal fast-weight self-attention (--fwp-short-conv K; not in
arXiv 2102.11174): a depthwise convolution over time with kernel K, then SiLU, on each of the
q, k and v projections, as the DeltaNet of Yang et al. (NeurIPS 2024) and Gated DeltaNet (ICLR
2025) use it (flash-linear-attention's ShortConvolution).

The three projections go through one depthwise convolution over their 3C channels (a depthwise
convolution treats each channel alone: the same as three of C channels), given as three parts. Causal:
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

from . import cpu_kernels


class ShortConvolution(nn.Module):
    """x (T, B, channels) (or a list of parts), tail (B, channels, K-1) or None ->
    (silu(conv(x)), new tail)."""

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

    def forward(self, x, tail=None, padding_mask=None, compiled=None):
        """x (T, B, channels), or a list of parts (T, B, c_i), channels = sum c_i in that order:
        each part then comes back as a tensor of its own (the layer's q, k and v: its heads read
        those faster than slices of one tensor). padding_mask (B, T), True at padding: those
        inputs count as zero (fla masks them too). compiled: the CPU kernel of cpu_kernels.py
        (None: where it applies; False: the PyTorch path, the reference)."""
        parts = list(x) if isinstance(x, (list, tuple)) else [x]
        if sum(p.size(-1) for p in parts) != self.channels:
            raise ValueError(f"short_conv: expected {self.channels} channels in all, got "
                             f"{[tuple(p.shape) for p in parts]}")
        B = parts[0].size(1)
        if tail is not None:
            if not self.causal:
                raise ValueError("tail: a centred convolution sees the future; it cannot continue a sequence")
            if tuple(tail.shape) != (B, self.channels, self.kernel - 1):
                raise ValueError(f"tail: expected {(B, self.channels, self.kernel - 1)}, got {tuple(tail.shape)}")
        if compiled is None:
            compiled = all(cpu_kernels.applies(p) for p in parts)
        outs, tails, start = [], [], 0
        for part in parts:
            c = part.size(-1)
            w = self.weight[start:start + c, 0].to(part.dtype)
            y, last = self._convolve(part, w, None if tail is None else tail[:, start:start + c],
                                     padding_mask, compiled)
            outs.append(y)
            tails.append(last)
            start += c
        new_tail = None if not self.causal else tails[0] if len(tails) == 1 else torch.cat(tails, dim=1)
        return (outs if isinstance(x, (list, tuple)) else outs[0]), new_tail

    def _convolve(self, x, w, tail, padding_mask, compiled):
        """One part: (silu(conv(x)), its last K-1 inputs (B, c, K-1), None if centred)."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.t()[:, :, None], 0.0)
        K = self.kernel
        if not self.causal:  # a sentence at once: zeros before and after it
            return _ConvSiLU.apply(x, None, w, (K - 1) // 2, compiled), None
        head = None if tail is None else tail.permute(2, 0, 1).to(x.dtype)  # (K-1, B, c)
        y = _ConvSiLU.apply(x, head, w, K - 1, compiled)
        T, B, c = x.shape
        if K == 1:
            return y, x.new_zeros(B, c, 0)
        if T >= K - 1:
            last = x[T - (K - 1):]
        else:
            last = torch.cat([x.new_zeros(K - 1 - T, B, c) if head is None else head[T:], x], dim=0)
        return y, last.permute(1, 2, 0)


def _lags(K, before):
    """(tap j, lag) pairs, lag 0 first: tap j of the kernel reads the input lag = before - j
    steps back (a negative lag reads ahead); before = K-1 is causal, (K-1)//2 centred."""
    return sorted(((j, before - j) for j in range(K)), key=lambda p: abs(p[1]))


def _shifted(lag, T):
    """(output steps, input steps) where y[t] reads x[t - lag] inside x, as slices (None: nowhere)."""
    n = T - abs(lag)
    if n <= 0:
        return None
    return (slice(lag, T), slice(0, n)) if lag >= 0 else (slice(0, n), slice(-lag, T))


def _from_head(head, lag, T):
    """(m, rows): steps t < m = min(lag, T) read head row K-1-lag+t (causal, lag > 0), else None."""
    if head is None or lag <= 0:
        return None
    m, start = min(lag, T), head.size(0) - lag
    return m, slice(start, start + m)


def _conv(x, head, wt, before):
    """sum_j wt[j] * x[t - lag_j], zeros (or the head's rows, causal only) outside x: the
    depthwise convolution in x's (T, B, C) layout, as K multiply-adds of shifted slices into
    one buffer (conv1d would need (B, C, T): two transposed copies, which on the CPU cost more
    than the convolution). wt (K, C): each tap's weights contiguous."""
    T = x.size(0)
    (j0, _), *rest = _lags(wt.size(0), before)
    y = x * wt[j0]  # lag 0: every step
    for j, lag in rest:
        if (shift := _shifted(lag, T)) is not None:
            y[shift[0]].addcmul_(x[shift[1]], wt[j])
        if (part := _from_head(head, lag, T)) is not None:
            y[:part[0]].addcmul_(head[part[1]], wt[j])
    return y


class _ConvSiLU(torch.autograd.Function):
    """silu(_conv(x, head, w)) with a hand-written backward that allocates only what it
    returns: on the CPU each fresh (T, B, C) buffer costs as much as a pass over it.
    compiled: csrc/short_conv_cpu.cpp does the convolution and its backward in one pass each."""

    @staticmethod
    def forward(ctx, x, head, w, before, compiled):
        wt = w.t().contiguous()
        if compiled:
            x, head = x.contiguous(), None if head is None else head.contiguous()
            y = cpu_kernels.extension().short_conv_forward(x, cpu_kernels.or_empty(head, x), wt, before)
        else:
            y = _conv(x, head, wt, before)
        ctx.before, ctx.compiled = before, compiled
        ctx.save_for_backward(x, head, wt, y)
        return F.silu(y)

    @staticmethod
    def backward(ctx, grad):
        x, head, wt, y = ctx.saved_tensors
        T = x.size(0)
        gy = torch.ops.aten.silu_backward(grad.contiguous(), y)
        need_x, need_head, need_w = ctx.needs_input_grad[:3]
        need_head = need_head and head is not None
        if ctx.compiled:
            g_x, g_head, g_wt = cpu_kernels.extension().short_conv_backward(
                gy, x, cpu_kernels.or_empty(head, x), wt, ctx.before, need_x, need_head, need_w)
            return (g_x if need_x else None, g_head if need_head else None, g_wt.t() if need_w else None,
                    None, None)
        g_x = g_head = g_w = None
        (j0, _), *rest = lags = _lags(wt.size(0), ctx.before)
        if need_x:  # the transposed convolution: x[s] fed y[s + lag]
            g_x = gy * wt[j0]
            for j, lag in rest:
                if (shift := _shifted(lag, T)) is not None:
                    g_x[shift[1]].addcmul_(gy[shift[0]], wt[j])
        if need_head:
            g_head = torch.zeros_like(head)
            for j, lag in rest:
                if (part := _from_head(head, lag, T)) is not None:
                    g_head[part[1]].addcmul_(gy[:part[0]], wt[j])
        if need_w:
            g_wt = wt.new_zeros(wt.shape)
            buf = torch.empty_like(gy)
            for j, lag in lags:
                if (shift := _shifted(lag, T)) is not None:  # else tap j reads only the head or zeros
                    out, inp = gy[shift[0]], x[shift[1]]
                    g_wt[j] = torch.mul(out, inp, out=buf[:out.size(0)]).sum((0, 1))
                if (part := _from_head(head, lag, T)) is not None:
                    g_wt[j] += (gy[:part[0]] * head[part[1]]).sum((0, 1))
            g_w = g_wt.t()
        return g_x, g_head, g_w, None, None
