"""Public entry points: validate, then pick an implementation."""
import functools

from ._checks import check_causal_inputs
from .attention_order import causal_order
from .delta_rule.chunked import delta_rule_chunked
from .delta_rule.reference import delta_rule_reference
from .quadratic import delta_rule_quadratic, sum_rule_quadratic
from .sum_rule.chunked import sum_rule_chunked
from .sum_rule.reference import sum_rule_reference


def cuda_available():
    """(ok, reason): whether the compiled CUDA recurrence can run, and why not."""
    try:
        from . import cuda_backend
    except ImportError as e:  # the CUDA issue adds this module
        return False, f"the CUDA backend is not part of this build ({e})"
    return cuda_backend.available()


def _resolve(impl, rule, q, k, v, initial_state, output_final_state, g):
    """impl "auto": one step -> the reference update (decoding, on any device); no state in or
    out and no gate -> the attention order when attention_order.causal_order finds it cheaper;
    CUDA tensors -> the kernel auto_rule's table picks ("cuda-chunk", "cuda" or "chunked");
    else chunked."""
    if impl != "auto":
        return impl
    T, Dk, Dv = q.shape[2], k.shape[3], v.shape[3]
    if T == 1:
        return "reference"  # one decoding step: a single update, no chunking machinery
    if g is None and causal_order(rule, T, Dk, Dv, initial_state is not None,
                                  output_final_state) == "quadratic":
        return "quadratic"
    if q.is_cuda and cuda_available()[0]:
        from .auto_rule import choose_for  # the chunk or the sequential kernel, or chunked
        return choose_for(q, v, g)
    return "chunked"


def _cuda_fn(name, q, impl):
    """The CUDA backend's function; impl "cuda-chunk" (auto only) asks for the chunk kernels."""
    if not q.is_cuda:
        raise ValueError(f"impl: 'cuda' needs CUDA tensors, got q on {q.device}")
    ok, why = cuda_available()
    if not ok:
        raise RuntimeError(f"impl='cuda' is unavailable: {why}")
    from . import cuda_backend
    fn = getattr(cuda_backend, name)
    return functools.partial(fn, kernel="chunk") if impl == "cuda-chunk" else fn


def fast_weight_sum(q, k, v, initial_state=None, output_final_state=False, impl="auto", g=None):
    """Sum rule: S_t = S_{t-1} + k_t v_t^T, o_t = S_t^T q_t. Returns (o, final_state or None).

    g: optional log-decays (B, H, T), finite and <= 0: S_t = exp(g_t) S_{t-1} + k_t v_t^T
    (decayed linear attention). Values are checked for CPU tensors only (the check would make a
    GPU call wait for the device)."""
    check_causal_inputs(q, k, v, initial_state=initial_state, impl=impl, g=g)
    impl = _resolve(impl, "sum", q, k, v, initial_state, output_final_state, g)
    gated = {} if g is None else {"g": g}
    if impl == "quadratic":
        return sum_rule_quadratic(q, k, v), None
    if impl == "reference":
        return sum_rule_reference(q, k, v, initial_state, output_final_state, **gated)
    if impl == "chunked":
        return sum_rule_chunked(q, k, v, initial_state, output_final_state, **gated)
    return _cuda_fn("sum_rule_cuda", q, impl)(q, k, v, initial_state, output_final_state, **gated)


def fast_weight_delta(q, k, v, beta, initial_state=None, output_final_state=False, impl="auto", g=None):
    """Delta rule: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = S_t^T q_t.
    Returns (o, final_state or None).

    g: optional log-decays (B, H, T), finite and <= 0, for the gated delta rule
    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T, a_t = exp(g_t) (Gated DeltaNet).
    Values are checked for CPU tensors only (the check would make a GPU call wait for the device)."""
    check_causal_inputs(q, k, v, beta, initial_state, impl=impl, with_beta=True, g=g)
    impl = _resolve(impl, "delta", q, k, v, initial_state, output_final_state, g)
    gated = {} if g is None else {"g": g}
    if impl == "quadratic":
        return delta_rule_quadratic(q, k, v, beta), None
    if impl == "reference":
        return delta_rule_reference(q, k, v, beta, initial_state, output_final_state, **gated)
    if impl == "chunked":
        return delta_rule_chunked(q, k, v, beta, initial_state, output_final_state, **gated)
    return _cuda_fn("delta_rule_cuda", q, impl)(q, k, v, beta, initial_state, output_final_state, **gated)
