"""DeltaProduct (Siems et al. 2025): N delta-rule writes per token, one read.

fast_weight_delta_product is the public entry point (exported from fwp_fairseq.ops);
reference.py is the step loop, interleaved.py the fast path through fast_weight_delta."""
import functools
from typing import Optional, Tuple

import torch

from .._checks import _check_log_decay, _tensor, check_causal_inputs
from ..dispatch import fast_weight_delta
from ..plan import check_impl
from .interleaved import delta_product_interleaved
from .reference import delta_product_reference


def check_delta_product_inputs(q, k, v, beta, num_householder, initial_state=None, impl="auto", g=None):
    """Shapes of the token-level q (B, H, T, Dk) and g (B, H, T) against the write-level
    k (B, H, T*N, Dk), v (B, H, T*N, Dv), beta (B, H, T*N); one ValueError naming the argument."""
    if isinstance(num_householder, bool) or not isinstance(num_householder, int) or num_householder < 1:
        raise ValueError(f"num_householder: expected an int >= 1 (writes per token), got {num_householder!r}")
    check_impl(impl)
    n = num_householder
    _tensor("q", q, 4)
    _tensor("k", k, 4)
    B, H, T, Dk = q.shape
    if k.shape != (B, H, T * n, Dk):
        raise ValueError(f"k: expected shape {(B, H, T * n, Dk)} (B, H, T * num_householder, Dk with "
                         f"q {tuple(q.shape)}, num_householder {n}), got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise ValueError(f"k: expected dtype {q.dtype} (as q), got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k: expected device {q.device} (as q), got {k.device}")
    if beta is None:
        raise ValueError(f"beta: DeltaProduct needs beta of shape {(B, H, T * n)}")
    if g is not None:
        _check_log_decay(g, B, H, T)
        if g.device != q.device:
            raise ValueError(f"g: expected device {q.device} (as q), got {g.device}")
    # The write-level tensors are the delta rule's inputs over T*N steps (k stands in for q).
    check_causal_inputs(k, k, v, beta, initial_state, with_beta=True)


def fast_weight_delta_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    num_householder: int,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    impl: str = "auto",
    g: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """DeltaProduct (Siems et al. 2025): per token t the gate (if any) decays the state once,
    S <- exp(g_t) S, then the token's N = num_householder delta-rule writes follow in order,
    S <- S + beta_i k_i (v_i - S^T k_i)^T for i = t*N, ..., t*N + N-1, then the read o_t = S^T q_t.
    Each token's transition is a product of N generalised Householder matrices I - beta k k^T;
    with unit keys and beta in (0, 2) they include reflections (state tracking of permutations).
    N = 1 is fast_weight_delta.

    Args:
        q: (B, H, T, Dk) queries, already feature-mapped.
        k: (B, H, T*N, Dk) keys; write j of token t at index t*N + j.
        v: (B, H, T*N, Dv) values, laid out as k.
        beta: (B, H, T*N) write strengths, laid out as k.
        num_householder: N >= 1, the writes per token.
        initial_state: (B, H, Dk, Dv) state before the first token, or None (zeros).
        output_final_state: also return the state after the last token.
        impl: "reference" (the step loop), "chunked" (the chunkwise delta rule over the T*N
            writes), "cuda" (the CUDA delta rule over the T*N writes; CUDA tensors) or "auto"
            (one token: reference; else fast_weight_delta's own choice over the T*N writes).
        g: optional (B, H, T) log-decays, finite and <= 0, one per token (checked on the CPU).

    Returns:
        (o, final_state): o (B, H, T, Dv) in q's dtype; final_state (B, H, Dk, Dv) in the
        accumulation dtype (fp32, fp64 for fp64 inputs), or None unless asked for.

    Example:
        >>> B, H, T, N, D = 2, 4, 16, 2, 32
        >>> unit = lambda x: torch.nn.functional.normalize(x, dim=-1)
        >>> q, k = unit(torch.randn(B, H, T, D)), unit(torch.randn(B, H, T * N, D))
        >>> v, beta = torch.randn(B, H, T * N, D), 2 * torch.rand(B, H, T * N)
        >>> o, S = fast_weight_delta_product(q, k, v, beta, N, output_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([2, 4, 16, 32]), torch.Size([2, 4, 32, 32]))
    """
    check_delta_product_inputs(q, k, v, beta, num_householder, initial_state, impl, g)
    if impl == "reference" or (impl == "auto" and q.shape[2] == 1):  # one token: N small updates
        return delta_product_reference(q, k, v, beta, num_householder, initial_state, output_final_state, g=g)
    delta_fn = functools.partial(fast_weight_delta, impl=impl)
    return delta_product_interleaved(delta_fn, q, k, v, beta, num_householder, initial_state,
                                     output_final_state, g=g)
