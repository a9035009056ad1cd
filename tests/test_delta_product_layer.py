"""--fwp-householder N (DeltaProduct) in the models: the flag reaches the causal layers only,
N = 1 adds no parameter, the layer equals the ops' step loop, incremental decoding equals the
full forward, beam scores equal a rescoring, a carried stream equals the unbroken one, and
contradicting flags fail at start-up naming them. The op itself: tests/test_ops_delta_product.py."""
import argparse

import pytest
import torch

pytest.importorskip("fairseq")
import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.models.fwp_options import fwp_options  # noqa: E402
from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention  # noqa: E402
from fwp_fairseq.ops import fast_weight_delta_product  # noqa: E402
from helpers import (assert_incremental_close, beam_search_matches_rescoring, build, fast_layers,
                     lm_full_and_incremental, mt_full_and_incremental)  # noqa: E402

PRODUCT = ["--fwp-kernel", "identity", "--fwp-l2-normalize", "--fwp-update", "delta",
           "--fwp-beta-range", "double", "--fwp-householder", "2"]
GATED = PRODUCT + ["--fwp-gate", "scalar"]


def _randomise_gates(model):
    """Gates start input-independent (w = 0): give them weights, so that a_t varies."""
    g = torch.Generator().manual_seed(0)
    for a in fast_layers(model):
        if a.gate is not None:
            with torch.no_grad():
                a.gate.proj.weight.copy_(torch.randn(a.gate.proj.weight.shape, generator=g))


@pytest.mark.parametrize("arch", ["fwp_transformer_tiny", "fwp_lm_tiny"])
def test_householder_reaches_the_causal_layers_only(arch):
    model, _ = build(arch, PRODUCT)
    layers = fast_layers(model)
    assert all(a.num_householder == (2 if a.causal else 1) for a in layers)
    assert all((a.extra_writes is None) != a.causal for a in layers)
    plain, _ = build(arch, PRODUCT[:-2])
    explicit, _ = build(arch, PRODUCT[:-1] + ["1"])
    assert plain.state_dict().keys() == explicit.state_dict().keys()  # N = 1: no new parameter
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra and all(".extra_writes." in k for k in extra)


def _layer_by_hand(att, x):
    """The layer's output from its projections and the ops' step loop (reference)."""
    T, B, C = x.shape
    H, D, n = att.num_heads, att.head_dim, att.num_householder

    def heads(y):  # (T, B, n, H, D) -> (B, H, T*n, D), write j of token t at t*n + j
        return y.permute(1, 3, 0, 2, 4).reshape(B, H, T * n, D)

    ex = att.extra_writes
    k = torch.cat([att.k_proj(x).view(T, B, 1, H, D), ex.k_proj(x).view(T, B, n - 1, H, D)], 2)
    v = torch.cat([att.v_proj(x).view(T, B, 1, H, D), ex.v_proj(x).view(T, B, n - 1, H, D)], 2)
    logits = torch.cat([att.beta_proj(x).view(T, B, 1, H), ex.beta_proj(x).view(T, B, n - 1, H)], 2)
    beta = 2 * torch.sigmoid(logits).permute(1, 3, 0, 2).reshape(B, H, T * n)
    unit = torch.nn.functional.normalize
    q = unit(att.q_proj(x).view(T, B, H, D).permute(1, 2, 0, 3), dim=-1, eps=att.eps)
    g = None if att.gate is None else att.gate(x)
    o, _ = fast_weight_delta_product(q, unit(heads(k), dim=-1, eps=att.eps), heads(v), beta, n,
                                     impl="reference", g=g)
    return att.out_proj(o.permute(2, 0, 1, 3).reshape(T, B, C))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("gate", ["none", "scalar"])
@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_layer_equals_the_step_loop(n, gate, impl):
    torch.manual_seed(0)
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map="identity", update="delta",
                              l2_norm=True, beta_range="double", gate=gate, householder=n,
                              impl=impl).double().eval()
    x = torch.randn(21, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(att(x, x, x)[0], _layer_by_hand(att, x), rtol=1e-9, atol=1e-9)


def test_gradients_reach_every_write():
    torch.manual_seed(0)
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map="identity",
                              update="delta", l2_norm=True, beta_range="double", householder=3)
    x = torch.randn(9, 2, 16)
    att(x, x, x)[0].square().sum().backward()
    for p in att.extra_writes.parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)


@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_carried_stream_equals_the_unbroken_stream(gate):
    torch.manual_seed(0)
    att = FastWeightAttention(16, 2, self_attention=True, causal=True, feature_map="linear", update="delta",
                              gate=gate, householder=2).double().eval()
    if att.gate is not None:
        torch.nn.init.normal_(att.gate.proj.weight)
    x = torch.randn(23, 3, 16, dtype=torch.float64)
    whole, _ = att(x, x, x)
    att.set_carry_state(True)
    parts = [att(c, c, c)[0] for c in x.split(5)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("flags", [PRODUCT, GATED, PRODUCT[:-1] + ["3"],
                                   ["--fwp-update", "delta", "--fwp-householder", "2", "--fwp-softmax-layers", "0"]])
def test_incremental_equals_full_lm(flags):
    model, d = build("fwp_lm_tiny", flags)
    _randomise_gates(model)
    full, inc = lm_full_and_incremental(model, d)  # fp64: exactness, not fp32 round-off
    assert_incremental_close(inc, full, hybrid=any(f.startswith("--fwp-softmax") for f in flags))


@pytest.mark.parametrize("flags", [PRODUCT, GATED])
def test_incremental_equals_full_mt(flags):
    model, d = build("fwp_transformer_tiny", flags)
    _randomise_gates(model)
    full, inc = mt_full_and_incremental(model, d)
    assert_incremental_close(inc, full)


@pytest.mark.parametrize("arch, flags", [("fwp_lm_tiny", PRODUCT), ("fwp_lm_tiny", GATED),
                                         ("fwp_transformer_tiny", GATED)])
def test_beam_scores_match_rescoring(arch, flags):
    model, d = build(arch, flags)
    _randomise_gates(model)
    model.eval()
    beam_search_matches_rescoring(model, d, "lm" in arch, beam_size=3, max_len_b=7)


def _opts(**kw):
    return argparse.Namespace(**{f"fwp_{k}": v for k, v in kw.items()})


@pytest.mark.parametrize("kw, message", [
    (dict(update="delta", householder=0), "--fwp-householder: expected N >= 1"),
    (dict(update="sum", householder=2), "--fwp-householder: 2 writes per token need --fwp-update delta"),
    (dict(householder=2), "--fwp-householder: 2 writes per token need --fwp-update delta"),
    (dict(kernel="softmax", update="delta", householder=2), "--fwp-householder: --fwp-kernel softmax"),
    (dict(update="delta", householder=2, attn_normalize=True), "--fwp-householder: .* --fwp-attn-normalize"),
])
def test_contradicting_flags_fail_naming_them(kw, message):
    with pytest.raises(ValueError, match="^" + message) as e:
        fwp_options(_opts(**kw))
    assert "\n" not in str(e.value)


def test_no_causal_fast_layer_fails_naming_the_flag():
    with pytest.raises(ValueError, match="^--fwp-householder: acts on fast-weight decoder self-attention"):
        build("fwp_transformer_tiny", ["--fwp-update", "delta", "--fwp-householder", "2",
                                       "--fwp-softmax-decoder-self-attn"])


def test_layer_errors():
    with pytest.raises(ValueError, match="^householder: 2 writes per token need causal attention"):
        FastWeightAttention(8, 2, self_attention=True, update="delta", householder=2)
    with pytest.raises(ValueError, match="^householder: 2 writes per token need causal attention"):
        FastWeightAttention(8, 2, self_attention=True, causal=True, update="sum", householder=2)
    with pytest.raises(ValueError, match="^householder: DeltaProduct has no attention normaliser"):
        FastWeightAttention(8, 2, self_attention=True, causal=True, update="delta", attn_normalize=True,
                            householder=2)
    with pytest.raises(ValueError, match="^householder: expected an int >= 1"):
        FastWeightAttention(8, 2, self_attention=True, causal=True, update="delta", householder=0)
