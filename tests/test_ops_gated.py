"""The gated rules (a log-decay g): the reference against closed forms, the chunked forms against
the reference (outputs, final states, every gradient, g's included), chunk sizes, decoding.
Carried state: tests/test_ops_state.py (gated=True)."""
import pytest
import torch

from fwp_fairseq.ops import fast_weight_delta, fast_weight_sum

from helpers import log_decay, make_inputs, rel_err, run_with_grads

RULES = {"sum": fast_weight_sum, "delta": fast_weight_delta}
# fp64 is the exactness check. fp32 compares two fp32 computations in different orders, each
# ~sqrt(T) eps32 (T <= 513: 1.4e-6) of the output's scale from exact; measured at most 1.2e-6
# between them and 1.1e-6 from fp64 (any gradient, gated or not), so 1e-5 is ~8x that.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _args(rule, q, k, v, beta):
    return (q, k, v) if rule == "sum" else (q, k, v, beta)


def test_sum_reference_is_decayed_linear_attention():
    """o_t = exp(B_t) S_0^T q_t + sum_{s<=t} exp(B_t - B_s) (q_t . k_s) v_s, B the cumulative g."""
    q, k, v, _, state = make_inputs(2, 3, 30, 5, 4, with_state=True, requires_grad=False)
    g = log_decay(2, 3, 30, requires_grad=False)
    Bc = g.cumsum(-1)
    decay = (Bc[..., :, None] - Bc[..., None, :]).exp().tril()
    o_closed = (q @ k.transpose(-1, -2) * decay) @ v + Bc.exp()[..., None] * (q @ state)
    k_left = k * (Bc[..., -1:] - Bc).exp()[..., None]  # what is left of each write at the end
    S_closed = Bc[..., -1, None, None].exp() * state + k_left.transpose(-1, -2) @ v
    o, S = fast_weight_sum(q, k, v, state, True, impl="reference", g=g)
    assert rel_err(o, o_closed) < 1e-12 and rel_err(S, S_closed) < 1e-12


def test_delta_reference_is_gated_deltanet():
    """S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, the transition-matrix form."""
    q, k, v, beta, state = make_inputs(1, 2, 25, 4, 3, with_state=True, requires_grad=False)
    g = log_decay(1, 2, 25, requires_grad=False)
    S, outs = state, []
    eye = torch.eye(4, dtype=q.dtype)
    for t in range(25):
        kt, bt, at = k[:, :, t, :, None], beta[:, :, t, None, None], g[:, :, t, None, None].exp()
        S = at * (eye - bt * kt @ kt.transpose(-1, -2)) @ S + bt * kt @ v[:, :, t, None, :]
        outs.append((q[:, :, t, None, :] @ S)[:, :, 0])
    o, S_ref = fast_weight_delta(q, k, v, beta, state, True, impl="reference", g=g)
    assert rel_err(o, torch.stack(outs, 2)) < 1e-12 and rel_err(S_ref, S) < 1e-12


@pytest.mark.parametrize("rule", ["sum", "delta"])
@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 100])
@pytest.mark.parametrize("BH,Dk,Dv", [((1, 1), 16, 8), ((2, 3), 8, 12)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gated_chunked_matches_reference(rule, T, BH, Dk, Dv, with_state, dtype):
    q, k, v, beta, state = make_inputs(*BH, T, Dk, Dv, dtype=dtype, with_state=with_state)
    g = log_decay(*BH, T, dtype=dtype)
    if rule == "sum":
        beta = None
    ref = run_with_grads(RULES[rule], q, k, v, beta, state, "reference", log_g=g)
    got = run_with_grads(RULES[rule], q, k, v, beta, state, "chunked", log_g=g)
    names = (["o", "final_state", "dq", "dk", "dv"] + (["dbeta"] if beta is not None else [])
             + (["dstate"] if with_state else []) + ["dg"])
    assert len(got) == len(names)
    for name, a, b in zip(names, got, ref):
        assert a.dtype == b.dtype, name
        if not b.abs().max() > 0:  # T = 1 from a zero state: g decays nothing, dg is exactly 0
            assert a.abs().max() < TOL[dtype], (name, a)
            continue
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))


@pytest.mark.parametrize("rule", ["sum", "delta"])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_gated_gradcheck(rule, impl):
    q, k, v, beta, state = make_inputs(1, 2, 9, 4, 3, with_state=True)
    g = log_decay(1, 2, 9)

    def fn(*xs):
        *args, s, gg = xs
        return torch.cat([x.flatten() for x in RULES[rule](*args, s, True, impl=impl, g=gg)])

    assert torch.autograd.gradcheck(fn, (*_args(rule, q, k, v, beta), state, g))


@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_gated_chunk_sizes_agree(rule):
    """Chunk boundaries are invisible: any chunk size gives the reference result and gradients."""
    from fwp_fairseq.ops.delta_rule.chunked import delta_rule_chunked
    from fwp_fairseq.ops.sum_rule.chunked import sum_rule_chunked

    chunked = sum_rule_chunked if rule == "sum" else delta_rule_chunked
    q, k, v, beta, state = make_inputs(2, 2, 77, 6, 5, with_state=True)
    g = log_decay(2, 2, 77)
    ref = run_with_grads(RULES[rule], q, k, v, None if rule == "sum" else beta, state, "reference", log_g=g)
    for C in (1, 5, 16, 77, 128):
        def fn(*args, initial_state, output_final_state, impl, g):
            return chunked(*args, initial_state, output_final_state, chunk_size=C, g=g)
        got = run_with_grads(fn, q, k, v, None if rule == "sum" else beta, state, "chunked", log_g=g)
        for i, (a, b) in enumerate(zip(got, ref)):
            assert rel_err(a, b) < 1e-12, (C, i, rel_err(a, b))


@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_gated_one_step_at_a_time(rule):
    """Incremental decoding (impl="auto": one step is the reference) reproduces the chunked run."""
    q, k, v, beta, _ = make_inputs(1, 3, 20, 5, 4, requires_grad=False)
    g = log_decay(1, 3, 20, requires_grad=False)
    o_all, s_all = RULES[rule](*_args(rule, q, k, v, beta), None, True, impl="chunked", g=g)
    s, outs = None, []
    for t in range(20):
        args = [x[:, :, t:t + 1] for x in _args(rule, q, k, v, beta)]
        o, s = RULES[rule](*args, s, True, g=g[:, :, t:t + 1])
        outs.append(o)
    assert rel_err(torch.cat(outs, 2), o_all) < 1e-12 and rel_err(s, s_all) < 1e-12


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_zero_log_decay_is_the_ungated_rule(impl, rule):
    q, k, v, beta, state = make_inputs(2, 2, 70, 4, 5, with_state=True)
    b = None if rule == "sum" else beta
    ungated = run_with_grads(RULES[rule], q, k, v, b, state, impl)
    g = torch.zeros(2, 2, 70, dtype=q.dtype, requires_grad=True)
    gated = run_with_grads(RULES[rule], q, k, v, b, state, impl, log_g=g)
    for a, b_ in zip(gated, ungated):
        assert rel_err(a, b_) < 1e-12


@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_g_none_calls_the_ungated_functions_unchanged(rule, monkeypatch):
    """Without g nothing new reaches the implementations: today's code path, bit for bit."""
    import fwp_fairseq.ops.dispatch as d
    calls = []
    name = "sum_rule_chunked" if rule == "sum" else "delta_rule_chunked"
    monkeypatch.setattr(d, name, lambda *a, **kw: calls.append(kw) or (None, None))
    q, k, v, beta, _ = make_inputs(1, 1, 5, 3, 3, requires_grad=False)
    g = log_decay(1, 1, 5, requires_grad=False)
    # with a final state out: without one, short ungated calls take the attention order
    RULES[rule](*_args(rule, q, k, v, beta), output_final_state=True)
    RULES[rule](*_args(rule, q, k, v, beta), output_final_state=True, g=g)
    assert calls[0] == {} and calls[1]["g"] is g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_strong_decay_stays_finite(rule, dtype):
    """Decays down to exp(-1000) in a step: no exp of a large positive number anywhere, so the
    chunked forms stay finite and agree with the reference."""
    q, k, v, beta, state = make_inputs(1, 2, 150, 6, 4, dtype=dtype, with_state=True)
    g = log_decay(1, 2, 150, dtype=torch.float64, requires_grad=False)
    g[:, :, ::7] = -30.0
    g[:, 0, 40:45] = -1000.0
    g = g.to(dtype).requires_grad_()
    b = None if rule == "sum" else beta
    ref = run_with_grads(RULES[rule], q, k, v, b, state, "reference", log_g=g)
    got = run_with_grads(RULES[rule], q, k, v, b, state, "chunked", log_g=g)
    for i, (a, b_) in enumerate(zip(got, ref)):
        assert torch.isfinite(a).all(), i
        assert rel_err(a, b_) < TOL[dtype], (i, rel_err(a, b_))


@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_fixed_decays_need_no_dg(rule):
    """g without requires_grad (fixed decays, as in RetNet): the other gradients are unchanged."""
    q, k, v, beta, state = make_inputs(1, 2, 70, 4, 3, with_state=True)
    g = log_decay(1, 2, 70)
    b = None if rule == "sum" else beta
    with_dg = run_with_grads(RULES[rule], q, k, v, b, state, "chunked", log_g=g)
    fixed_g = g.detach()
    fixed = run_with_grads(lambda *a, **kw: RULES[rule](*a, g=fixed_g, **kw), q, k, v, b, state, "chunked")
    assert len(fixed) == len(with_dg) - 1
    assert all(torch.equal(a, b_) for a, b_ in zip(fixed, with_dg))
