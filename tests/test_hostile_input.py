"""Degenerate batches: length-1 sequences, all-padding rows, a batch of one, T = 16384 (finite,
memory linear in T), through FastWeightAttention and through the fairseq CLIs."""
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention

KERNELS = ("linear", "performer", "dpfp")
CAUSAL = [(k, u, n) for k in KERNELS for u in ("sum", "delta") for n in (False, True)]


def layer(kind, kernel="dpfp", update="sum", norm=None, dim=16):
    torch.manual_seed(0)
    kw = dict(feature_map=kernel, update=update, attn_normalize=norm, performer_features=8)
    if kind == "cross":
        return FastWeightAttention(dim, 2, encoder_decoder_attention=True, **kw)
    return FastWeightAttention(dim, 2, self_attention=True, causal=kind == "causal", **kw)


def run_and_backprop(a, q, kv, mask=None):
    q = q.clone().requires_grad_()
    out = a(q, kv, kv, key_padding_mask=mask)[0]
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in a.parameters() if p.grad is not None)
    return out


@pytest.mark.parametrize("kernel, update, norm", CAUSAL)
def test_length_one_and_batch_of_one_causal(kernel, update, norm):
    a = layer("causal", kernel, update, norm)
    for T, B in ((1, 3), (1, 1), (5, 1)):
        x = torch.randn(T, B, 16)
        run_and_backprop(a, x, None)


@pytest.mark.parametrize("kind", ["noncausal", "cross"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_length_one_and_batch_of_one_noncausal(kind, kernel):
    a = layer(kind, kernel)
    for T, S, B in ((1, 1, 2), (1, 1, 1), (4, 1, 1), (1, 6, 1)):
        q = torch.randn(T, B, 16)
        kv = q if kind == "noncausal" else torch.randn(S, B, 16)
        run_and_backprop(a, q, None if kind == "noncausal" else kv)


@pytest.mark.parametrize("kind", ["causal", "noncausal", "cross"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("norm", [False, True])
def test_all_padding_rows_give_finite_output(kind, kernel, norm):
    """A row whose keys are all padding writes nothing: its output is finite (zero state read)."""
    a = layer(kind, kernel, "delta" if kind == "causal" else "sum", norm)
    S = 5
    q = torch.randn(S if kind != "cross" else 3, 3, 16)
    kv = torch.randn(S, 3, 16)
    mask = torch.zeros(3, S, dtype=torch.bool)
    mask[1] = True  # row 1: all padding
    mask[2, :2] = True  # row 2: left padding
    out = run_and_backprop(a, q, None if kind != "cross" else kv, mask)
    if kind != "causal":  # nothing written: the read is exactly the output bias
        assert torch.allclose(out[:, 1], a.out_proj.bias.expand_as(out[:, 1]))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("update", ["sum", "delta"])
def test_very_long_sequence_is_finite(kernel, update):
    """T = 16384 through the layer (forward only here; backward in the memory test)."""
    a = layer("causal", kernel, update, dim=8)
    with torch.no_grad():
        out = a(torch.randn(16384, 1, 8), None, None)[0]
    assert out.shape == (16384, 1, 8) and torch.isfinite(out).all()


MEMORY_PROBE = r"""
import sys, torch
from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention

def hwm():  # VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's over exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

torch.set_num_threads(1)
a = FastWeightAttention(64, 4, self_attention=True, causal=True, feature_map="dpfp", update=sys.argv[1])
base = hwm()
for T in (4096, 16384):  # the shorter first: the high-water mark then belongs to the longer
    x = torch.randn(T, 1, 64, requires_grad=True)
    out = a(x, x, x)[0]
    out.square().mean().backward()
    ok = bool(torch.isfinite(out).all() and torch.isfinite(x.grad).all())
    print("PEAK", T, hwm() - base, ok)
    del x, out
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
@pytest.mark.parametrize("update", [pytest.param("sum", marks=pytest.mark.slow), "delta"])
def test_memory_is_linear_in_T(update):
    """Peak resident memory of forward + backward at T = 4096 and 16384 (in a fresh process):
    4x the length should cost about 4x the memory (an attention matrix would cost 16x)."""
    p = subprocess.run([sys.executable, "-c", MEMORY_PROBE, update], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    peaks = {int(t): (int(kb), ok == "True") for t, kb, ok in re.findall(r"PEAK (\d+) (\d+) (\w+)", p.stdout)}
    assert all(ok for _, ok in peaks.values()), p.stdout
    ratio = peaks[16384][0] / max(peaks[4096][0], 1)
    assert 2.0 < ratio < 6.0, f"peak memory {peaks}: ratio {ratio:.2f} for 4x the length"


# -- through the CLIs ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory):
    """One-token lines, a long line and everything between, binarised for LM and MT."""
    from helpers import WORDS, run, write_lines
    root = tmp_path_factory.mktemp("fwp_hostile")
    rng = random.Random(0)
    for split, n in (("train", 60), ("valid", 8), ("test", 8)):
        src = [rng.choice(WORDS) for _ in range(n // 2)]
        src += [" ".join(rng.choice(WORDS) for _ in range(rng.choice((1, 2, 3, 200)))) for _ in range(n - n // 2)]
        write_lines(root / f"{split}.src", src)
        write_lines(root / f"{split}.tgt", [" ".join(reversed(s.split())) for s in src])
        write_lines(root / f"{split}.txt", src)
    pre = ["--trainpref", root / "train", "--validpref", root / "valid", "--testpref", root / "test", "--workers", "1"]
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
        "--destdir", root / "mt-bin", *pre)
    run("fairseq-preprocess", "--only-source", "--destdir", root / "lm-bin", "--workers", "1",
        *[x for s in ("train", "valid", "test") for x in (f"--{s}pref", root / f"{s}.txt")])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kernel, update", [("dpfp", "delta"), ("performer", "sum")])
def test_lm_cli_one_token_sentences_batch_of_one(short_corpus, kernel, update):
    """eos-broken samples (padded batches of 2-token and 201-token sentences), batch size 1 and 4."""
    from helpers import COMMON, TRAIN, run
    save = short_corpus / f"lm-{kernel}-{update}"
    lm = ["--task", "language_modeling", "--sample-break-mode", "eos", "--tokens-per-sample", "256"]
    out = run("fairseq-train", short_corpus / "lm-bin", *COMMON, *TRAIN, *lm, "--arch", "fwp_lm_tiny",
              "--fwp-kernel", kernel, "--fwp-update", update, "--batch-size", "4", "--max-update", "6",
              "--save-dir", save, "--required-batch-size-multiple", "1")
    assert "nan" not in out.lower().replace("nan_", "")
    for bsz in ("1", "4"):
        out = run("fairseq-eval-lm", short_corpus / "lm-bin", "--path", save / "checkpoint_last.pt", *COMMON,
                  *lm, "--batch-size", bsz, "--gen-subset", "test", "--required-batch-size-multiple", "1")
        ppl = float(re.search(r"Perplexity: ([0-9.]+)", out).group(1))
        assert 1 < ppl < 1e6


@pytest.mark.slow
def test_mt_cli_one_token_sentences_batch_of_one(short_corpus):
    from helpers import COMMON, TRAIN, run
    save = short_corpus / "mt"
    run("fairseq-train", short_corpus / "mt-bin", *COMMON, *TRAIN, "--arch", "fwp_transformer_tiny",
        "--fwp-kernel", "dpfp", "--fwp-update", "delta", "--batch-size", "4", "--max-update", "6",
        "--save-dir", save, "--required-batch-size-multiple", "1", "--max-source-positions", "1024",
        "--max-target-positions", "1024")
    out = run("fairseq-generate", short_corpus / "mt-bin", "--path", save / "checkpoint_last.pt", *COMMON,
              "--beam", "2", "--batch-size", "1", "--gen-subset", "test", "--max-len-b", "10",
              "--required-batch-size-multiple", "1")
    assert len(re.findall(r"^H-\d+", out, re.M)) == 8
