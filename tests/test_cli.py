"""The fairseq CLIs end to end on a tiny generated corpus, with --user-dir and no environment
variables of ours: preprocess, train (and resume), generate (beam 4, BLEU), interactive,
eval-lm (also --context-window), all loading our checkpoints under torch >= 2.6."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("fairseq")
from helpers import COMMON, TRAIN, run, torch_version  # noqa: E402


@pytest.fixture(scope="module")
def mt_checkpoint(corpus):
    save = corpus / "mt-ckpt"
    args = [corpus / "mt-bin", *COMMON, *TRAIN, "--arch", "fwp_transformer_tiny", "--fwp-kernel", "dpfp",
            "--fwp-update", "delta", "--fwp-dpfp-nu", "2", "--max-tokens", "400", "--save-dir", save,
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]
    out = run("fairseq-train", *args, "--max-update", "4")
    assert "num_updates 4" in out or "num_updates=4" in out or re.search(r"\| 4 \|", out) or "done training" in out
    assert (save / "checkpoint_last.pt").exists()
    # Resume: fairseq-train loads checkpoint_last.pt (model, optimizer, data position) and goes on.
    out = run("fairseq-train", *args, "--max-update", "6")
    assert re.search(r"[Ll]oaded checkpoint .*checkpoint_last\.pt.*4 updates", out), out[-3000:]
    assert "num_updates 6" in out or "done training" in out
    return save / "checkpoint_last.pt"


def test_mt_generate_beam_and_bleu(corpus, mt_checkpoint):
    out = run("fairseq-generate", corpus / "mt-bin", "--path", mt_checkpoint, *COMMON, "--beam", "4",
              "--batch-size", "4", "--gen-subset", "test", "--scoring", "sacrebleu",
              "--required-batch-size-multiple", "1")  # else fairseq drops the last, smaller batch
    assert len(re.findall(r"^H-\d+", out, re.M)) == 12
    assert re.search(r"Generate test with beam=4: BLEU", out)


def test_mt_interactive(corpus, mt_checkpoint):
    out = run("fairseq-interactive", corpus / "mt-bin", "--path", mt_checkpoint, *COMMON, "--beam", "4",
              "--source-lang", "src", "--target-lang", "tgt", stdin="a b c\nd e f g h\n")
    assert len(re.findall(r"^H-\d+", out, re.M)) == 2


@pytest.fixture(scope="module")
def lm_checkpoint(corpus):
    save = corpus / "lm-ckpt"
    run("fairseq-train", corpus / "lm-bin", *COMMON, *TRAIN, "--task", "language_modeling",
        "--arch", "fwp_lm_tiny", "--fwp-kernel", "linear", "--fwp-update", "delta", "--fwp-attn-normalize",
        "--tokens-per-sample", "32", "--sample-break-mode", "none", "--max-tokens", "256",
        "--max-update", "4", "--save-dir", save)
    return save / "checkpoint_last.pt"


def _ppl(out):
    m = re.search(r"Perplexity: ([0-9.]+)", out)
    assert m, out[-3000:]
    return float(m.group(1))


def test_lm_eval_lm_with_and_without_context_window(corpus, lm_checkpoint):
    base = [corpus / "lm-bin", "--path", lm_checkpoint, *COMMON, "--tokens-per-sample", "32",
            "--gen-subset", "test", "--max-tokens", "512"]
    plain = _ppl(run("fairseq-eval-lm", *base))
    windowed = _ppl(run("fairseq-eval-lm", *base, "--context-window", "16"))
    assert 1 < plain < 1e4 and 1 < windowed < 1e4


def test_options_survive_the_checkpoint(lm_checkpoint, mt_checkpoint):
    """The model rebuilt from the checkpoint has the options it was trained with; the torch.load
    fix is scoped to fairseq's loader (the MT checkpoint holds an argparse.Namespace)."""
    code = (
        "import sys, fairseq, fwp_fairseq; fwp_fairseq.register()\n"
        "from fairseq import checkpoint_utils\n"
        "from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention as F\n"
        "m = checkpoint_utils.load_model_ensemble([sys.argv[1]])[0][0]\n"
        "a = [x for x in m.modules() if isinstance(x, F)]\n"
        "print('LAYERS', len(a), {(x.feature_map_name, x.update, x.attn_normalize, x.phi_norm == 'sum') for x in a})\n"
        "import torch\n"
        "try:\n"
        "    torch.load(sys.argv[2])\n"
        "    print('TORCH_LOAD_UNCHANGED False')\n"
        "except Exception:\n"  # the fix is scoped to fairseq's loader: torch.load stays safe
        "    print('TORCH_LOAD_UNCHANGED True')\n")
    p = subprocess.run([sys.executable, "-c", code, str(lm_checkpoint), str(mt_checkpoint)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "LAYERS 2 {('linear', 'delta', True, True)}" in p.stdout
    if tuple(int(x) for x in torch_version().split(".")[:2]) >= (2, 6):
        assert "TORCH_LOAD_UNCHANGED True" in p.stdout
