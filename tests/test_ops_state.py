"""Recurrent form == parallel form: running [x1; x2] at once equals x1, then x2 from the state."""
import pytest
import torch

from fwp_fairseq.ops import fast_weight_delta, fast_weight_sum

from helpers import log_decay, make_inputs, rel_err


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("rule", ["sum", "delta"])
@pytest.mark.parametrize("split", [1, 33, 64, 99])
@pytest.mark.parametrize("gated", [False, True])
def test_carry_state(impl, rule, split, gated):
    q, k, v, beta, state = make_inputs(2, 2, 100, 8, 6, with_state=True, requires_grad=False)
    g = log_decay(2, 2, 100, requires_grad=False) if gated else None

    def run(sl, s):
        kw = {} if g is None else {"g": g[:, :, sl]}
        if rule == "sum":
            return fast_weight_sum(q[:, :, sl], k[:, :, sl], v[:, :, sl], s, True, impl=impl, **kw)
        return fast_weight_delta(q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl], s, True, impl=impl, **kw)

    o_all, s_all = run(slice(None), state)
    o1, s1 = run(slice(0, split), state)
    o2, s2 = run(slice(split, None), s1)
    assert rel_err(torch.cat([o1, o2], dim=2), o_all) < 1e-12
    assert rel_err(s2, s_all) < 1e-12


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("gated", [False, True])
def test_one_step_at_a_time(impl, gated):
    """Incremental decoding: T steps of length 1 reproduce the whole sequence."""
    q, k, v, beta, _ = make_inputs(1, 3, 20, 5, 4, requires_grad=False)
    g = log_decay(1, 3, 20, requires_grad=False) if gated else None
    o_all, s_all = fast_weight_delta(q, k, v, beta, None, True, impl=impl, g=g)
    s, outs = None, []
    for t in range(20):
        o, s = fast_weight_delta(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], beta[:, :, t:t + 1],
                                 s, True, impl=impl, g=None if g is None else g[:, :, t:t + 1])
        outs.append(o)
    assert rel_err(torch.cat(outs, 2), o_all) < 1e-12 and rel_err(s, s_all) < 1e-12


def test_final_state_only_when_asked():
    q, k, v, beta, _ = make_inputs(1, 1, 5, 3, 3, requires_grad=False)
    assert fast_weight_sum(q, k, v)[1] is None
    assert fast_weight_delta(q, k, v, beta)[1] is None
    assert fast_weight_delta(q, k, v, beta, output_final_state=True)[1].shape == (1, 1, 3, 3)


def test_initial_state_zero_equals_none():
    q, k, v, beta, _ = make_inputs(2, 1, 30, 4, 4, requires_grad=False)
    z = torch.zeros(2, 1, 4, 4, dtype=q.dtype)
    for impl in ("reference", "chunked"):
        a = fast_weight_delta(q, k, v, beta, None, impl=impl)[0]
        b = fast_weight_delta(q, k, v, beta, z, impl=impl)[0]
        assert torch.equal(a, b)
