"""Input validation shared by every op (one clear ValueError naming the argument), and the
state every recurrence starts from."""
import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a state accumulates in: fp64 for fp64 inputs, fp32 for everything else.

    Args:
        dtype: the inputs' dtype.
    Returns:
        torch.float64 or torch.float32.
    Example:
        >>> accumulation_dtype(torch.bfloat16)
        torch.float32
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensor(name, x, ndim):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def start_state(q, v, initial_state, flat=False):
    """The state before the first step, in the accumulation dtype: zeros when none is given.
    (B, H, Dk, Dv), or (B*H, Dk, Dv) with flat=True."""
    B, H, _, Dk = q.shape
    Dv = v.shape[-1]
    shape = (B * H, Dk, Dv) if flat else (B, H, Dk, Dv)
    acc = accumulation_dtype(q.dtype)
    if initial_state is None:
        return q.new_zeros(*shape, dtype=acc)
    return initial_state.to(acc).reshape(shape)


def _check_log_decay(g, B, H, T):
    """g: (B, H, T) floating point, every value finite and <= 0 (a decay a = exp(g) in (0, 1]).
    The values are checked on the CPU only: on a GPU the check would wait for the device at
    every call."""
    _tensor("g", g, 3)
    if g.shape != (B, H, T):
        raise ValueError(f"g: expected shape {(B, H, T)} (B, H, T as q), got {tuple(g.shape)}")
    if g.device.type == "cpu" and not bool(((g <= 0) & torch.isfinite(g)).all()):
        raise ValueError("g: expected finite log-decays <= 0 (a decay exp(g) in (0, 1]), "
                         f"got values in [{g.min().item()}, {g.max().item()}]")


def check_causal_inputs(q, k, v, beta=None, initial_state=None, with_beta=False, g=None):
    """Check the shapes of q, k: (B, H, T, Dk), v: (B, H, T, Dv), beta: (B, H, T),
    initial_state: (B, H, Dk, Dv), g: (B, H, T) or None. Returns (B, H, T, Dk, Dv)."""
    _tensor("q", q, 4)
    _tensor("k", k, 4)
    _tensor("v", v, 4)
    B, H, T, Dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {tuple(q.shape)} (same as q), got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v: expected shape ({B}, {H}, {T}, Dv) (B, H, T as q), got {tuple(v.shape)}")
    Dv = v.shape[-1]
    if T == 0 or Dk == 0 or Dv == 0:
        raise ValueError(f"q, v: empty time or feature dimension, shapes {tuple(q.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: expected dtype {q.dtype} (as q), got {k.dtype} and {v.dtype}")
    tensors = [("k", k), ("v", v)]
    if with_beta:
        if beta is None:
            raise ValueError("beta: the delta rule needs beta of shape (B, H, T)")
        _tensor("beta", beta, 3)
        if beta.shape != q.shape[:3]:
            raise ValueError(f"beta: expected shape {(B, H, T)}, got {tuple(beta.shape)}")
        tensors.append(("beta", beta))
    if initial_state is not None:
        _tensor("initial_state", initial_state, 4)
        if initial_state.shape != (B, H, Dk, Dv):
            raise ValueError(
                f"initial_state: expected shape {(B, H, Dk, Dv)}, got {tuple(initial_state.shape)}")
        tensors.append(("initial_state", initial_state))
    if g is not None:
        _check_log_decay(g, B, H, T)
        tensors.append(("g", g))
    for name, x in tensors:
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (as q), got {x.device}")
    return B, H, T, Dk, Dv
