"""Non-causal fast weights, for encoder self-attention and encoder-decoder attention:
all keys are written (sum rule) before any query reads, o_i = S^T q_i with S = sum_j k_j v_j^T.

Two association orders give the same o: the state order q_i^T (K^T V) and the attention order
(Q K^T) V, cheaper while the sequences are short against d_dot (plan.py has the rule)."""
from typing import Optional, Tuple

import torch

from ._checks import _tensor, accumulation_dtype
from .plan import noncausal_order


def masked_keys(k, key_padding_mask=None):
    """k in the accumulation dtype with padded positions zeroed: a zero key writes nothing and
    adds nothing to the normaliser, in either order (an all-padding row reads 0, not NaN).

    key_padding_mask: (B, T) bool, True where the position is padding (fairseq's convention)."""
    ka = k.to(accumulation_dtype(k.dtype))
    if key_padding_mask is None:
        return ka
    B, _, T, _ = k.shape
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.shape != (B, T):
        shape = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, torch.Tensor) else key_padding_mask
        raise ValueError(f"key_padding_mask: expected shape {(B, T)}, got {shape}")
    if key_padding_mask.device != k.device:
        raise ValueError(f"key_padding_mask: expected device {k.device}, got {key_padding_mask.device}")
    return ka.masked_fill(key_padding_mask.to(torch.bool)[:, None, :, None], 0.0)


def _check_kv(k, v):
    _tensor("k", k, 4)
    _tensor("v", v, 4)
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected shape (B, H, T, Dv) matching k {tuple(k.shape)}, got {tuple(v.shape)}")


def fast_weight_state(k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fast weight after writing every unpadded key: S = sum_j k_j v_j^T.

    Args:
        k: (B, H, T, Dk), feature-mapped. v: (B, H, T, Dv).
        key_padding_mask: (B, T) bool, True at padding (fairseq's convention), or None.
    Returns:
        S: (B, H, Dk, Dv) in fp32 (fp64 for fp64 inputs).
    Example:
        >>> S = fast_weight_state(torch.rand(2, 4, 7, 16), torch.randn(2, 4, 7, 32))  # (2, 4, 16, 32)
    """
    _check_kv(k, v)
    ka = masked_keys(k, key_padding_mask)
    return ka.transpose(-1, -2) @ v.to(ka.dtype)


def fast_weight_read(q: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Every query reads the fast weight: o_i = S^T q_i.

    Args:
        q: (B, H, Tq, Dk), feature-mapped. state: S (B, H, Dk, Dv).
    Returns:
        o: (B, H, Tq, Dv) in q's dtype (computed in the state's dtype).
    Example:
        >>> S = torch.randn(2, 4, 16, 32)
        >>> o = fast_weight_read(torch.rand(2, 4, 5, 16), S)  # (2, 4, 5, 32)
    """
    _tensor("q", q, 4)
    _tensor("state", state, 4)
    if state.shape[:2] != q.shape[:2] or state.shape[2] != q.shape[3]:
        raise ValueError(
            f"state: expected shape ({q.shape[0]}, {q.shape[1]}, {q.shape[3]}, Dv) for q {tuple(q.shape)}, "
            f"got {tuple(state.shape)}")
    return (q.to(state.dtype) @ state).to(q.dtype)


def attention_read(q, k, v, key_padding_mask=None):
    """The attention order: o = (Q K^T) V over the unpadded keys, no Dk x Dv state formed."""
    _check_kv(k, v)
    ka = masked_keys(k, key_padding_mask)
    return ((q.to(ka.dtype) @ ka.transpose(-1, -2)) @ v.to(ka.dtype)).to(q.dtype)


def fast_weight_noncausal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_padding_mask: Optional[torch.Tensor] = None, output_final_state: bool = False,
                          order: str = "auto") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Non-causal linear attention: every query reads the state after all (unpadded) keys,
    o_i = S^T q_i with S = sum_j k_j v_j^T (encoder self-attention, encoder-decoder attention).

    Args:
        q: (B, H, Tq, Dk) and k: (B, H, Tk, Dk), feature-mapped. v: (B, H, Tk, Dv).
        key_padding_mask: (B, Tk) bool, True at padding, or None.
        output_final_state: also return S (only the state order forms it).
        order: "state", "quadratic" (the attention order (Q K^T) V; holds no state) or "auto",
            the cheaper one by plan.noncausal_order (the state order when output_final_state).
    Returns:
        o: (B, H, Tq, Dv) in q's dtype.
        state: S (B, H, Dk, Dv) in fp32 (fp64 for fp64 inputs), or None unless asked for.
    Example:
        >>> q, k = torch.rand(2, 4, 5, 16), torch.rand(2, 4, 7, 16); v = torch.randn(2, 4, 7, 32)
        >>> o, _ = fast_weight_noncausal(q, k, v)  # o: (2, 4, 5, 32)
    """
    _tensor("q", q, 4)
    if k.dim() == 4 and (q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]):
        raise ValueError(f"k: expected (B, H, Tk, Dk) matching q {tuple(q.shape)} in B, H, Dk, got {tuple(k.shape)}")
    _check_kv(k, v)
    order = noncausal_order(q.shape[2], k.shape[2], k.shape[3], v.shape[3], output_final_state, order)
    if order == "quadratic":
        return attention_read(q, k, v, key_padding_mask), None
    state = fast_weight_state(k, v, key_padding_mask)
    return fast_weight_read(q, state), (state if output_final_state else None)
