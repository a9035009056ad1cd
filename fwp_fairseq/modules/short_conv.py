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
    """(tap j, lag) pairs: tap j of the kernel reads the input lag = before - j steps back (a
    negative lag reads ahead); before = K-1 is causal, (K-1)//2 centred."""
    return [(j, before - j) for j in range(K)]


def _conv(x, head, wt, before):
    """sum_j wt[j] * x[t - lag_j], zeros (or the head's rows, causal only) outside x: the
    depthwise convolution in x's (T, B, C) layout, as K multiply-adds of shifted slices into
    one buffer (conv1d would need (B, C, T): two transposed copies, which on the CPU cost more
    than the convolution). wt (K, C): each tap's weights contiguous."""
    T = x.size(0)
    y = None
    for j, lag in sorted(_lags(wt.size(0), before), key=lambda p: abs(p[1])):
        n = T - abs(lag)
        if y is None:  # lag 0 first: it covers every step
            y = x * wt[j]
            continue
        if n > 0:
            if lag > 0:
                y[lag:].addcmul_(x[:n], wt[j])
            else:
                y[:n].addcmul_(x[-lag:], wt[j])
        if head is not None and lag > 0:  # steps t < lag read the head's row K-1-lag+t
            m = min(lag, T)
            y[:m].addcmul_(head[head.size(0) - lag:head.size(0) - lag + m], wt[j])
    return y


class _ConvSiLU(torch.autograd.Function):
    """silu(_conv(x, head, w)) with a hand-written backward that allocates only what it
    returns: on the CPU each fresh (T, B, C) buffer costs as much as a pass over it.
    compiled: csrc/short_conv_cpu.cpp does the convolution and its backward in one pass each."""

    @staticmethod
    def forward(ctx, x, head, w, before, compiled):
        wt = w.t().contiguous()
        if compiled:
            x = x.contiguous()
            head_c = head.contiguous() if head is not None else x.new_empty(0)
            y = cpu_kernels.extension().short_conv_forward(x, head_c, wt, before)
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
        if ctx.compiled:
            need = ctx.needs_input_grad
            g_x, g_head, g_wt = cpu_kernels.extension().short_conv_backward(
                gy, x, head.contiguous() if head is not None else x.new_empty(0), wt, ctx.before,
                need[0], need[1] and head is not None, need[2])
            return (g_x if need[0] else None, g_head if need[1] and head is not None else None,
                    g_wt.t() if need[2] else None, None, None)
        g_x = g_head = g_w = None
        lags = _lags(wt.size(0), ctx.before)
        if ctx.needs_input_grad[0]:  # the transposed convolution: x[s] fed y[s + lag]
            g_x = None
            for j, lag in sorted(lags, key=lambda p: abs(p[1])):
                n = T - abs(lag)
                if g_x is None:
                    g_x = gy * wt[j]
                elif n > 0:
                    if lag > 0:
                        g_x[:n].addcmul_(gy[lag:], wt[j])
                    else:
                        g_x[-lag:].addcmul_(gy[:n], wt[j])
        if head is not None and ctx.needs_input_grad[1]:
            g_head = torch.zeros_like(head)
            for j, lag in lags:
                if lag > 0:
                    m = min(lag, T)
                    g_head[head.size(0) - lag:head.size(0) - lag + m].addcmul_(gy[:m], wt[j])
        if ctx.needs_input_grad[2]:
            g_wt = wt.new_empty(wt.shape)
            buf = torch.empty_like(gy)
            for j, lag in lags:
                n = T - abs(lag)
                if n > 0:  # else tap j reads only the head (or zeros) at these steps
                    src, dst = (x[:n], gy[lag:]) if lag >= 0 else (x[-lag:], gy[:n])
                    g_wt[j] = torch.mul(dst, src, out=buf[:n]).sum((0, 1))
                else:
                    g_wt[j] = 0
                if head is not None and lag > 0:
                    m = min(lag, T)
                    g_wt[j] += (gy[:m] * head[head.size(0) - lag:head.size(0) - lag + m]).sum((0, 1))
            g_w = g_wt.t()
        return g_x, g_head, g_w, None, None
