"""fwp_transformer and fwp_lm built in-process: options reach every layer, incremental decoding
equals the full forward, beam search scores match a rescoring, padding invariance, FAVOR+ draws."""

import pytest
import torch

pytest.importorskip("fairseq")
from fairseq.modules.multihead_attention import MultiheadAttention  # noqa: E402

import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention  # noqa: E402
from helpers import (assert_padded_batch_matches_alone, beam_search_matches_rescoring, build,  # noqa: E402
                     fast_layers, full_and_incremental, lm_full_and_incremental, random_tokens)

CASES = [(k, u) for k in ("linear", "performer", "dpfp") for u in ("sum", "delta")]


# Exactness checks run the model in fp64: two computations of the same function (incremental vs
# full, padded batch vs sentence alone) reduce in different orders, so in fp32 they agree only to
# round-off times depth, which differs between CPUs (AMD EPYC vs Intel); in fp64 that round-off
# is ~1e-15 and EXACT bounds it with a wide margin while any real difference (a leaked pad, a
# wrong state) is orders of magnitude larger.
EXACT = 1e-10


def kernel_args(kernel, update, norm=None):
    extra = ["--fwp-kernel", kernel, "--fwp-update", update, "--fwp-performer-features", "8"]
    if norm is True:
        extra.append("--fwp-attn-normalize")
    if norm is False:
        extra.append("--fwp-no-attn-normalize")
    return extra


# -- options reach the layers -------------------------------------------------------------

@pytest.mark.parametrize("arch", ["fwp_transformer_tiny", "fwp_lm_tiny"])
def test_every_option_reaches_every_layer(arch):
    extra = ["--fwp-kernel", "dpfp", "--fwp-update", "delta", "--fwp-dpfp-nu", "3",
             "--fwp-attn-normalize", "--fwp-sum-normalize", "--fwp-impl", "reference"]
    model, _ = build(arch, extra)
    layers = fast_layers(model)
    n_dec = len(model.decoder.layers)
    expected = n_dec if "lm" in arch else len(model.encoder.layers) + 2 * n_dec
    assert len(layers) == expected
    assert not any(isinstance(m, MultiheadAttention) for m in model.modules())
    for a in layers:
        assert a.feature_map_name == "dpfp" and a.feature_map.nu == 3 and a.feature_map.out_dim == 2 * a.head_dim * 3
        assert a.attn_normalize and a.phi_norm == "sum" and a.impl == "reference"
        assert a.update == ("delta" if a.causal else "sum")
    causal = [a for a in layers if a.causal]
    assert len(causal) == n_dec and all(a.beta_proj is not None for a in causal)


@pytest.mark.parametrize("arch", ["fwp_transformer_tiny", "fwp_lm_tiny"])
def test_performer_options_and_defaults(arch):
    model, _ = build(arch, ["--fwp-kernel", "performer", "--fwp-performer-features", "5",
                            "--fwp-no-attn-normalize", "--fwp-performer-seed", "7"])
    layers = fast_layers(model)
    assert layers and all(a.feature_map.num_features == 5 and a.feature_map.out_dim == 10 for a in layers)
    assert all(not a.attn_normalize and a.phi_norm == "sum" for a in layers)
    seeds = [a.feature_map.seed for a in layers]
    assert len(set(seeds)) == len(seeds)  # every layer and use draws its own features
    default_update = "delta" if "lm" in arch else "sum"  # Delta Net LM; the paper's MT used sum
    model, _ = build(arch)
    for a in fast_layers(model):
        assert a.feature_map_name == "linear" and a.update == (default_update if a.causal else "sum")
        assert a.attn_normalize == (a.update == "sum")
        assert (a.phi_norm == "sum") == (a.update == "delta")  # linear kernel: only with delta


def test_attention_types_switch_independently():
    model, _ = build("fwp_transformer_tiny", ["--fwp-softmax-encoder-self-attn", "--fwp-softmax-encoder-decoder-attn"])
    assert all(isinstance(l.self_attn, MultiheadAttention) for l in model.encoder.layers)
    assert all(isinstance(l.encoder_attn, MultiheadAttention) for l in model.decoder.layers)
    assert all(isinstance(l.self_attn, FastWeightAttention) for l in model.decoder.layers)
    model, _ = build("fwp_transformer_tiny", ["--fwp-softmax-decoder-self-attn"])
    assert all(isinstance(l.self_attn, MultiheadAttention) for l in model.decoder.layers)
    assert all(isinstance(l.encoder_attn, FastWeightAttention) for l in model.decoder.layers)


@pytest.mark.parametrize("arch", ["fwp_transformer_tiny", "fwp_lm_tiny"])
def test_softmax_kernel_is_fairseqs_model(arch):
    model, _ = build(arch, ["--fwp-kernel", "softmax"])
    assert not fast_layers(model)
    base_arch = "transformer" if "lm" not in arch else "transformer_lm"
    dims = ["--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-layers", "2",
            "--encoder-attention-heads", "4"] if "lm" not in arch else [
            "--decoder-input-dim", "32", "--decoder-output-dim", "32", "--decoder-normalize-before"]
    dims += ["--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-layers", "2",
             "--decoder-attention-heads", "4"]
    ref, _ = build(base_arch, dims)
    # Same parameter names and shapes: checkpoints are interchangeable with fairseq's.
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("flag, message", [
    (["--fwp-dpfp-nu", "0"], "--fwp-dpfp-nu"),
    (["--fwp-performer-features", "0"], "--fwp-performer-features"),
    (["--fwp-attn-normalize", "--fwp-no-attn-normalize"], "contradict"),
    (["--fwp-kernel", "performer", "--fwp-no-sum-normalize"], "--fwp-no-sum-normalize"),
])
def test_bad_options_fail_naming_the_flag(flag, message):
    with pytest.raises(ValueError, match=message):
        build("fwp_lm_tiny", flag)


def test_encoder_layer_runs_our_attention():
    """fairseq's encoder layer must call the swapped-in module (no fast path around it)."""
    model, d = build("fwp_transformer_tiny")
    model.eval()
    calls = []
    for layer in model.encoder.layers:
        layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
    src = random_tokens(d, 2, 5, torch.Generator().manual_seed(0))
    model.encoder(src, src_lengths=torch.tensor([5, 5]))
    assert len(calls) == len(model.encoder.layers)


# -- incremental decoding == full forward ---------------------------------------------------

@pytest.mark.parametrize("kernel, update", CASES)
@pytest.mark.parametrize("norm", [None, True])
def test_incremental_equals_full_mt(kernel, update, norm):
    model, d = build("fwp_transformer_tiny", kernel_args(kernel, update, norm))
    model.double().eval()
    g = torch.Generator().manual_seed(1)
    src = random_tokens(d, 3, 7, g)
    src[0, :2] = d.pad()  # fairseq left-pads sources
    enc = model.encoder(src, src_lengths=torch.tensor([5, 7, 7]))
    prev = torch.cat([torch.full((3, 1), d.eos()), random_tokens(d, 3, 8, g)], dim=1)
    with torch.no_grad():
        full, inc = full_and_incremental(model, prev, enc)
    torch.testing.assert_close(inc, full, atol=EXACT, rtol=EXACT)


@pytest.mark.parametrize("kernel, update", CASES)
@pytest.mark.parametrize("norm", [None, True])
def test_incremental_equals_full_lm(kernel, update, norm):
    model, d = build("fwp_lm_tiny", kernel_args(kernel, update, norm))
    full, inc = lm_full_and_incremental(model, d)  # fp64: exactness, not fp32 round-off
    torch.testing.assert_close(inc, full, atol=EXACT, rtol=EXACT)


# -- padding invariance ----------------------------------------------------------------------

@pytest.mark.parametrize("kernel, update", [("linear", "delta"), ("dpfp", "sum"), ("performer", "delta")])
def test_padded_batch_matches_sentence_alone(kernel, update):
    model, d = build("fwp_transformer_tiny", kernel_args(kernel, update, True))
    assert_padded_batch_matches_alone(model.double().eval(), d, EXACT)


# -- beam search ------------------------------------------------------------------------------

def _train_copy(model, d, is_lm, steps=30):
    """A few Adam steps on copying (MT) or repeating (LM) short sequences: outputs then vary in
    length, so that finished hypotheses leave the batch during beam search."""
    g = torch.Generator().manual_seed(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        n = 2 + step % 5  # lengths vary, so that the LM cannot know where a sequence ends
        x = random_tokens(d, 8, n, g)
        tgt = torch.cat([x, torch.full((8, 1), d.eos())], 1)
        prev = torch.cat([torch.full((8, 1), d.eos()), x], 1)
        if is_lm:
            out = model(prev)
        else:
            out = model(x, torch.full((8,), n), prev)
        lp = model.get_normalized_probs(out, log_probs=True)
        loss = -lp.gather(-1, tgt.unsqueeze(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("arch, kernel, update", [
    ("fwp_transformer_tiny", "dpfp", "delta"), ("fwp_transformer_tiny", "linear", "sum"),
    ("fwp_lm_tiny", "linear", "delta"), ("fwp_lm_tiny", "performer", "sum")])
def test_beam_search_scores_match_rescoring(arch, kernel, update):
    is_lm = "lm" in arch
    model, d = build(arch, kernel_args(kernel, update))
    _train_copy(model, d, is_lm)
    hypos = beam_search_matches_rescoring(model, d, is_lm, beam_size=4, max_len_b=9)
    assert all(len(beams) == 4 for beams in hypos)
    lens = {h["tokens"].numel() for beams in hypos for h in beams}
    if not is_lm:  # sources of different lengths: sentences finish at different steps
        assert len(lens) > 1



def test_sequence_generator_sets_the_beam_size_of_encoder_decoder_attention():
    """fairseq's SequenceGenerator tells the model its beam size only through the model's own
    set_beam_size (fairseq's TransformerModel has none): fwp_transformer passes it on to the
    fast-weight encoder-decoder attention, which then shares its memory between beams."""
    from fairseq.sequence_generator import SequenceGenerator
    model, d = build("fwp_transformer_tiny", kernel_args("linear", "sum"))
    SequenceGenerator([model], d, beam_size=4)
    cross = [a for a in fast_layers(model) if a.encoder_decoder_attention]
    assert cross and all(a.beam_size == 4 for a in cross)
    assert all(a.beam_size == 1 for a in fast_layers(model) if not a.encoder_decoder_attention)

@pytest.mark.slow  # two beam searches and rescorings: ~20 s on an idle 2-core machine
@pytest.mark.parametrize("kernel", ["dpfp", "linear"])
def test_beam_search_same_with_memory_shared_by_beams(kernel, monkeypatch):
    """The encoder-decoder memory kept once per sentence (beam_memory.py) gives the hypotheses
    of one memory row per beam: the same tokens, and scores that differ only by the summation
    order of the grouped read (fp32 round-off over a few layers: 1e-5 on log-probs)."""
    from fwp_fairseq.modules import fast_weight_attention
    model, d = build("fwp_transformer_tiny", kernel_args(kernel, "sum"))
    _train_copy(model, d, False)
    picked = []

    def spy(*args):
        picked.append(fast_weight_attention.one_row_per_sentence.__wrapped__(*args))
        return picked[-1]
    spy.__wrapped__ = fast_weight_attention.one_row_per_sentence
    monkeypatch.setattr(fast_weight_attention, "one_row_per_sentence", spy)
    shared = beam_search_matches_rescoring(model, d, False, beam_size=4, max_len_b=9)
    assert picked and all(p is not None for p in picked)  # every layer shared its memory
    monkeypatch.setattr(fast_weight_attention, "one_row_per_sentence", lambda *args: None)
    per_beam = beam_search_matches_rescoring(model, d, False, beam_size=4, max_len_b=9)
    for a, b in zip(shared, per_beam):
        assert [h["tokens"].tolist() for h in a] == [h["tokens"].tolist() for h in b]
        for ha, hb in zip(a, b):
            torch.testing.assert_close(ha["positional_scores"], hb["positional_scores"], atol=1e-5, rtol=0)

# -- FAVOR+ draws ----------------------------------------------------------------------------

def test_performer_redraws_in_training_only():
    model, d = build("fwp_lm_tiny", ["--fwp-kernel", "performer"])
    attn = fast_layers(model)[0]
    prev = random_tokens(d, 1, 4, torch.Generator().manual_seed(6))
    model.train()
    model.set_num_updates(3)
    model(prev)
    r3 = attn.feature_map.projection.clone()
    model(prev)  # same update (e.g. gradient accumulation): same draw
    assert torch.equal(attn.feature_map.projection, r3)
    model.set_num_updates(4)
    model(prev)
    r4 = attn.feature_map.projection.clone()
    assert not torch.equal(r4, r3)
    model.eval()
    model.set_num_updates(5)
    with torch.no_grad():
        out1 = model(prev)[0]
        out2 = model(prev)[0]
    assert torch.equal(attn.feature_map.projection, r4)  # fixed in evaluation
    assert torch.equal(out1, out2)
    # The draw is a function of (seed, update number) only: another model draws the same.
    other, _ = build("fwp_lm_tiny", ["--fwp-kernel", "performer"])
    other.train()
    other.set_num_updates(4)
    other(prev)
    assert torch.equal(fast_layers(other)[0].feature_map.projection, r4)


# -- named architectures ----------------------------------------------------------------------

@pytest.mark.parametrize("arch, target", [("fwp_lm_wiki103_small", 40e6), ("fwp_lm_wiki103_medium", 90e6)])
def test_wiki103_parameter_counts(arch, target):
    with torch.device("meta"):  # count without allocating the 267,735-word embedding
        model, _ = build(arch, ["--fwp-update", "delta", "--tokens-per-sample", "256"], vocab=267_735 - 4)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - target) / target < 0.15, n
    a = fast_layers(model)
    assert len(a) == 16 and a[0].num_heads == 8 and a[0].head_dim == (16 if "small" in arch else 32)


def test_wmt_big_architecture():
    with torch.device("meta"):
        model, _ = build("fwp_transformer_wmt_en_de_big", ["--fwp-kernel", "dpfp", "--fwp-dpfp-nu", "2"], vocab=100)
    a = fast_layers(model)
    assert len(a) == 6 + 2 * 6
    assert all(x.embed_dim == 1024 and x.num_heads == 16 and x.head_dim == 64 for x in a)
    assert a[0].feature_map.out_dim == 256  # the paper's DPFP nu=2 (d_dot 256)
    assert model.encoder.layers[0].fc1.out_features == 4096
