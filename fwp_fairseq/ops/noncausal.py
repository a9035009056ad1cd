"""Non-causal fast weights, for encoder self-attention and encoder-decoder attention:
all keys are written (sum rule) before any query reads, o_i = S^T q_i with S = sum_j k_j v_j^T."""
import torch

from ._checks import _tensor, accumulation_dtype


def fast_weight_state(k, v, key_padding_mask=None):
    """S = sum over unpadded j of k_j v_j^T: (B, H, Dk, Dv) in the accumulation dtype.

    key_padding_mask: (B, T) bool, True where the position is padding (fairseq's convention)."""
    _tensor("k", k, 4)
    _tensor("v", v, 4)
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected shape (B, H, T, Dv) matching k {tuple(k.shape)}, got {tuple(v.shape)}")
    acc = accumulation_dtype(k.dtype)
    ka, va = k.to(acc), v.to(acc)
    if key_padding_mask is not None:
        B, _, T, _ = k.shape
        if key_padding_mask.shape != (B, T):
            raise ValueError(f"key_padding_mask: expected shape {(B, T)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != k.device:
            raise ValueError(f"key_padding_mask: expected device {k.device}, got {key_padding_mask.device}")
        ka = ka.masked_fill(key_padding_mask.to(torch.bool)[:, None, :, None], 0.0)
    return ka.transpose(-1, -2) @ va


def fast_weight_read(q, state):
    """o = S^T q for every query: q (B, H, Tq, Dk), state (B, H, Dk, Dv) -> (B, H, Tq, Dv)."""
    _tensor("q", q, 4)
    _tensor("state", state, 4)
    if state.shape[:2] != q.shape[:2] or state.shape[2] != q.shape[3]:
        raise ValueError(
            f"state: expected shape ({q.shape[0]}, {q.shape[1]}, {q.shape[3]}, Dv) for q {tuple(q.shape)}, "
            f"got {tuple(state.shape)}")
    return (q.to(state.dtype) @ state).to(q.dtype)


def fast_weight_noncausal(q, k, v, key_padding_mask=None, output_final_state=False):
    """Every query reads the state after all (unpadded) keys. Returns (o, state or None)."""
    _tensor("q", q, 4)
    if k.dim() == 4 and (q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]):
        raise ValueError(f"k: expected (B, H, Tk, Dk) matching q {tuple(q.shape)} in B, H, Dk, got {tuple(k.shape)}")
    state = fast_weight_state(k, v, key_padding_mask)
    return fast_weight_read(q, state), (state if output_final_state else None)
