"""Checkpoints: a run stopped and resumed logs the same per-update losses as an uninterrupted run
(fairseq restores the optimizer, the data position and the update-seeded RNG; FAVOR+ draws
depend only on the update number); a checkpoint trained with one --fwp-impl runs with another."""
import re
import shutil

import pytest
import torch

pytest.importorskip("fairseq")
from helpers import COMMON, TRAIN, per_update, run  # noqa: E402

import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention  # noqa: E402

LM = ["--task", "language_modeling", "--arch", "fwp_lm_tiny", "--tokens-per-sample", "32",
      "--sample-break-mode", "none", "--max-tokens", "256"]


def train_and_resume(corpus, save, kernel, update, total=10, stop=4, extra=()):
    """Uninterrupted run of `total` updates (checkpoint at `stop`), then a second run resumed
    from that checkpoint. An epoch is 7 updates here: the resume crosses an epoch boundary."""
    args = [corpus / "lm-bin", *COMMON, *TRAIN, *LM, "--log-format", "json", "--fwp-kernel", kernel,
            "--fwp-update", update, "--fwp-performer-features", "8", "--max-update", str(total), *extra]
    full = per_update(run("fairseq-train", *args, "--save-dir", save / "full",
                          "--save-interval-updates", str(stop)))
    (save / "resumed").mkdir()
    shutil.copy(save / "full" / f"checkpoint_1_{stop}.pt", save / "resumed" / "checkpoint_last.pt")
    out = run("fairseq-train", *args, "--save-dir", save / "resumed")
    assert re.search(rf"[Ll]oaded checkpoint .* \(epoch 1 @ {stop} updates\)", out), out[-3000:]
    return full, per_update(out)


@pytest.fixture(scope="module")
def resumed(tiny_lm_corpus, tmp_path_factory):
    """FAVOR+ with the delta rule and dropout 0.1: redraws, beta and dropout RNG all in play."""
    save = tmp_path_factory.mktemp("resume")
    full, resumed = train_and_resume(tiny_lm_corpus, save, "performer", "delta",
                                     extra=["--fwp-impl", "chunked", "--dropout", "0.1"])
    return full, resumed, save / "full" / "checkpoint_last.pt"


def test_resumed_run_logs_the_same_losses(resumed):
    full, after, _ = resumed
    assert sorted(full) == list(range(1, 11)) and sorted(after) == list(range(5, 11))
    assert {u: full[u] for u in after} == after


@pytest.mark.slow
@pytest.mark.parametrize("kernel, update", [("linear", "sum"), ("dpfp", "delta"), ("softmax", "sum")])
def test_resumed_run_logs_the_same_losses_other_kernels(tiny_lm_corpus, tmp_path, kernel, update):
    full, after = train_and_resume(tiny_lm_corpus, tmp_path, kernel, update)
    assert {u: full[u] for u in after} == after


def _load(path, overrides=None):
    from fairseq import checkpoint_utils
    models, _ = checkpoint_utils.load_model_ensemble([str(path)], arg_overrides=overrides)
    return models[0].eval()


def test_checkpoint_runs_with_another_impl(resumed):
    """Trained with --fwp-impl chunked; loaded with the override fwp_impl=reference (what
    --model-overrides "{'fwp_impl': 'reference'}" does in generate / eval-lm): same outputs."""
    path = resumed[2]
    # fp64: the two implementations reduce in different orders (fp32: CPU-dependent round-off)
    chunked, ref = _load(path).double(), _load(path, {"fwp_impl": "reference"}).double()
    assert {a.impl for a in ref.modules() if isinstance(a, FastWeightAttention)} == {"reference"}
    assert {a.impl for a in chunked.modules() if isinstance(a, FastWeightAttention)} == {"chunked"}
    tokens = torch.randint(4, 16, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = chunked(tokens)[0], ref(tokens)[0]
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), (a - b).abs().max()


@pytest.mark.slow
def test_eval_lm_model_overrides_impl(tiny_lm_corpus, resumed):
    base = [tiny_lm_corpus / "lm-bin", "--path", resumed[2], *COMMON, "--tokens-per-sample", "32",
            "--gen-subset", "test", "--max-tokens", "512"]
    ppl = [float(re.search(r"Perplexity: ([0-9.]+)", run("fairseq-eval-lm", *base, *o)).group(1))
           for o in ([], ["--model-overrides", "{'fwp_impl': 'reference'}"])]
    assert abs(ppl[0] - ppl[1]) <= 1e-2 * ppl[0]
