"""Splitting (B, H, T, D) sequences into chunks of C steps, and back.

Chunks are laid out chunk-major, (N, B*H, C, D), so that the sequential loops over chunks
read and write contiguous slices x[n] (a strided slice makes batched products fall back to
one small product per batch element)."""
import torch
import torch.nn.functional as F


def pick_chunk_size(T, preferred):
    """Short sequences are one chunk (no padding); longer ones use the preferred size."""
    return T if T <= preferred else preferred


def to_chunks(x, C):
    """(B, H, T, ...) -> (N, B*H, C, ...), zero-padding T up to N*C.

    Zero keys, values, queries and betas are inert in both rules, so padding never changes a result."""
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
