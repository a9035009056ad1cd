"""The gated rules on low-precision inputs: the state and the decays stay in fp32, results and
gradients come back in the dtypes of the inputs."""
import pytest
import torch

from fwp_fairseq.ops import fast_weight_delta, fast_weight_sum

from helpers import log_decay, make_inputs

RULES = {"sum": fast_weight_sum, "delta": fast_weight_delta}


def rms_rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_gated_half_precision_long_sequence(dtype, rule):
    """T = 4096 in fp16 / bf16 against fp32 on the same (rounded) inputs: outputs and every
    gradient within 0.5% relative RMS (bf16's own rounding of the outputs is ~0.2%)."""
    q, k, v, beta, _ = make_inputs(1, 2, 4096, 32, 32, dtype=torch.float32)
    g = log_decay(1, 2, 4096, dtype=torch.float32)
    low = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, beta, g)]
    ref = [x.detach().float().requires_grad_() for x in low]
    if rule == "sum":
        low, ref = [*low[:3], low[4]], [*ref[:3], ref[4]]

    def run(xs):
        return RULES[rule](*xs[:-1], output_final_state=True, impl="chunked", g=xs[-1])

    o_low, s_low = run(low)
    o_ref, s_ref = run(ref)
    assert o_low.dtype == dtype and s_low.dtype == torch.float32
    assert torch.isfinite(o_low).all() and torch.isfinite(s_low).all()
    assert rms_rel(o_low, o_ref) < 5e-3
    assert rms_rel(s_low, s_ref) < 1e-6  # the state never leaves fp32
    (o_low.float().square().sum() + s_low.square().sum()).backward()
    (o_ref.square().sum() + s_ref.square().sum()).backward()
    for a, b in zip(low, ref):
        assert a.grad.dtype == dtype and torch.isfinite(a.grad).all()
        assert rms_rel(a.grad, b.grad) < 5e-3


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_gated_dtypes_of_results(impl):
    """g may have its own dtype (e.g. fp32 log-decays for bf16 features); dg comes back in it."""
    for dtype, acc in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                       (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        q, k, v, beta, _ = make_inputs(1, 1, 10, 4, 4, dtype=dtype)
        for g_dtype in (dtype, torch.float32):
            g = log_decay(1, 1, 10, dtype=g_dtype)
            o, s = fast_weight_delta(q, k, v, beta, output_final_state=True, impl=impl, g=g)
            assert o.dtype == dtype and s.dtype == acc
            (dg,) = torch.autograd.grad(o.float().sum() + s.sum(), g)
            assert dg.dtype == g_dtype


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("rule", ["sum", "delta"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_log_decays_are_not_rounded_to_the_inputs(impl, rule, dtype):
    """Half q, k, v with fp32 g decay the state exactly as fp32 inputs of the same values do
    (the same fp32 computation: equal final states); g rounded to the input dtype would be ~1e-3
    off (the layer's normaliser decays by the fp32 g)."""
    q, k, v, beta, _ = make_inputs(1, 2, 100, 8, 8, dtype=dtype, requires_grad=False)
    g = log_decay(1, 2, 100, dtype=torch.float32, requires_grad=False) * 8  # strong decays
    beta = None if rule == "sum" else beta
    args = [x for x in (q, k, v, beta) if x is not None]
    _, s_low = RULES[rule](*args, output_final_state=True, impl=impl, g=g)
    _, s_ref = RULES[rule](*(x.float() for x in args), output_final_state=True, impl=impl, g=g)
    assert s_low.dtype == torch.float32 and torch.equal(s_low, s_ref)
