"""Low-precision inputs: the state accumulates in fp32, outputs come back in the input dtype."""
import pytest
import torch

from fwp_fairseq.ops import fast_weight_delta, fast_weight_sum

from helpers import make_inputs


def rms_rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_half_precision_long_sequence(dtype, tol, rule):
    q, k, v, beta, _ = make_inputs(1, 2, 4096, 32, 32, dtype=torch.float32)
    low = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, beta)]
    # The fp32 reference sees the same (rounded) inputs: what is measured is the op's own error.
    ref = [x.detach().float().requires_grad_() for x in low]
    fn = fast_weight_sum if rule == "sum" else fast_weight_delta
    args_low = low[:3] if rule == "sum" else low
    args_ref = ref[:3] if rule == "sum" else ref
    o_low, s_low = fn(*args_low, output_final_state=True, impl="chunked")
    o_ref, s_ref = fn(*args_ref, output_final_state=True, impl="chunked")
    assert o_low.dtype == dtype and s_low.dtype == torch.float32
    assert torch.isfinite(o_low).all() and torch.isfinite(s_low).all()
    assert rms_rel(o_low, o_ref) < tol
    assert rms_rel(s_low, s_ref) < 1e-6  # the state never leaves fp32
    o_low.float().square().sum().backward()
    o_ref.square().sum().backward()
    for a, b in zip(args_low, args_ref):
        assert a.grad.dtype == dtype and torch.isfinite(a.grad).all()
        assert rms_rel(a.grad, b.grad) < 5 * tol


def test_dtypes_of_results():
    for dtype, acc in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                       (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        q, k, v, beta, _ = make_inputs(1, 1, 10, 4, 4, dtype=dtype, requires_grad=False)
        for impl in ("reference", "chunked"):
            o, s = fast_weight_delta(q, k, v, beta, output_final_state=True, impl=impl)
            assert o.dtype == dtype and s.dtype == acc
