"""Public entry points: validate, then pick an implementation."""
from ._checks import check_causal_inputs
from .delta_rule.chunked import delta_rule_chunked
from .delta_rule.reference import delta_rule_reference
from .sum_rule.chunked import sum_rule_chunked
from .sum_rule.reference import sum_rule_reference


def cuda_available():
    """(ok, reason): whether the compiled CUDA recurrence can run, and why not."""
    try:
        from . import cuda_backend
    except ImportError as e:  # the CUDA issue adds this module
        return False, f"the CUDA backend is not part of this build ({e})"
    return cuda_backend.available()


def _resolve(impl, q, v):
    if impl != "auto":
        return impl
    if q.is_cuda and cuda_available()[0]:
        from . import cuda_backend
        if cuda_backend.supports(q, v)[0]:  # else (e.g. Dk > 512) fall back to chunked
            return "cuda"
    if q.shape[2] == 1:
        return "reference"  # one decoding step: a single update, no chunking machinery
    return "chunked"


def _cuda_fn(name, q):
    if not q.is_cuda:
        raise ValueError(f"impl: 'cuda' needs CUDA tensors, got q on {q.device}")
    ok, why = cuda_available()
    if not ok:
        raise RuntimeError(f"impl='cuda' is unavailable: {why}")
    from . import cuda_backend
    return getattr(cuda_backend, name)


def fast_weight_sum(q, k, v, initial_state=None, output_final_state=False, impl="auto"):
    """Sum rule: S_t = S_{t-1} + k_t v_t^T, o_t = S_t^T q_t. Returns (o, final_state or None)."""
    check_causal_inputs(q, k, v, initial_state=initial_state, impl=impl)
    impl = _resolve(impl, q, v)
    if impl == "reference":
        return sum_rule_reference(q, k, v, initial_state, output_final_state)
    if impl == "chunked":
        return sum_rule_chunked(q, k, v, initial_state, output_final_state)
    return _cuda_fn("sum_rule_cuda", q)(q, k, v, initial_state, output_final_state)


def fast_weight_delta(q, k, v, beta, initial_state=None, output_final_state=False, impl="auto"):
    """Delta rule: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = S_t^T q_t.
    Returns (o, final_state or None)."""
    check_causal_inputs(q, k, v, beta, initial_state, impl=impl, with_beta=True)
    impl = _resolve(impl, q, v)
    if impl == "reference":
        return delta_rule_reference(q, k, v, beta, initial_state, output_final_state)
    if impl == "chunked":
        return delta_rule_chunked(q, k, v, beta, initial_state, output_final_state)
    return _cuda_fn("delta_rule_cuda", q)(q, k, v, beta, initial_state, output_final_state)
