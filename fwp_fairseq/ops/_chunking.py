"""Splitting (B, H, T, D) sequences into chunks of C steps, and back; the decays of the gated
rules inside each chunk.

Chunks are laid out chunk-major, (N, B*H, C, D), so that the sequential loops over chunks
read and write contiguous slices x[n] (a strided slice makes batched products fall back to
one small product per batch element)."""
from typing import NamedTuple

import torch
import torch.nn.functional as F


# The chunk size of the PyTorch chunk forms (sum_rule/chunked.py, delta_rule/chunked.py), which
# the flop count of plan.py assumes, and of the gated normaliser (modules/gate.decayed_cumsum).
CHUNK = 64


def pick_chunk_size(T, preferred):
    """Short sequences are one chunk (no padding); longer ones use the preferred size."""
    return T if T <= preferred else preferred


def to_chunks(x, C):
    """(B, H, T, ...) -> (N, B*H, C, ...), zero-padding T up to N*C.

    Zero keys, values, queries and betas are inert in both rules, and so is a zero log-decay
    (a decay of 1), so padding never changes a result."""
    B, H, T = x.shape[:3]
    pad = (-T) % C
    if pad:
        # F.pad pads trailing dims first: one (0, 0) pair per trailing feature dim, then time.
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    x = x.reshape(B * H, (T + pad) // C, C, *x.shape[3:])
    return x.transpose(0, 1).contiguous()


def from_chunks(x, B, H, T):
    """(N, B*H, C, D) -> (B, H, T, D), dropping the padding."""
    N, BH, C, D = x.shape
    return x.transpose(0, 1).reshape(B, H, N * C, D)[:, :, :T]


def bmm(a, b):
    """Batched product over the leading (N, BH) dims, through 3-d views (no copies)."""
    return torch.bmm(a.flatten(0, 1), b.flatten(0, 1)).view(*a.shape[:-1], b.shape[-1])


def acc_bmm(out, a, b, alpha=1.0):
    """out += alpha * a @ b in place, batched over the leading (N, BH) dims."""
    out.flatten(0, 1).baddbmm_(a.flatten(0, 1), b.flatten(0, 1), alpha=alpha)
    return out


class ChunkDecay(NamedTuple):
    """The decays inside each chunk of a gated rule, from the within-chunk cumulative log-decay
    b_t = g_1 + ... + g_t (steps counted from the chunk's start). Every exponent is <= 0: only
    differences b_t - b_s with s <= t are exponentiated, never a growth exp(-b)."""
    since_start: torch.Tensor  # (N, BH, C, 1) exp(b_t): what is left at step t of the state before the chunk
    until_end: torch.Tensor  # (N, BH, C, 1) exp(b_C - b_t): what is left of step t's write at the chunk's end
    whole: torch.Tensor  # (N, BH, 1, 1) exp(b_C): the state's decay over the whole chunk
    pair: torch.Tensor  # (N, BH, C, C) exp(b_t - b_s) for s <= t, 0 above the diagonal


LEAF = 16  # diagonal blocks of this many steps exponentiate every pair; larger ones are products


def chunk_decay(G):
    """G: (N, BH, C, 1) chunked log-decays (accumulation dtype) -> ChunkDecay.

    The cumulative sums are taken in fp64: after a strong decay b is large, and a difference of
    two fp32 sums would keep only about eps * |b| of precision."""
    dtype = G.dtype
    b = G.to(torch.float64).cumsum(2)
    b_end = b[:, :, -1:]
    return ChunkDecay(b.to(dtype).exp(), (b_end - b).to(dtype).exp_(), b_end.to(dtype).exp(),
                      _pair_decay(b, dtype))


def _pair_decay(b, dtype):
    """(N, BH, C, C): exp(b_t - b_s) for s <= t, 0 above; b (N, BH, C, 1) in fp64.

    Steps t and s of different diagonal blocks meet through the last step m of s's block:
    exp(b_t - b_s) = exp(b_t - b_m) exp(b_m - b_s), an outer product of two vectors with
    exponents <= 0. So when C is LEAF times a power of two, only the diagonal blocks of LEAF
    steps exponentiate every entry, and the larger blocks below them are filled level by level
    (each level's lower-left blocks at once, through a diagonal view)."""
    N, BH, C, _ = b.shape
    L = LEAF if C % LEAF == 0 and (C // LEAF) & (C // LEAF - 1) == 0 else C
    nb = C // L
    pair = b.new_zeros(N, BH, C, C, dtype=dtype)
    # Diagonal blocks. The differences come from b's split b = hi + lo (each part rounded to
    # dtype): (hi_t - hi_s) + (lo_t - lo_s) is as precise as an fp64 difference.
    hi = b.view(N, BH, nb, L).to(dtype)
    d = hi[..., :, None] - hi[..., None, :]
    if dtype != torch.float64:
        lo = (b.view(N, BH, nb, L) - hi.to(torch.float64)).to(dtype)
        d.add_(lo[..., :, None]).sub_(lo[..., None, :])
    # -inf for s > t (no decay applies there): adding it is a cheaper mask than masked_fill_
    d.add_(torch.full((L, L), float("-inf"), dtype=dtype, device=b.device).triu_(1)).exp_()
    pair.view(N, BH, nb, L, nb, L).diagonal(dim1=2, dim2=4).copy_(d.permute(0, 1, 3, 4, 2))
    h = L
    while h < C:  # in blocks of 2h steps, the later half's rows against the earlier half's columns
        ns = C // (2 * h)
        bv = b.view(N, BH, ns, 2, h)
        m = bv[:, :, :, 0, -1:]
        later = (bv[:, :, :, 1] - m).to(dtype).exp_().transpose(-1, -2)  # (N, BH, h, ns)
        earlier = (m - bv[:, :, :, 0]).to(dtype).exp_().transpose(-1, -2)
        lower_left = pair.view(N, BH, ns, 2, h, ns, 2, h).diagonal(dim1=2, dim2=5)[:, :, 1, :, 0]
        torch.mul(later[:, :, :, None], earlier[:, :, None], out=lower_left)
        h *= 2
    return pair


def row_dot(a, b):
    """(..., R, D) . (..., R, D) -> (..., R): one dot product per row, without an (R, D) temporary."""
    return torch.einsum("nbrd,nbrd->nbr", a, b)


def decay_grad(Q, dQ, V, dV, after, d_after):
    """The gradient w.r.t. the chunked log-decays G, (N, BH, C, 1), from the other gradients.

    Within a chunk starting from state S, write the state as S_t = exp(b_t) S~_t: S~ follows the
    ungated rule from S with values exp(-b_t) v_t, o_t = exp(b_t) S~_t^T q_t, and the state after
    the chunk is exp(b_C) S~_C. So b_t scales q_t up and v_t down (and the chunk's last step
    scales its final state), and for either rule
        dL/db_t = q_t . dq_t - v_t . dv_t  (+ <S_after, dS_after> at the chunk's last step);
    dL/dg_s is the sum of dL/db_t over the chunk's steps t >= s. after, d_after: the state after
    each chunk and the gradient w.r.t. it, (N, BH, Dk, Dv)."""
    db = row_dot(Q, dQ).sub_(row_dot(V, dV))
    db[..., -1] += row_dot(after, d_after).sum(-1)
    return db.flip(-1).cumsum(-1).flip(-1)[..., None]
