"""Short causal convolution of causal fast-weight self-attention (--fwp-short-conv K; not in
arXiv 2102.11174): a depthwise convolution over time with kernel K, then SiLU, on each of the
q, k and v projections, as the DeltaNet of Yang et al. (NeurIPS 2024) and Gated DeltaNet (ICLR
2025) use it (flash-linear-attention's ShortConvolution).

The three projections go through one depthwise convolution over their 3C concatenated channels
(a depthwise convolution treats each channel alone: the same as three of C channels). Causal:
output t sees inputs t-K+1..t. Continuing a sequence needs only the last K-1 inputs (the
"tail", (B, 3C, K-1), batch first so that beam search reorders it with the decoding state):
incremental decoding keeps it in the incremental state, the carried state (fwp_stream_lm
--fwp-carry-state) from one segment to the next; without a tail the sequence starts on zeros."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShortConvolution(nn.Module):
    """x (T, B, channels), tail (B, channels, K-1) or None -> (silu(conv(x)), new tail)."""

    def __init__(self, channels, kernel):
        super().__init__()
        if kernel < 1:
            raise ValueError(f"short_conv: kernel size must be >= 1 (0: no convolution), got {kernel}")
        self.channels, self.kernel = channels, kernel
        # No bias (flash-linear-attention's default): the projections before it have one.
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv1d's default scheme: uniform in +-1/sqrt(fan_in), fan_in = K for a depthwise kernel.
        bound = 1.0 / math.sqrt(self.kernel)
        nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self):
        return f"channels={self.channels}, kernel={self.kernel}"

    def forward(self, x, tail=None, padding_mask=None):
        """padding_mask (B, T), True at padding: those inputs count as zero (fla masks them too)."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.t()[:, :, None], 0.0)
        xt = x.permute(1, 2, 0)  # (B, C, T)
        if tail is None:
            tail = xt.new_zeros(xt.size(0), self.channels, self.kernel - 1)
        padded = torch.cat([tail.to(xt.dtype), xt], dim=2)
        y = F.conv1d(padded, self.weight.to(xt.dtype), groups=self.channels)
        new_tail = padded[:, :, padded.size(2) - (self.kernel - 1):]
        return F.silu(y).permute(2, 0, 1), new_tail
