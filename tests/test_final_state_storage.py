"""A returned final state owns its memory: it keeps alive only its own bytes, never a buffer of
every chunk's state (a carried or decoding state lives for a whole stream or generation)."""
import pytest
import torch

from fwp_fairseq.ops import fast_weight_delta, fast_weight_sum

from helpers import log_decay, make_inputs

T = 200  # several chunks of 64


def kept_bytes(x):
    return x.untyped_storage().nbytes()


def own_bytes(x):
    return x.numel() * x.element_size()


@pytest.mark.parametrize("impl", ["reference", "chunked", "auto"])
@pytest.mark.parametrize("rule", ["sum", "delta"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_final_state_keeps_only_its_own_bytes(impl, rule, gated, grad, dtype):
    q, k, v, beta, state = make_inputs(2, 2, T, 8, 6, dtype=dtype, with_state=True, requires_grad=grad)
    g = log_decay(2, 2, T, dtype=torch.float32, requires_grad=grad) if gated else None
    with torch.set_grad_enabled(grad):
        if rule == "sum":
            o, final = fast_weight_sum(q, k, v, state, output_final_state=True, impl=impl, g=g)
        else:
            o, final = fast_weight_delta(q, k, v, beta, state, output_final_state=True, impl=impl, g=g)
    assert final.shape == (2, 2, 8, 6) and final.requires_grad == grad
    assert kept_bytes(final) == own_bytes(final), (kept_bytes(final) / own_bytes(final))


@pytest.mark.parametrize("update", ["sum", "delta"])
@pytest.mark.parametrize("gate", ["none", "scalar"])
@pytest.mark.parametrize("grad", [False, True])
def test_layer_carried_and_decoding_states_keep_only_their_own_bytes(update, gate, grad):
    pytest.importorskip("fairseq")
    from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention
    torch.manual_seed(0)
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map="dpfp", update=update,
                              attn_normalize=True, gate=gate, impl="chunked")
    x = torch.randn(T, 2, 16)
    att.set_carry_state(True)
    with torch.set_grad_enabled(grad):
        att(x, x, x)
        state = {}
        att(x, x, x, incremental_state=state)  # a whole prefix at once, then one step
        prefix = dict(att._get_input_buffer(state))
        att(x[:1], x[:1], x[:1], incremental_state=state)
    kept = [*att._carried["train"], *prefix.values(), *att._get_input_buffer(state).values()]
    for t in kept:
        assert kept_bytes(t) == own_bytes(t), (tuple(t.shape), kept_bytes(t) / own_bytes(t))
