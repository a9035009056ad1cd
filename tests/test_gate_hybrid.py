"""--fwp-gate, --fwp-beta-range and hybrid models (--fwp-softmax-layers,
--fwp-softmax-encoder-layers): the flags reach the layers, the layer equals the ops' step-by-step
reference, incremental decoding equals the full forward, beam scores equal a rescoring, the
carried state continues a gated recurrence, and the paper's models gain no parameter."""

import pytest
import torch

pytest.importorskip("fairseq")
from fairseq.modules.multihead_attention import MultiheadAttention  # noqa: E402

import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention  # noqa: E402
from fwp_fairseq.modules.gate import decayed_cumsum  # noqa: E402
from fwp_fairseq.ops import fast_weight_delta, fast_weight_sum  # noqa: E402
from helpers import (assert_incremental_close, beam_search_matches_rescoring, build, fast_layers,
                     lm_full_and_incremental, mt_full_and_incremental)  # noqa: E402

GATED_DOUBLE = ["--fwp-gate", "scalar", "--fwp-beta-range", "double", "--fwp-kernel", "identity",
                "--fwp-l2-normalize", "--fwp-update", "delta"]


def _randomise_gate(att, seed=0):
    """The gate starts input-independent (w = 0): give it weights, so that a_t varies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        att.gate.proj.weight.copy_(torch.randn(att.gate.proj.weight.shape, generator=g))
        att.gate.a_log.copy_(torch.randn(att.gate.a_log.shape, generator=g) * 0.5)


# -- flags reach the layers -------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["fwp_transformer_tiny", "fwp_lm_tiny"])
def test_gate_and_beta_range_reach_the_causal_layers(arch):
    model, _ = build(arch, GATED_DOUBLE)
    layers = fast_layers(model)
    causal = [a for a in layers if a.causal]
    assert causal and all(a.gate is not None and a.beta_range == "double" for a in causal)
    assert all(a.gate is None and a.beta_range == "unit" for a in layers if not a.causal)
    h = causal[0].num_heads
    g = causal[0].gate(torch.randn(5, 2, causal[0].embed_dim))
    assert g.shape == (2, h, 5) and bool((g <= 0).all())
    a = g.exp()  # a_t starts near 1 (Mamba's dt in [1e-3, 1e-1])
    assert bool((a > 0.9).all()) and bool((a < 1).all())


@pytest.mark.parametrize("arch", ["fwp_transformer_tiny", "fwp_lm_tiny"])
def test_flags_off_add_no_parameters(arch):
    plain, _ = build(arch)
    explicit, _ = build(arch, ["--fwp-gate", "none", "--fwp-beta-range", "unit", "--fwp-softmax-layers", ""])
    assert plain.state_dict().keys() == explicit.state_dict().keys()
    assert not any("gate" in k for k in plain.state_dict())
    ungated, _ = build(arch, ["--fwp-kernel", "identity", "--fwp-l2-normalize", "--fwp-update", "delta"])
    gated, _ = build(arch, GATED_DOUBLE)
    extra = set(gated.state_dict()) - set(ungated.state_dict())
    assert extra and all(".gate." in k for k in extra)


def test_hybrid_layers_keep_softmax_where_listed():
    model, _ = build("fwp_lm_tiny", ["--decoder-layers", "3", "--fwp-softmax-layers", "0,2"])
    kinds = [type(l.self_attn) for l in model.decoder.layers]
    assert kinds == [MultiheadAttention, FastWeightAttention, MultiheadAttention]
    model, _ = build("fwp_transformer_tiny", ["--fwp-softmax-layers", "1", "--fwp-softmax-encoder-layers", "0"])
    enc, dec = model.encoder.layers, model.decoder.layers
    assert isinstance(enc[0].self_attn, MultiheadAttention) and isinstance(enc[1].self_attn, FastWeightAttention)
    assert isinstance(dec[0].self_attn, FastWeightAttention) and isinstance(dec[0].encoder_attn, FastWeightAttention)
    # a softmax decoder layer is fairseq's layer: self- and encoder-decoder attention
    assert isinstance(dec[1].self_attn, MultiheadAttention) and isinstance(dec[1].encoder_attn, MultiheadAttention)


@pytest.mark.parametrize("arch, flags, message", [
    ("fwp_lm_tiny", ["--fwp-softmax-layers", "2"], "--fwp-softmax-layers: layer 2 does not exist"),
    ("fwp_lm_tiny", ["--fwp-softmax-layers", "a"], "--fwp-softmax-layers: expected"),
    ("fwp_transformer_tiny", ["--fwp-softmax-encoder-layers", "5"], "--fwp-softmax-encoder-layers: layer 5"),
    ("fwp_lm_tiny", ["--fwp-softmax-layers", "0,1", "--fwp-gate", "scalar"], "--fwp-gate: acts on"),
    ("fwp_transformer_tiny", ["--fwp-softmax-decoder-self-attn", "--fwp-update", "delta",
                              "--fwp-beta-range", "double"], "--fwp-beta-range: acts on"),
])
def test_model_level_errors_name_the_flag(arch, flags, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        build(arch, flags)


# -- the layer against the ops' reference -------------------------------------------------------

def _layer_by_hand(att, x):
    """What the layer should compute, from its own projections and the ops' step-by-step
    reference (the gated z normaliser as a plain loop)."""
    T, B, _ = x.shape
    q = att._phi(att._heads(att.q_proj(x), B))
    k = att._phi(att._heads(att.k_proj(x), B))
    v = att._heads(att.v_proj(x), B)
    g = att.gate(x).to(q.dtype) if att.gate is not None else None
    if att.update == "delta":
        beta = torch.sigmoid(att.beta_proj(x)).permute(1, 2, 0) * (2.0 if att.beta_range == "double" else 1.0)
        o, _ = fast_weight_delta(q, k, v, beta, impl="reference", g=g)
    else:
        o, _ = fast_weight_sum(q, k, v, impl="reference", g=g)
    if att.attn_normalize:
        z, zs = torch.zeros_like(k[:, :, 0]), []
        for t in range(T):
            z = (g[:, :, t, None].exp() if g is not None else 1.0) * z + k[:, :, t]
            zs.append(z)
        den = (torch.stack(zs, 2) * q).sum(-1, keepdim=True) + att.eps
        o = o / den
    return att.out_proj(o.permute(2, 0, 1, 3).reshape(T, B, att.embed_dim))


@pytest.mark.parametrize("fmap, update, beta_range, norm", [
    ("identity", "delta", "double", None), ("identity", "delta", "unit", None),
    ("linear", "sum", "unit", None), ("dpfp", "sum", "unit", True)])
@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_gated_layer_equals_the_reference(fmap, update, beta_range, norm, impl):
    torch.manual_seed(0)
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map=fmap, update=update,
                              l2_norm=fmap == "identity", attn_normalize=norm, gate="scalar",
                              beta_range=beta_range, impl=impl).double().eval()
    _randomise_gate(att)
    x = torch.randn(37, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(att(x, x, x)[0], _layer_by_hand(att, x), rtol=1e-9, atol=1e-9)


def test_gated_gradients_reach_the_gate():
    torch.manual_seed(0)
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map="identity",
                              update="delta", l2_norm=True, gate="scalar", beta_range="double")
    x = torch.randn(9, 2, 16)
    att(x, x, x)[0].square().sum().backward()
    for p in (att.gate.proj.weight, att.gate.a_log, att.gate.dt_bias):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_decayed_cumsum_across_chunks():
    gen = torch.Generator().manual_seed(0)
    k = torch.rand(2, 3, 21, 4, generator=gen, dtype=torch.float64)
    g = -torch.rand(2, 3, 21, generator=gen, dtype=torch.float64) * 3
    z0 = torch.rand(2, 3, 1, 4, generator=gen, dtype=torch.float64)
    z, zs = z0[:, :, 0], []
    for t in range(21):
        z = g[:, :, t, None].exp() * z + k[:, :, t]
        zs.append(z)
    torch.testing.assert_close(decayed_cumsum(k, g, z0, chunk=5), torch.stack(zs, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("update, norm", [("delta", None), ("sum", True)])
def test_gated_carry_equals_one_long_segment(update, norm):
    torch.manual_seed(0)
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map="linear", update=update,
                              attn_normalize=norm, gate="scalar").double().eval()
    _randomise_gate(att)
    x = torch.randn(23, 3, 16, dtype=torch.float64)
    whole, _ = att(x, x, x)
    att.set_carry_state(True)
    parts = [att(c, c, c)[0] for c in x.split(5)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-9, atol=1e-9)


def test_layer_errors():
    with pytest.raises(ValueError, match="^gate: only causal"):
        FastWeightAttention(8, 2, self_attention=True, gate="scalar")
    with pytest.raises(ValueError, match="^beta_range: 'double' needs the delta rule"):
        FastWeightAttention(8, 2, self_attention=True, causal=True, update="sum", beta_range="double")
    with pytest.raises(ValueError, match="^gate: expected"):
        FastWeightAttention(8, 2, self_attention=True, causal=True, gate="vector")


# -- models: incremental == full, beam search == rescoring, carried state ---------------------

def _close_in_fp64(inc, full, flags):
    assert_incremental_close(inc, full, hybrid=any(f.startswith("--fwp-softmax") for f in flags))


def _randomise_gates(model):
    for i, a in enumerate(fast_layers(model)):
        if a.gate is not None:
            _randomise_gate(a, i)


VARIANTS = [GATED_DOUBLE, ["--fwp-gate", "scalar", "--fwp-attn-normalize", "--fwp-update", "delta"],
            ["--fwp-gate", "scalar", "--fwp-update", "sum"], ["--fwp-softmax-layers", "1"],
            ["--fwp-softmax-layers", "0", *GATED_DOUBLE]]


@pytest.mark.parametrize("flags", VARIANTS)
def test_incremental_equals_full_lm(flags):
    model, d = build("fwp_lm_tiny", flags)
    _randomise_gates(model)
    full, inc = lm_full_and_incremental(model, d)  # fp64: exactness, not fp32 round-off
    _close_in_fp64(inc, full, flags)


@pytest.mark.parametrize("flags", [GATED_DOUBLE, ["--fwp-softmax-layers", "0", "--fwp-softmax-encoder-layers", "1",
                                                   "--fwp-gate", "scalar"]])
def test_incremental_equals_full_mt(flags):
    model, d = build("fwp_transformer_tiny", flags)
    _randomise_gates(model)
    full, inc = mt_full_and_incremental(model, d)
    _close_in_fp64(inc, full, flags)


@pytest.mark.parametrize("arch", ["fwp_transformer_tiny", "fwp_lm_tiny"])
def test_hybrid_beam_scores_match_rescoring(arch):
    """Beam search reorders a key/value cache and fast-weight states together."""
    is_lm = "lm" in arch
    model, d = build(arch, ["--fwp-softmax-layers", "1", *GATED_DOUBLE])
    _randomise_gates(model)
    model.eval()
    beam_search_matches_rescoring(model, d, is_lm, beam_size=3, max_len_b=7)


def test_carried_state_refuses_hybrids():
    model, _ = build("fwp_lm_tiny", ["--fwp-softmax-layers", "0", "--no-token-positional-embeddings"])
    with pytest.raises(ValueError, match="^--fwp-carry-state: not with a hybrid model"):
        model.set_carry_state(True)
