"""The attention order (Q K^T) V against the state order: same outputs and gradients (fp64,
1e-10), padding masks, and the cost rule that picks between them."""
import pytest
import torch

from fwp_fairseq.ops import fast_weight_delta, fast_weight_noncausal, fast_weight_sum
from fwp_fairseq.ops.plan import causal_flops, causal_order, keep_factored, noncausal_flops, noncausal_order
from fwp_fairseq.ops.quadratic import delta_rule_quadratic, sum_rule_quadratic

from helpers import make_inputs, rel_err

TOL = 1e-10


def _grads(out, inputs, seed=7):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs)


def _compare(fn_a, fn_b, inputs):
    oa, ob = fn_a(*inputs), fn_b(*inputs)
    assert rel_err(oa, ob) < TOL
    for ga, gb in zip(_grads(oa, inputs), _grads(ob, inputs)):
        assert rel_err(ga, gb) < TOL


def _padding_mask(B, T):
    """Row 0 right-padded, row 1 left-padded, row 2 all padding, the rest none."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, T - 3:] = True
    mask[1, :2] = True
    mask[2, :] = True
    return mask


@pytest.mark.parametrize("Tq,Tk,Dk,Dv", [(7, 7, 12, 5), (3, 9, 8, 6), (10, 4, 32, 4)])
def test_noncausal_orders_agree_with_gradients(Tq, Tk, Dk, Dv):
    q, _, _, _, _ = make_inputs(4, 2, Tq, Dk, Dv, seed=1)
    _, k, v, _, _ = make_inputs(4, 2, Tk, Dk, Dv, seed=2)
    mask = _padding_mask(4, Tk)
    _compare(lambda q, k, v: fast_weight_noncausal(q, k, v, mask, order="quadratic")[0],
             lambda q, k, v: fast_weight_noncausal(q, k, v, mask, order="state")[0], (q, k, v))


def test_all_padding_row_reads_zero_in_both_orders():
    q, k, v, _, _ = make_inputs(3, 2, 5, 6, 4)
    mask = _padding_mask(3, 5)
    k = k.detach().clone()
    k[2] = float("nan")  # whatever sits under the padding is never read
    for order in ("quadratic", "state"):
        o, _ = fast_weight_noncausal(q, k, v, mask, order=order)
        assert torch.isfinite(o).all()
        assert (o[2] == 0).all()
        assert _grads(o, (q, v))[0].isfinite().all()


def test_noncausal_normaliser_is_the_row_sum_of_the_masked_scores():
    q, k, v, _, _ = make_inputs(3, 2, 6, 8, 4, requires_grad=False)
    mask = _padding_mask(3, 6)
    ones = torch.ones(3, 2, 6, 1, dtype=torch.float64)
    row_sum, _ = fast_weight_noncausal(q, k, ones, mask, order="quadratic")
    z = k.masked_fill(mask[:, None, :, None], 0).sum(2, keepdim=True)
    assert rel_err(row_sum, (q * z).sum(-1, keepdim=True)) < 1e-12


@pytest.mark.parametrize("T", [1, 5, 17])
def test_causal_sum_matches_state_order(T):
    q, k, v, _, _ = make_inputs(2, 3, T, 10, 6)
    _compare(lambda q, k, v: sum_rule_quadratic(q, k, v),
             lambda q, k, v: fast_weight_sum(q, k, v, impl="chunked")[0], (q, k, v))
    _compare(lambda q, k, v: sum_rule_quadratic(q, k, v),
             lambda q, k, v: fast_weight_sum(q, k, v, impl="reference")[0], (q, k, v))


@pytest.mark.parametrize("T", [1, 5, 17, 70])
def test_causal_delta_matches_state_order(T):
    q, k, v, beta, _ = make_inputs(2, 2, T, 9, 5)
    _compare(lambda q, k, v, b: delta_rule_quadratic(q, k, v, b),
             lambda q, k, v, b: fast_weight_delta(q, k, v, b, impl="chunked")[0], (q, k, v, beta))
    if T <= 17:
        _compare(lambda q, k, v, b: delta_rule_quadratic(q, k, v, b),
                 lambda q, k, v, b: fast_weight_delta(q, k, v, b, impl="reference")[0], (q, k, v, beta))


def test_causal_padded_keys_write_nothing():
    """The layer zeroes padded keys (and the delta rule's beta does not matter for them): the
    attention order reads the same as the state order on left- and right-padded rows."""
    q, k, v, beta, _ = make_inputs(3, 2, 8, 6, 4, requires_grad=False)
    mask = _padding_mask(3, 8)
    k = k.masked_fill(mask[:, None, :, None], 0.0)
    for fa, fb in ((lambda: delta_rule_quadratic(q, k, v, beta), lambda: fast_weight_delta(q, k, v, beta)[0]),
                   (lambda: sum_rule_quadratic(q, k, v), lambda: fast_weight_sum(q, k, v)[0])):
        oa, ob = fa(), fb()
        assert torch.isfinite(oa).all() and rel_err(oa, ob) < TOL


def test_fp32_inputs_accumulate_like_the_state_order():
    q, k, v, beta, _ = make_inputs(2, 2, 15, 32, 16, dtype=torch.float32, requires_grad=False)
    assert sum_rule_quadratic(q, k, v).dtype == torch.float32
    # two fp32 orders of T = 15 steps, each ~sqrt(T) eps32 ~ 5e-7 of the scale from exact: 1e-5
    assert rel_err(delta_rule_quadratic(q, k, v, beta), fast_weight_delta(q, k, v, beta)[0]) < 1e-5


def test_gradcheck_delta_quadratic():
    q, k, v, beta, _ = make_inputs(1, 1, 4, 3, 2)
    assert torch.autograd.gradcheck(delta_rule_quadratic, (q, k, v, beta))


# -- the cost rule --------------------------------------------------------------------------
def test_rule_picks_the_attention_order_for_short_sequences():
    # The shape: T = 15, d_dot 256 (DPFP nu=2, 64-dim heads) or 64 (linear).
    for Dk in (256, 64):
        assert noncausal_order(15, 15, Dk, 64) == "quadratic"
        assert causal_order("sum", 15, Dk, 64) == "quadratic"
        assert causal_order("delta", 15, Dk, 64) == "quadratic"
    assert noncausal_order(512, 512, 256, 64) == "state"
    assert causal_order("delta", 4096, 64, 64) == "state"


def test_rule_crossover_is_where_the_counts_cross():
    # Non-causal, Tq = Tk = T: quadratic while T (Dk + Dv) < 2 Dk Dv, i.e. T < 102.4 for 256 x 64.
    assert noncausal_order(102, 102, 256, 64) == "quadratic"
    assert noncausal_order(103, 103, 256, 64) == "state"
    f = noncausal_flops(15, 15, 256, 64)
    assert f == {"state": 30 * 256 * 64, "quadratic": 225 * 320}
    # Single chunk, no state: the state order pays the quadratic products and more.
    for T in (1, 32, 64):
        for rule in ("sum", "delta"):
            c = causal_flops(rule, T, 64, 64)
            assert c["quadratic"] < c["state"]


def test_rule_keeps_the_state_order_when_a_state_is_needed():
    assert causal_order("sum", 15, 256, 64, initial_state=True) == "state"
    assert causal_order("delta", 15, 256, 64, output_final_state=True) == "state"
    assert noncausal_order(15, 15, 256, 64, output_final_state=True) == "state"
    with pytest.raises(ValueError, match="order"):
        causal_order("sum", 15, 256, 64, initial_state=True, order="quadratic")
    with pytest.raises(ValueError, match="order"):
        noncausal_order(15, 15, 256, 64, output_final_state=True, order="quadratic")
    with pytest.raises(ValueError, match="order"):
        noncausal_order(15, 15, 256, 64, order="fast")
    with pytest.raises(ValueError, match="rule"):
        causal_flops("hebb", 15, 256, 64)


def test_keep_factored_bound():
    # d_dot Dv / (d_dot + Dv) = 51.2 for 256 x 64, 32 for 64 x 64.
    assert keep_factored(51, 256, 64) and not keep_factored(52, 256, 64)
    assert keep_factored(31, 64, 64) and not keep_factored(32, 64, 64)


def test_quadratic_input_errors():
    q, k, v, beta, _ = make_inputs(1, 1, 4, 3, 2, requires_grad=False)
    with pytest.raises(ValueError, match="beta"):
        delta_rule_quadratic(q, k, v, beta[..., :3])
    with pytest.raises(ValueError, match="k"):
        sum_rule_quadratic(q, k[..., :2], v)


@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_auto_dispatch_takes_the_cheaper_order(rule, monkeypatch):
    """impl="auto": the attention order exactly when causal_order says so (no state in or out,
    no gate), with the same outputs and gradients as the chunked state order."""
    import fwp_fairseq.ops.dispatch as d
    fn = fast_weight_sum if rule == "sum" else fast_weight_delta
    quad = sum_rule_quadratic if rule == "sum" else delta_rule_quadratic
    called = []
    monkeypatch.setattr(d, quad.__name__, lambda *a: called.append(1) or quad(*a))
    q, k, v, beta, h0 = make_inputs(2, 2, 9, 16, 8, with_state=True)
    args = (q, k, v) if rule == "sum" else (q, k, v, beta)
    assert causal_order(rule, 9, 16, 8) == "quadratic"
    _compare(lambda *x: fn(*x)[0], lambda *x: fn(*x, impl="chunked")[0], args)
    assert called
    called.clear()
    fn(*args, initial_state=h0)
    fn(*args, output_final_state=True)
    fn(*args, g=torch.zeros(2, 2, 9, dtype=q.dtype))
    fn(*(x[:, :, :1] for x in args))  # one step: the reference update
    assert not called
    q, k, v, beta, _ = make_inputs(1, 1, 200, 16, 8)  # long: the chunked state order
    assert causal_order(rule, 200, 16, 8) == "state"
    fn(*((q, k, v) if rule == "sum" else (q, k, v, beta)))
    assert not called
