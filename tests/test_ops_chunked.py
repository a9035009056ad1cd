"""The chunked fast paths against the step-by-step reference: outputs, final states, gradients."""
import pytest
import torch

from fwp_fairseq.ops import fast_weight_delta, fast_weight_sum

from helpers import make_inputs, rel_err, run_with_grads

RULES = {"sum": fast_weight_sum, "delta": fast_weight_delta}
# fp64 is the exactness check. fp32 compares two fp32 computations in different orders, each
# ~sqrt(T) eps32 (T <= 513: 1.4e-6) of the output's scale from exact; measured at most 1.2e-6
# between them and 1.1e-6 from fp64 (any gradient, gated or not), so 1e-5 is ~8x that.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("rule", ["sum", "delta"])
@pytest.mark.parametrize("T", [1, 7, 64, 100, 513])
@pytest.mark.parametrize("BH,Dk,Dv", [((1, 1), 16, 8), ((2, 3), 8, 12)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_matches_reference(rule, T, BH, Dk, Dv, with_state, dtype):
    q, k, v, beta, state = make_inputs(*BH, T, Dk, Dv, dtype=dtype, with_state=with_state)
    if rule == "sum":
        beta = None
    ref = run_with_grads(RULES[rule], q, k, v, beta, state, "reference")
    got = run_with_grads(RULES[rule], q, k, v, beta, state, "chunked")
    names = ["o", "final_state", "dq", "dk", "dv"] + (["dbeta"] if beta is not None else []) + (
        ["dstate"] if with_state else [])
    for name, a, b in zip(names, got, ref):
        assert a.dtype == b.dtype, name
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))


@pytest.mark.parametrize("rule", ["sum", "delta"])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_gradcheck(rule, impl):
    q, k, v, beta, state = make_inputs(1, 2, 9, 4, 3, with_state=True)
    if rule == "sum":
        fn = lambda q, k, v, s: torch.cat(  # noqa: E731
            [x.flatten() for x in fast_weight_sum(q, k, v, s, True, impl=impl)])
        args = (q, k, v, state)
    else:
        fn = lambda q, k, v, b, s: torch.cat(  # noqa: E731
            [x.flatten() for x in fast_weight_delta(q, k, v, b, s, True, impl=impl)])
        args = (q, k, v, beta, state)
    assert torch.autograd.gradcheck(fn, args)


def test_chunk_sizes_agree():
    """Chunk boundaries are invisible: any chunk size gives the reference result."""
    from fwp_fairseq.ops.delta_rule.chunked import delta_rule_chunked
    from fwp_fairseq.ops.sum_rule.chunked import sum_rule_chunked

    q, k, v, beta, state = make_inputs(2, 2, 77, 6, 5, with_state=True, requires_grad=False)
    ref_d = fast_weight_delta(q, k, v, beta, state, True, impl="reference")
    ref_s = fast_weight_sum(q, k, v, state, True, impl="reference")
    for C in (1, 5, 16, 77, 128):
        for got, ref in ((delta_rule_chunked(q, k, v, beta, state, True, chunk_size=C), ref_d),
                         (sum_rule_chunked(q, k, v, state, True, chunk_size=C), ref_s)):
            assert rel_err(got[0], ref[0]) < 1e-12 and rel_err(got[1], ref[1]) < 1e-12, C
