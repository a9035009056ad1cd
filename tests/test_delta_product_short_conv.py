"""--fwp-short-conv K with --fwp-householder N > 1: the keys and values of DeltaProduct's extra
writes 1..N-1 go through a causal short convolution of their own (extra_writes.short_conv), as
write 0's through the layer's (flash-linear-attention's GatedDeltaProduct convolves all N writes'
keys and values). The layer equals a by-hand reference, its tail is kept by decoding (reordered
by beam search) and by the carried state, a padded sentence equals the sentence alone, either flag
alone adds no parameter, and a checkpoint from before (no such weight) fails to load saying why.
fp64 for the exactness comparisons."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fairseq")
import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention  # noqa: E402
from fwp_fairseq.modules.feature_maps import l2_normalize  # noqa: E402
from fwp_fairseq.ops import fast_weight_delta_product  # noqa: E402
from helpers import (assert_carried_stream_matches_whole, assert_incremental_close, assert_padded_batch_matches_alone,
                     beam_search_matches_rescoring, build, lm_full_and_incremental,
                     mt_full_and_incremental, randomise_new_parts)  # noqa: E402

PRODUCT = ["--fwp-kernel", "identity", "--fwp-l2-normalize", "--fwp-update", "delta",
           "--fwp-beta-range", "double", "--fwp-householder", "2"]
PRODUCT_CONV = PRODUCT + ["--fwp-short-conv", "4"]
GATED_CONV = PRODUCT_CONV + ["--fwp-gate", "scalar"]
EXACT = 1e-9


def layer(n=2, gate="none", conv=4, impl="chunked"):
    torch.manual_seed(0)
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map="identity", update="delta",
                              l2_norm=True, beta_range="double", gate=gate, householder=n, short_conv=conv,
                              impl=impl).double().eval()
    randomise_new_parts(att)
    return att


def _conv_by_hand(conv, x):
    """silu of the causal depthwise convolution of x (T, B, C), zeros before the start."""
    w = conv.weight[:, 0]
    K, T = w.size(1), x.size(0)
    return F.silu(torch.stack([sum(w[:, K - 1 - j] * x[t - j] for j in range(K) if t - j >= 0) for t in range(T)]))


def _layer_by_hand(att, x):
    """The layer's output from its parameters: both convolutions (taps by hand), the ops'
    step-by-step DeltaProduct reference, output projection."""
    T, B, C = x.shape
    H, D, n = att.num_heads, att.head_dim, att.num_householder
    ex = att.extra_writes
    q, k, v = _conv_by_hand(att.short_conv, torch.cat([att.q_proj(x), att.k_proj(x), att.v_proj(x)], -1)).split(C, -1)
    k2, v2 = _conv_by_hand(ex.short_conv, torch.cat([ex.k_proj(x), ex.v_proj(x)], -1)).split((n - 1) * C, -1)

    def writes(first, extra):  # (T, B, n, H, D) -> (B, H, T*n, D), write j of token t at t*n + j
        y = torch.cat([first.view(T, B, 1, H, D), extra.reshape(T, B, n - 1, H, D)], 2)
        return y.permute(1, 3, 0, 2, 4).reshape(B, H, T * n, D)

    logits = torch.cat([att.beta_proj(x).view(T, B, 1, H), ex.beta_proj(x).view(T, B, n - 1, H)], 2)
    beta = 2 * torch.sigmoid(logits).permute(1, 3, 0, 2).reshape(B, H, T * n)  # betas: not convolved
    g = None if att.gate is None else att.gate(x)
    o, _ = fast_weight_delta_product(l2_normalize(q.view(T, B, H, D).permute(1, 2, 0, 3)),
                                     l2_normalize(writes(k, k2)), writes(v, v2), beta, n, impl="reference", g=g)
    return att.out_proj(o.permute(2, 0, 1, 3).reshape(T, B, C))


# -- the layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("n, gate", [(2, "none"), (3, "scalar")])
@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_layer_equals_the_reference(n, gate, impl):
    att = layer(n, gate, impl=impl)
    x = torch.randn(21, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(att(x, x, x)[0], _layer_by_hand(att, x), rtol=EXACT, atol=EXACT)


def test_the_extra_writes_are_convolved():
    """Their convolution has its own weights (N-1 keys' and values' channels), which change the
    output and get gradients."""
    att = layer(3)
    conv = att.extra_writes.short_conv
    assert conv.weight.shape == (2 * 2 * 16, 1, 4) and conv.causal
    assert "extra_writes.short_conv.weight" in att.state_dict()
    x = torch.randn(9, 2, 16, dtype=torch.float64)
    before = att(x, x, x)[0]
    before.square().sum().backward()
    assert bool(conv.weight.grad.abs().sum() > 0)
    with torch.no_grad():
        conv.weight.mul_(-1.5)
        assert (att(x, x, x)[0] - before).abs().max() > 1e-3


def test_decoding_keeps_only_the_last_inputs():
    """Incremental decoding keeps the extra writes' tail beside the layer's: K-1 inputs per row."""
    att = layer(3)
    state, x = {}, torch.randn(7, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        for t in range(7):
            att(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)
            tail = att.get_incremental_state(state, "extra_conv_tail")["tail"]
            assert tail.shape == (3, 2 * 2 * 16, 3)
        ex = att.extra_writes
        last = torch.cat([ex.k_proj(x[4:]), ex.v_proj(x[4:])], -1)  # the last 3 steps
    torch.testing.assert_close(tail, last.permute(1, 2, 0))


@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_layer_carry_equals_one_long_segment(gate):
    att = layer(2, gate)
    x = torch.randn(23, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = att(x, x, x)
        att.set_carry_state(True)
        parts = [att(c, c, c)[0] for c in x.split([5, 1, 2, 7, 8])]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=EXACT, atol=EXACT)


def test_reset_carried_rows_restarts_the_extra_convolution_too():
    att = layer(2)
    x = torch.randn(10, 2, 16, dtype=torch.float64)
    att.set_carry_state(True)
    with torch.no_grad():
        att(x[:6], x[:6], x[:6])
        att.reset_carried_rows(torch.tensor([True, False]), "eval")
        got = att(x[6:], x[6:], x[6:])[0]
        att.set_carry_state(False)
        fresh = att(x[6:, :1], x[6:, :1], x[6:, :1])[0]
        whole = att(x[:, 1:], x[:, 1:], x[:, 1:])[0][6:]
    torch.testing.assert_close(got[:, :1], fresh, rtol=EXACT, atol=EXACT)  # row 0 from zero: W and both tails
    torch.testing.assert_close(got[:, 1:], whole, rtol=EXACT, atol=EXACT)  # row 1 went on


def test_left_padded_sentence_equals_the_sentence_alone():
    """Padding counts as zero input to both convolutions (and writes nothing)."""
    att = layer(2, "scalar")
    alone = torch.randn(5, 1, 16, dtype=torch.float64)
    padded = torch.cat([torch.randn(3, 1, 16, dtype=torch.float64), alone])
    mask = torch.tensor([[True] * 3 + [False] * 5])
    with torch.no_grad():
        torch.testing.assert_close(att(padded, padded, padded, key_padding_mask=mask)[0][3:],
                                   att(alone, alone, alone)[0], rtol=EXACT, atol=EXACT)


# -- models -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [PRODUCT_CONV, GATED_CONV, [*GATED_CONV, "--fwp-softmax-layers", "0"]])
def test_incremental_equals_full_lm(flags):
    model, d = build("fwp_lm_tiny", flags)
    randomise_new_parts(model)
    full, inc = lm_full_and_incremental(model, d)  # fp64: exactness, not fp32 round-off
    assert_incremental_close(inc, full, hybrid="--fwp-softmax-layers" in flags)


@pytest.mark.parametrize("flags", [PRODUCT_CONV, GATED_CONV])
def test_incremental_equals_full_mt(flags):
    model, d = build("fwp_transformer_tiny", flags)
    randomise_new_parts(model)
    full, inc = mt_full_and_incremental(model, d)
    assert_incremental_close(inc, full)


@pytest.mark.parametrize("arch, flags", [("fwp_lm_tiny", PRODUCT_CONV), ("fwp_lm_tiny", GATED_CONV),
                                         ("fwp_transformer_tiny", GATED_CONV)])
def test_beam_scores_match_rescoring(arch, flags):
    """Beam search reorders the extra writes' tails with the layer's tails and states."""
    model, d = build(arch, flags)
    randomise_new_parts(model)
    model.double().eval()
    beam_search_matches_rescoring(model, d, "lm" in arch, beam_size=3, max_len_b=7)


def test_carried_stream_equals_the_unbroken_stream():
    """fwp_lm carried over segments (as fwp_stream_lm --fwp-carry-state feeds it) scores a stream
    as one forward pass over all of it does."""
    model, d = build("fwp_lm_tiny", [*GATED_CONV, "--no-token-positional-embeddings"])
    randomise_new_parts(model)
    assert_carried_stream_matches_whole(model.double().eval(), d, EXACT)

def test_padded_batch_matches_sentence_alone():
    """fwp_transformer: a right-padded target (and left-padded source) as fairseq batches them."""
    model, d = build("fwp_transformer_tiny", GATED_CONV)
    randomise_new_parts(model)
    assert_padded_batch_matches_alone(model.double().eval(), d, EXACT)

# -- checkpoints ------------------------------------------------------------------------------

def test_either_flag_alone_adds_no_convolution_of_the_extra_writes():
    """Without both flags the state dict has the keys it had before the extra writes were
    convolved; with both, one weight per causal layer more."""
    base = PRODUCT[:-2]
    keys = {name: set(build("fwp_lm_tiny", flags)[0].state_dict()) for name, flags in [
        ("off", base), ("conv", base + ["--fwp-short-conv", "4"]), ("product", PRODUCT), ("both", PRODUCT_CONV)]}
    assert not any(".extra_writes." in k for k in keys["off"] | keys["conv"])
    assert not any(".extra_writes.short_conv." in k for k in keys["product"])
    assert keys["product"] - keys["off"] == {k for k in keys["product"] if ".extra_writes." in k}
    assert keys["conv"] - keys["off"] == {k for k in keys["conv"] if ".short_conv." in k}
    assert keys["both"] - keys["product"] - keys["conv"] == {
        f"decoder.layers.{i}.self_attn.extra_writes.short_conv.weight" for i in range(2)}


def test_checkpoint_without_the_extra_convolution_fails_saying_why():
    """A model trained with both flags before this version has no extra_writes.short_conv:
    fairseq's strict load fails, and the error says why."""
    model, _ = build("fwp_lm_tiny", PRODUCT_CONV)
    old = {k: v for k, v in model.state_dict().items() if ".extra_writes.short_conv." not in k}
    with pytest.raises(RuntimeError, match="trained with --fwp-householder 2 and --fwp-short-conv 4 by a version"):
        model.load_state_dict(old)
    model.load_state_dict(model.state_dict())  # its own loads
