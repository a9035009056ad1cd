"""FactoredState: decoding one step at a time with the fast weight kept as its factors (K, U)
while that is smaller, folded into S after. Incremental == full forward in every form."""
import pytest
import torch

from fwp_fairseq.ops import fast_weight_delta, fast_weight_noncausal, fast_weight_sum
from fwp_fairseq.ops.factored_state import FactoredState

from helpers import make_inputs, rel_err

TOL = 1e-10


def _decode(q, k, v, beta=None, fold="auto", fold_at=None, reorder_each_step=False):
    """Outputs of step-by-step decoding through the buffer round trip, as the layer would."""
    buffer, outs, state = {}, [], None
    for t in range(q.shape[2]):
        state = FactoredState.from_buffer(buffer) or FactoredState()
        if reorder_each_step:
            state = state if state.empty else state.index_select(torch.arange(q.shape[0]))
        b = None if beta is None else beta[:, :, t:t + 1]
        state.append(k[:, :, t:t + 1], v[:, :, t:t + 1], b, z_key=k[:, :, t:t + 1], fold=fold)
        if fold_at == t:
            state.fold()
        outs.append(state.read(q[:, :, t:t + 1]))
        buffer = state.to_buffer()
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("rule", ["sum", "delta"])
@pytest.mark.parametrize("fold,fold_at", [("never", None), ("auto", None), ("now", None), ("never", 4)])
def test_incremental_equals_full_forward(rule, fold, fold_at):
    q, k, v, beta, _ = make_inputs(2, 3, 12, 6, 4)
    beta = beta if rule == "delta" else None
    o, state = _decode(q, k, v, beta, fold=fold, fold_at=fold_at)
    if rule == "delta":
        o_ref, S_ref = fast_weight_delta(q, k, v, beta, output_final_state=True, impl="reference")
    else:
        o_ref, S_ref = fast_weight_sum(q, k, v, output_final_state=True, impl="reference")
    assert rel_err(o, o_ref) < TOL
    assert rel_err(state.as_matrix(), S_ref) < TOL
    assert rel_err(state.z, k.sum(2, keepdim=True)) < TOL
    # 6 x 4 features: factors are smaller than S while t * 10 < 24, i.e. up to t = 2.
    assert state.factored == (fold == "never" and fold_at is None)


@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_gradients_through_factored_decoding(rule):
    q, k, v, beta, _ = make_inputs(1, 2, 6, 16, 3)
    beta = beta if rule == "delta" else None
    inputs = [x for x in (q, k, v, beta) if x is not None]
    w = torch.randn(1, 2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    o, _ = _decode(q, k, v, beta, fold="never")
    ga = torch.autograd.grad((o * w).sum(), inputs)
    fn = fast_weight_delta if rule == "delta" else fast_weight_sum
    o_ref, _ = fn(*inputs, impl="reference")
    gb = torch.autograd.grad((o_ref * w).sum(), inputs)
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < TOL


def test_auto_fold_bounds_the_memory():
    # 256 x 64 features: factored while t * 320 < 16384, i.e. for t <= 51, then one matrix.
    q, k, v, beta, _ = make_inputs(1, 1, 60, 256, 64, requires_grad=False)
    state = FactoredState()
    for t in range(60):
        state.append(k[:, :, t:t + 1], v[:, :, t:t + 1], beta[:, :, t:t + 1])
        assert state.factored == (t + 1 <= 51)
        stored = sum(x.numel() for x in state.to_buffer().values())
        assert stored <= 256 * 64
    o_ref, S_ref = fast_weight_delta(q, k, v, beta, output_final_state=True)
    assert rel_err(state.matrix, S_ref) < TOL
    assert rel_err(state.read(q[:, :, -1:]), o_ref[:, :, -1:]) < TOL


def test_beam_reorder_selects_rows_in_every_form():
    q, k, v, beta, _ = make_inputs(3, 2, 5, 8, 4, requires_grad=False)
    order = torch.tensor([2, 2, 0])
    for fold in ("never", "now"):
        _, state = _decode(q, k, v, beta, fold=fold, reorder_each_step=True)
        picked = state.index_select(order)
        assert rel_err(picked.as_matrix(), state.as_matrix()[order]) == 0
        assert rel_err(picked.z, state.z[order]) == 0
        # fairseq's layer reorders the buffer entry by entry: the same rows.
        buf = {n: x.index_select(0, order) for n, x in state.to_buffer().items()}
        assert rel_err(FactoredState.from_buffer(buf).read(q[order][:, :, :1]),
                       picked.read(q[order][:, :, :1])) == 0


@pytest.mark.parametrize("Tk,factored", [(2, True), (9, False)])
def test_encoder_decoder_memory_reads_like_noncausal(Tk, factored):
    q, _, _, _, _ = make_inputs(4, 2, 5, 8, 4, seed=1)
    _, k, v, _, _ = make_inputs(4, 2, Tk, 8, 4, seed=2)
    mask = torch.zeros(4, Tk, dtype=torch.bool)
    mask[0, -1], mask[1, 0], mask[2] = True, True, True  # right, left, all padding
    memory = FactoredState.written(k, v, mask, with_z=True)
    assert memory.factored == factored  # 8 x 4 features: factors while Tk * 12 < 32
    o = torch.cat([memory.read(q[:, :, t:t + 1]) for t in range(5)], dim=2)
    o_ref, _ = fast_weight_noncausal(q, k, v, mask, order="state")
    assert rel_err(o, o_ref) < TOL and (o[2] == 0).all()
    assert rel_err(memory.z, k.masked_fill(mask[:, None, :, None], 0).sum(2, keepdim=True)) < TOL
    w = torch.randn(o.shape, dtype=torch.float64)
    ga = torch.autograd.grad((o * w).sum(), (q, k, v))
    gb = torch.autograd.grad((o_ref * w).sum(), (q, k, v))
    assert all(rel_err(a, b) < TOL for a, b in zip(ga, gb))


def test_half_inputs_keep_an_fp32_state():
    q, k, v, beta, _ = make_inputs(1, 1, 3, 4, 2, dtype=torch.bfloat16, requires_grad=False)
    state = FactoredState().append(k[:, :, :1], v[:, :, :1], beta[:, :, :1])
    assert state.keys.dtype == torch.float32 and state.read(q[:, :, :1]).dtype == torch.bfloat16


def test_errors_name_the_argument():
    q, k, v, beta, _ = make_inputs(1, 1, 3, 4, 2, requires_grad=False)
    with pytest.raises(ValueError, match="read"):
        FactoredState().read(q)
    state = FactoredState().append(k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="one step"):
        state.append(k, v)
    with pytest.raises(ValueError, match="beta"):
        state.append(k[:, :, :1], v[:, :, :1], beta)
    with pytest.raises(ValueError, match="q"):
        state.read(q[..., :3])
    with pytest.raises(ValueError, match="v: expected 2 value features"):
        state.append(k[:, :, 1:2], torch.cat([v, v], -1)[:, :, 1:2])
    with pytest.raises(ValueError, match="fold"):
        state.append(k[:, :, 1:2], v[:, :, 1:2], fold="later")
    with pytest.raises(ValueError, match="key_padding_mask"):
        FactoredState.written(k, v, torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="keys, values"):
        FactoredState(keys=k)
    assert FactoredState.from_buffer({}) is None
    assert FactoredState.from_buffer({"fw_z": k}) is None
