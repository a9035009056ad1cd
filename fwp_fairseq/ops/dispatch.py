"""Public entry points of the causal rules: validate, ask plan.decide how the call runs, run it."""
import functools
from typing import Optional, Tuple

import torch

from . import cuda_backend
from ._checks import check_causal_inputs
from .delta_rule.chunked import delta_rule_chunked
from .delta_rule.reference import delta_rule_reference
from .plan import check_impl, decide, describe
from .quadratic import delta_rule_quadratic, sum_rule_quadratic
from .sum_rule.chunked import sum_rule_chunked
from .sum_rule.reference import sum_rule_reference

Output = Tuple[torch.Tensor, Optional[torch.Tensor]]


def cuda_available() -> Tuple[bool, str]:
    """Whether the compiled CUDA recurrence can run here, and why not. Never raises; cached
    after the first call (which may build the extension, about a minute).

    Returns:
        (ok, reason): reason is "ok" when ok.
    Example:
        >>> ok, why = cuda_available()  # on a CPU-only torch: (False, "torch ... built without CUDA")
    """
    return cuda_backend.available()


def _cuda_fn(name, q, impl):
    """The CUDA backend's function; impl "cuda-chunk" (auto only) asks for the chunk kernels."""
    if not q.is_cuda:
        raise ValueError(f"impl: 'cuda' needs CUDA tensors, got q on {q.device}")
    ok, why = cuda_available()
    if not ok:
        raise RuntimeError(f"impl='cuda' is unavailable: {why}")
    fn = getattr(cuda_backend, name)
    return functools.partial(fn, kernel="chunk") if impl == "cuda-chunk" else fn


def fast_weight_sum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                    impl: str = "auto", g: Optional[torch.Tensor] = None) -> Output:
    """Sum rule (linear attention): S_t = a_t S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, with
    a_t = exp(g_t) when a forget gate g is given, else 1.

    Args:
        q, k: (B, H, T, Dk), already feature-mapped (phi(q), phi(k)).
        v: (B, H, T, Dv), same dtype and device as q.
        initial_state: S_0 (B, H, Dk, Dv), or None for zeros.
        output_final_state: also return S_T.
        impl: "auto" (plan.decide picks the order and implementation), "reference", "chunked"
            or "cuda" (CUDA tensors and the compiled extension).
        g: log-decays (B, H, T), finite and <= 0, any float dtype (fp32 keeps half inputs'
            decays exact); values are checked for CPU tensors only (the check would make a GPU
            call wait for the device).
    Returns:
        o: (B, H, T, Dv) in q's dtype.
        final_state: (B, H, Dk, Dv) in fp32 (fp64 for fp64 inputs), or None unless asked for.
    Example:
        >>> q = k = torch.rand(2, 4, 10, 16).softmax(-1); v = torch.randn(2, 4, 10, 32)
        >>> o, S = fast_weight_sum(q, k, v, output_final_state=True)  # (2, 4, 10, 32), (2, 4, 16, 32)
    """
    check_impl(impl)
    check_causal_inputs(q, k, v, initial_state=initial_state, g=g)
    impl = decide(describe("sum", q, v, initial_state, output_final_state, g), impl).impl
    gated = {} if g is None else {"g": g}
    if impl == "quadratic":
        return sum_rule_quadratic(q, k, v), None
    if impl == "reference":
        return sum_rule_reference(q, k, v, initial_state, output_final_state, **gated)
    if impl == "chunked":
        return sum_rule_chunked(q, k, v, initial_state, output_final_state, **gated)
    return _cuda_fn("sum_rule_cuda", q, impl)(q, k, v, initial_state, output_final_state, **gated)


def fast_weight_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                      initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                      impl: str = "auto", g: Optional[torch.Tensor] = None) -> Output:
    """Delta rule: S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T, o_t = S_t^T q_t,
    with a_t = exp(g_t) when a forget gate g is given (Gated DeltaNet), else 1.

    Args:
        q, k: (B, H, T, Dk), already feature-mapped (keep sum(k) <= 1 for a contractive update).
        v: (B, H, T, Dv). beta: (B, H, T) write strengths, usually in (0, 1).
        initial_state, output_final_state, impl, g: as fast_weight_sum.
    Returns:
        o: (B, H, T, Dv) in q's dtype.
        final_state: (B, H, Dk, Dv) in fp32 (fp64 for fp64 inputs), or None unless asked for.
    Example:
        >>> q = k = torch.rand(2, 4, 10, 16).softmax(-1); v = torch.randn(2, 4, 10, 32)
        >>> beta = torch.rand(2, 4, 10)
        >>> o, _ = fast_weight_delta(q, k, v, beta)  # o: (2, 4, 10, 32)
    """
    check_impl(impl)
    check_causal_inputs(q, k, v, beta, initial_state, with_beta=True, g=g)
    impl = decide(describe("delta", q, v, initial_state, output_final_state, g), impl).impl
    gated = {} if g is None else {"g": g}
    if impl == "quadratic":
        return delta_rule_quadratic(q, k, v, beta), None
    if impl == "reference":
        return delta_rule_reference(q, k, v, beta, initial_state, output_final_state, **gated)
    if impl == "chunked":
        return delta_rule_chunked(q, k, v, beta, initial_state, output_final_state, **gated)
    return _cuda_fn("delta_rule_cuda", q, impl)(q, k, v, beta, initial_state, output_final_state, **gated)
