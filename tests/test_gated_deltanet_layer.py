"""The parts of today's DeltaNet layer (--fwp-short-conv, --fwp-kernel silu, --fwp-output-norm)
and the Gated DeltaNet preset architectures: the layer equals a by-hand reference, the full
forward equals incremental decoding equals beam-search rescoring, a carried stream equals the
unbroken stream, and the flags off add no parameter. fp64 for the exactness comparisons."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fairseq")
import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.models.presets import GATED_DELTANET, gated_deltanet_flags  # noqa: E402
from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention  # noqa: E402
from fwp_fairseq.modules.feature_maps import l2_normalize  # noqa: E402
from fwp_fairseq.modules.short_conv import ShortConvolution  # noqa: E402
from fwp_fairseq.ops import fast_weight_delta, fast_weight_sum  # noqa: E402
from helpers import (assert_carried_stream_matches_whole, assert_incremental_close,
                     beam_search_matches_rescoring, build, fast_layers, lm_full_and_incremental,
                     mt_full_and_incremental, randomise_new_parts)  # noqa: E402

PRESET = gated_deltanet_flags()
TINY_LM = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-attention-heads", "4",
           "--decoder-ffn-embed-dim", "64"]
TINY_MT = ["--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-layers", "2",
           "--encoder-attention-heads", "4", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
           "--decoder-layers", "2", "--decoder-attention-heads", "4"]
L2_DELTA = ["--fwp-kernel", "identity", "--fwp-l2-normalize", "--fwp-update", "delta"]


# -- the parts ------------------------------------------------------------------------------

def test_short_conv_is_causal_depthwise_then_silu_and_continues_from_its_tail():
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4).double()
    x = torch.randn(11, 2, 6, dtype=torch.float64)
    y, tail = conv(x)
    w = conv.weight[:, 0]  # (C, K): tap K-1 multiplies x_t, tap K-1-j multiplies x_{t-j}
    ref = torch.stack([sum(w[:, 3 - j] * x[t - j] for j in range(4) if t - j >= 0) for t in range(11)])
    torch.testing.assert_close(y, F.silu(ref), rtol=1e-12, atol=1e-12)
    assert tail.shape == (2, 6, 3)
    torch.testing.assert_close(tail, x[-3:].permute(1, 2, 0))
    parts, tail = [], None
    for chunk in x.split([1, 2, 5, 3]):  # shorter and longer than the tail
        out, tail = conv(chunk, tail)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts), y, rtol=1e-12, atol=1e-12)
    # the hand-written backward: gradients to the input, the tail and the weight
    x, tail = x[:5].clone().requires_grad_(), tail.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, t, w: conv.__class__.forward(_with(conv, w), x, t)[0],
                                    (x, tail, conv.weight.detach().clone().requires_grad_()))


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("T", [1, 2, 6])
@pytest.mark.parametrize("mode", ["causal", "causal+tail", "centred"])
def test_short_conv_taps_and_gradients_at_every_kernel_and_length(K, T, mode):
    """The shifted multiply-adds against the taps written out, for sequences shorter and longer
    than the kernel, and the hand-written backward against gradcheck (input, tail, weight)."""
    torch.manual_seed(K * 10 + T)
    conv = ShortConvolution(3, K, causal=mode != "centred").double()
    x = torch.randn(T, 2, 3, dtype=torch.float64, requires_grad=True)
    tail = torch.randn(2, 3, K - 1, dtype=torch.float64, requires_grad=True) if mode == "causal+tail" else None
    w = conv.weight.detach().clone().requires_grad_()
    before = (K - 1) // 2 if mode == "centred" else K - 1
    seq = x if tail is None else torch.cat([tail.permute(2, 0, 1), x])
    offset = 0 if tail is None else K - 1  # x[t] sits at seq[t + offset]
    ref = torch.stack([sum(w[:, 0, j] * seq[t + offset + j - before] for j in range(K)
                           if 0 <= t + offset + j - before < seq.size(0)) for t in range(T)])
    y, new_tail = _with(conv, w)(x, tail)
    torch.testing.assert_close(y, F.silu(ref), rtol=1e-12, atol=1e-12)
    if mode != "centred":
        whole = seq if seq.size(0) >= K - 1 else torch.cat([seq.new_zeros(K - 1 - seq.size(0), 2, 3), seq])
        torch.testing.assert_close(new_tail, whole[whole.size(0) - (K - 1):].permute(1, 2, 0))
    inputs = (x, w) if tail is None else (x, w, tail)
    assert torch.autograd.gradcheck(lambda x, w, *t: _with(conv, w)(x, *t)[0], inputs)


def _with(conv, w):
    """conv with weight w (a leaf of gradcheck's own)."""
    clone = ShortConvolution(conv.channels, conv.kernel, conv.causal).double()
    del clone.weight
    clone.weight = w
    return clone


def test_centred_conv_for_the_encoder_ignores_padding():
    """--fwp-short-conv-encoder: output t sees t-1..t+2 (K = 4); a left-padded sentence gets the
    outputs of the sentence alone at its real positions."""
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4, causal=False).double()
    x = torch.randn(9, 2, 6, dtype=torch.float64)
    w = conv.weight[:, 0]
    ref = torch.stack([sum(w[:, j] * x[t + j - 1] for j in range(4) if 0 <= t + j - 1 < 9) for t in range(9)])
    torch.testing.assert_close(conv(x)[0], F.silu(ref), rtol=1e-12, atol=1e-12)
    att = FastWeightAttention(16, 2, self_attention=True, short_conv=4, output_norm="rms").double().eval()
    randomise_new_parts(att)
    alone = torch.randn(5, 1, 16, dtype=torch.float64)
    padded = torch.cat([torch.randn(3, 1, 16, dtype=torch.float64), alone])
    mask = torch.tensor([[True] * 3 + [False] * 5])
    with torch.no_grad():
        torch.testing.assert_close(att(padded, padded, padded, key_padding_mask=mask)[0][3:],
                                   att(alone, alone, alone)[0], rtol=1e-9, atol=1e-9)
    model, _ = build("fwp_transformer_tiny", ["--fwp-short-conv", "3", "--fwp-short-conv-encoder"])
    assert [a.short_conv is not None for a in fast_layers(model)] == [True, True, True, False, True, False]


def _layer_by_hand(att, x):
    """The layer's output from its parameters: short conv (taps by hand), phi, the ops'
    step-by-step reference, RMS norm and gate, output projection."""
    T, B, C = x.shape
    q, k, v = att.q_proj(x), att.k_proj(x), att.v_proj(x)
    if att.short_conv is not None:
        w = att.short_conv.weight[:, 0]
        K = w.size(1)
        xs = torch.cat([q, k, v], -1)
        conv = torch.stack([sum(w[:, K - 1 - j] * xs[t - j] for j in range(K) if t - j >= 0) for t in range(T)])
        q, k, v = F.silu(conv).split(C, -1)
    heads = lambda y: y.view(T, B, att.num_heads, -1).permute(1, 2, 0, 3)  # noqa: E731
    phi = {"identity": lambda y: y, "silu": F.silu}[att.feature_map_name]
    q, k, v = l2_normalize(phi(heads(q))), l2_normalize(phi(heads(k))), heads(v)
    g = att.gate(x) if att.gate is not None else None
    if att.update == "delta":
        beta = torch.sigmoid(att.beta_proj(x)).permute(1, 2, 0) * (2.0 if att.beta_range == "double" else 1.0)
        o, _ = fast_weight_delta(q, k, v, beta, impl="reference", g=g)
    else:
        o, _ = fast_weight_sum(q, k, v, impl="reference", g=g)
    if att.output_norm is not None:
        o = o / o.square().mean(-1, keepdim=True).add(att.eps).sqrt() * att.output_norm.weight
        if att.output_norm.gate_proj is not None:
            o = o * F.silu(heads(att.output_norm.gate_proj(x)))
    return att.out_proj(o.permute(2, 0, 1, 3).reshape(T, B, C))


@pytest.mark.parametrize("fmap, update, conv, norm, gate", [
    ("silu", "delta", 0, "none", "none"), ("identity", "delta", 4, "none", "none"),
    ("identity", "delta", 0, "rms", "none"), ("silu", "sum", 3, "rms-gated", "scalar"),
    ("identity", "delta", 4, "rms-gated", "scalar")])  # the last: Gated DeltaNet
@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_layer_equals_the_reference(fmap, update, conv, norm, gate, impl):
    torch.manual_seed(0)
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map=fmap, update=update,
                              l2_norm=True, gate=gate, beta_range="double" if update == "delta" else "unit",
                              short_conv=conv, output_norm=norm, impl=impl).double().eval()
    randomise_new_parts(att)
    x = torch.randn(37, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(att(x, x, x)[0], _layer_by_hand(att, x), rtol=1e-9, atol=1e-9)


def test_silu_features_are_signed_like_identity():
    att = FastWeightAttention(8, 2, self_attention=True, causal=True, feature_map="silu", update="sum")
    assert att.attn_normalize is False and att.phi_norm is None  # identity's rule
    with pytest.raises(ValueError, match="^sum_norm: silu features are signed"):
        FastWeightAttention(8, 2, self_attention=True, causal=True, feature_map="silu", sum_norm=True)


def test_output_norm_turns_the_attention_normaliser_off_and_refuses_it():
    att = FastWeightAttention(8, 2, self_attention=True, causal=True, update="sum", output_norm="rms")
    assert att.attn_normalize is False  # the sum rule's default would be on
    with pytest.raises(ValueError, match="^attn_normalize and output_norm rms contradict each other"):
        FastWeightAttention(8, 2, self_attention=True, update="sum", output_norm="rms", attn_normalize=True)
    # the normaliser divides each head's read-out by one positive scalar: the RMS norm removes it
    torch.manual_seed(0)
    plain = FastWeightAttention(16, 2, self_attention=True, causal=True, update="sum", output_norm="rms",
                                eps=0.0).double()
    x = torch.randn(9, 2, 16, dtype=torch.float64)
    without = plain(x, x, x)[0]
    plain.attn_normalize = True
    torch.testing.assert_close(plain(x, x, x)[0], without, rtol=1e-9, atol=1e-9)


def test_layer_errors():
    with pytest.raises(ValueError, match="^short_conv: only self-attention"):
        FastWeightAttention(8, 2, encoder_decoder_attention=True, short_conv=4)
    with pytest.raises(ValueError, match="^output_norm: expected one of"):
        FastWeightAttention(8, 2, self_attention=True, output_norm="layer")
    with pytest.raises(ValueError, match="^short_conv: kernel size must be >= 1"):
        ShortConvolution(8, -1)


@pytest.mark.parametrize("flags", [
    ["--fwp-short-conv", "4", *L2_DELTA], ["--fwp-output-norm", "rms-gated", "--fwp-update", "sum"],
    ["--fwp-kernel", "silu", "--fwp-l2-normalize", "--fwp-short-conv", "2", "--fwp-gate", "scalar"]])
def test_layer_carry_equals_one_long_segment(flags):
    model, _ = build("fwp_lm_tiny", flags)
    att = fast_layers(model)[0].double().eval()
    randomise_new_parts(att)
    x = torch.randn(23, 3, att.embed_dim, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = att(x, x, x)
        att.set_carry_state(True)
        parts = [att(c, c, c)[0] for c in x.split([5, 1, 2, 7, 8])]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-9, atol=1e-9)


def test_decoding_keeps_only_the_last_inputs():
    """Incremental decoding: the convolution's cache stays K-1 inputs per row (bounded memory)."""
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map="identity", l2_norm=True,
                              update="delta", short_conv=4).eval()
    state, x = {}, torch.randn(7, 3, 16)
    with torch.no_grad():
        for t in range(7):
            att(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)
            tail = att.get_incremental_state(state, "conv_tail")["tail"]
            assert tail.shape == (3, 48, 3)
        last = torch.cat([att.q_proj(x[4:]), att.k_proj(x[4:]), att.v_proj(x[4:])], -1)  # the last 3 steps
    torch.testing.assert_close(tail, last.permute(1, 2, 0))


def test_reset_carried_rows_restarts_the_convolution_too():
    torch.manual_seed(0)
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map="identity", l2_norm=True,
                              update="delta", short_conv=4).double().eval()
    randomise_new_parts(att)
    x = torch.randn(10, 2, 16, dtype=torch.float64)
    att.set_carry_state(True)
    with torch.no_grad():
        att(x[:6], x[:6], x[:6])
        att.reset_carried_rows(torch.tensor([True, False]), "eval")
        got = att(x[6:], x[6:], x[6:])[0]
        att.set_carry_state(False)
        fresh = att(x[6:, :1], x[6:, :1], x[6:, :1])[0]
        whole = att(x[:, 1:], x[:, 1:], x[:, 1:])[0][6:]
    torch.testing.assert_close(got[:, :1], fresh, rtol=1e-9, atol=1e-9)  # row 0 from zero: W and tail
    torch.testing.assert_close(got[:, 1:], whole, rtol=1e-9, atol=1e-9)  # row 1 went on


# -- models -----------------------------------------------------------------------------------

LM_VARIANTS = [["--fwp-short-conv", "4", *L2_DELTA], ["--fwp-output-norm", "rms"],
               ["--fwp-kernel", "silu", "--fwp-l2-normalize", "--fwp-update", "sum"],
               PRESET, [*PRESET, "--fwp-softmax-layers", "0"]]


@pytest.mark.parametrize("flags", LM_VARIANTS)
def test_incremental_equals_full_lm(flags):
    model, d = build("fwp_lm_tiny", flags)
    randomise_new_parts(model)
    full, inc = lm_full_and_incremental(model, d)  # fp64: exactness, not fp32 round-off
    assert_incremental_close(inc, full, hybrid="--fwp-softmax-layers" in flags)


def test_incremental_equals_full_mt_preset():
    model, d = build("fwp_transformer_gated_deltanet", TINY_MT)
    randomise_new_parts(model)
    full, inc = mt_full_and_incremental(model, d)
    assert_incremental_close(inc, full)


@pytest.mark.parametrize("arch, sizes", [("fwp_lm_gated_deltanet", TINY_LM),
                                         ("fwp_transformer_gated_deltanet", TINY_MT)])
def test_preset_beam_scores_match_rescoring(arch, sizes):
    """Beam search reorders the convolution tails with the fast-weight states (and, in the
    hybrid, a softmax layer's key/value cache)."""
    model, d = build(arch, [*sizes, "--fwp-softmax-layers", "1"])
    randomise_new_parts(model)
    model.double().eval()
    beam_search_matches_rescoring(model, d, "lm" in arch, beam_size=3, max_len_b=7)


def test_carried_stream_equals_the_unbroken_stream():
    """fwp_lm with the preset, carried over segments (as fwp_stream_lm feeds it), scores a stream
    as one forward pass over all of it does."""
    model, d = build("fwp_lm_tiny", [*PRESET, "--no-token-positional-embeddings"])
    randomise_new_parts(model)
    assert_carried_stream_matches_whole(model.double().eval(), d, 1e-9)


def test_preset_is_its_flags_and_flags_off_add_no_parameters():
    preset, _ = build("fwp_lm_gated_deltanet", TINY_LM)
    flags, _ = build("fwp_lm_tiny", PRESET)
    assert preset.state_dict().keys() == flags.state_dict().keys()
    att = fast_layers(preset)[0]
    assert (att.feature_map_name, att.update, att.phi_norm, att.beta_range) == ("identity", "delta", "l2", "double")
    assert att.short_conv.kernel == 4 and att.gate is not None and att.output_norm.kind == "rms-gated"
    assert GATED_DELTANET["fwp_short_conv"] == 4
    mt = fast_layers(build("fwp_transformer_gated_deltanet", TINY_MT)[0])
    assert all((a.short_conv is not None) == a.causal and a.output_norm is not None for a in mt)
    for arch in ("fwp_lm_tiny", "fwp_transformer_tiny"):
        plain, _ = build(arch)
        off, _ = build(arch, ["--fwp-short-conv", "0", "--fwp-output-norm", "none"])
        assert plain.state_dict().keys() == off.state_dict().keys()
        on, _ = build(arch, ["--fwp-short-conv", "4", "--fwp-output-norm", "rms-gated"])
        extra = set(on.state_dict()) - set(plain.state_dict())
        assert extra and all(".short_conv." in k or ".output_norm." in k for k in extra)


@pytest.mark.parametrize("arch, flags, message", [
    ("fwp_lm_tiny", ["--fwp-softmax-layers", "0,1", "--fwp-short-conv", "4"], "--fwp-short-conv: acts on"),
    ("fwp_transformer_tiny", ["--fwp-softmax-decoder-self-attn", "--fwp-short-conv", "4"],
     "--fwp-short-conv: acts on"),
    ("fwp_lm_gated_deltanet", [*TINY_LM, "--fwp-attn-normalize"],
     "--fwp-attn-normalize and --fwp-output-norm rms-gated contradict each other"),
])
def test_model_level_errors_name_the_flags(arch, flags, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        build(arch, flags)
