"""Splitting (B, H, T, D) sequences into chunks of C steps, and back."""
import torch.nn.functional as F


def pick_chunk_size(T, preferred):
    """Short sequences are one chunk (no padding); longer ones use the preferred size."""
    return T if T <= preferred else preferred


def to_chunks(x, C):
    """(B, H, T, ...) -> (B*H, N, C, ...), zero-padding T up to N*C.

    Zero keys, values and queries are inert in both rules, so padding never changes a result."""
    B, H, T = x.shape[:3]
    pad = (-T) % C
    if pad:
        # F.pad pads trailing dims first: one (0, 0) pair per trailing feature dim, then time.
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(B * H, (T + pad) // C, C, *x.shape[3:])


def from_chunks(x, B, H, T):
    """(B*H, N, C, D) -> (B, H, T, D), dropping the padding."""
    return x.reshape(B, H, -1, x.shape[-1])[:, :, :T]
