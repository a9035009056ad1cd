"""Causal fast weights in the attention order, for short sequences with no state in or out.

    sum rule:   O = tril(Q K^T) V                       (read after write: the diagonal is kept)
    delta rule: U = (I + strictly_lower(diag(beta) K K^T))^-1 diag(beta) V,   O = tril(Q K^T) U

U holds what the delta rule writes, u_t = beta_t (v_t - S_{t-1}^T k_t) with S_{t-1} = sum_{i<t}
k_i u_i^T (delta_rule/chunked.py derives it; with no initial state the W S term vanishes), so the
d_dot x Dv state is never formed. plan.py says when this order runs.

These are a handful of batched products: autograd's backward is exact and needs no hand-written
counterpart (the products it runs are the transposes of the forward ones, T x T sized)."""
import torch

from ._checks import accumulation_dtype, check_causal_inputs


def delta_rule_written_values(k, beta, v):
    """U (B, H, T, Dv): the values the delta rule writes from a zero state, u_t = beta_t (v_t - S_{t-1}^T k_t).
    Inputs in the accumulation dtype."""
    T = k.shape[2]
    # beta scales the rows of the T x T product, not the T x d_dot keys: cheaper both ways.
    A = ((k @ k.transpose(-1, -2)) * beta[..., None]).tril(-1)
    eye = torch.eye(T, dtype=k.dtype, device=k.device)
    return torch.linalg.solve_triangular(A + eye, v * beta[..., None], upper=False, unitriangular=True)


def _causal_read(q, k, u):
    return (q @ k.transpose(-1, -2)).tril() @ u


def sum_rule_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The sum rule from a zero state in the attention order: o_t = sum_{i<=t} (q_t . k_i) v_i.

    Args:
        q, k: (B, H, T, Dk), feature-mapped. v: (B, H, T, Dv).
    Returns:
        o: (B, H, T, Dv) in q's dtype (computed in fp32, fp64 for fp64 inputs); no state.
    Example:
        >>> q = k = torch.rand(2, 4, 10, 16).softmax(-1); v = torch.randn(2, 4, 10, 32)
        >>> o = sum_rule_quadratic(q, k, v)  # == fast_weight_sum(q, k, v, impl="chunked")[0]
    """
    check_causal_inputs(q, k, v)
    acc = accumulation_dtype(q.dtype)
    return _causal_read(q.to(acc), k.to(acc), v.to(acc)).to(q.dtype)


def delta_rule_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The delta rule from a zero state in the attention order, o_t = S_t^T q_t, without forming S.

    Args:
        q, k: (B, H, T, Dk), feature-mapped. v: (B, H, T, Dv). beta: (B, H, T).
    Returns:
        o: (B, H, T, Dv) in q's dtype (computed in fp32, fp64 for fp64 inputs); no state.
    Example:
        >>> q = k = torch.rand(2, 4, 10, 16).softmax(-1); v = torch.randn(2, 4, 10, 32)
        >>> o = delta_rule_quadratic(q, k, v, torch.rand(2, 4, 10))  # (2, 4, 10, 32)
    """
    check_causal_inputs(q, k, v, beta, with_beta=True)
    acc = accumulation_dtype(q.dtype)
    qa, ka = q.to(acc), k.to(acc)
    u = delta_rule_written_values(ka, beta.to(acc), v.to(acc))
    return _causal_read(qa, ka, u).to(q.dtype)
