"""The attention normaliser's running sum of keys z (arXiv 2102.11174, section 3), for causal
attention: z_t = a_t z_{t-1} + phi(k_t) (a_t = exp(g_t) with a forget gate, 1 without), the read's
denominator z_t . phi(q_t), and what the delta rule's normalised read of the old state divides
by, a_t z_{t-1} . phi(k_t)."""
import torch

from .gate import decayed_cumsum


def key_sums(k, g=None, z0=None):
    """k (B, H, T, d_dot) in the accumulation dtype, g (B, H, T) log-decays or None, z0
    (B, H, 1, d_dot) the sum carried in, or None (zero) -> (z, z_before), both (B, H, T, d_dot):
    z_t as above and z_before_t = a_t z_{t-1}, the sum before step t's key is added.

    z_before is formed from z_{t-1}, not as the difference z_t - phi(k_t): where the decayed sum is
    small beside phi(k_t) (a strong decay, the first steps, sparse DPFP features) that difference
    cancels, and in fp32 it lost up to half of its digits; the gated delta rule with the
    normaliser was then 2e-4 from fp64 (now 6e-7, as without the gate: tests/test_normaliser.py)."""
    if g is None:
        z = k.cumsum(2)
        if z0 is not None:
            z = z + z0
    else:
        z = decayed_cumsum(k, g, z0)
    start = k.new_zeros(k.shape[:2] + (1, k.shape[-1])) if z0 is None else z0.to(k.dtype)
    z_before = torch.cat([start, z[:, :, :-1]], 2)
    if g is not None:
        z_before = z_before * g.to(k.dtype).exp()[..., None]  # the decay the ops apply to S
    return z, z_before
