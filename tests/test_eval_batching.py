"""Evaluation scores every sentence (fwp_fairseq/compat/eval_last_batch.py): fairseq's
batch_by_size drops a last batch whose size is not a multiple of --required-batch-size-multiple
(default 8); with the plugin loaded, fairseq-generate, validation and fairseq-validate keep it,
with --batch-size and with --max-tokens, while the training batches stay fairseq's own.
fairseq-interactive and fairseq-eval-lm batch with a multiple of 1 and lose nothing anyway.

The data: a copy task with 13 validation and 13 test sentences (13 is not a multiple of 8).
The controls run the same fairseq command with the shim switched off (NO_SHIM), to show that
the set is one fairseq cuts short."""
import os
import random
import re
import subprocess
import types

import numpy as np
import pytest

pytest.importorskip("fairseq")
from helpers import COMMON, TRAIN, WORDS, run, write_lines  # noqa: E402

import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.compat import eval_last_batch  # noqa: E402

N_EVAL = 13
HYPOTHESES = os.path.join(os.path.dirname(__file__), "..", "examples", "translation", "hypotheses.sh")
# The same fairseq CLI with the shim switched off before fairseq loads --user-dir.
NO_SHIM = ("import sys; import fwp_fairseq.compat.eval_last_batch as shim; shim.needed = lambda: False; "
           "from fairseq_cli.{tool} import cli_main; import fwp_fairseq; fwp_fairseq.register(); "
           "sys.exit(cli_main())")
TRAIN_WITH_VALID = [a for a in TRAIN if a != "--disable-validation"]
MODEL = ["--arch", "fwp_transformer_tiny", "--fwp-kernel", "dpfp", "--fwp-update", "delta",
         "--fwp-dpfp-nu", "2"]
_TIMING = re.compile(r"\b(wps|ups|train_wall|wall|gb_free)[ =][0-9.]+,?")


def run_without_shim(tool, *args, stdin=None):
    return run("python", "-c", NO_SHIM.format(tool=tool), *args, stdin=stdin)


def _original_batch_by_size():
    from fairseq.data import data_utils
    return eval_last_batch._original(data_utils.batch_by_size)


# -- batch_by_size, in process ----------------------------------------------------------------
@pytest.mark.parametrize("n,max_sentences,max_tokens,multiple", [
    (13, 8, None, 8), (13, None, 4000, 8), (461, 64, None, 8), (3003, None, 4096, 8), (5, 64, None, 8),
    (300, 16, None, 8), (40, 8, None, 8), (13, 8, None, 1), (17, None, 60, 4)])
def test_batch_by_size_keeps_the_tail_and_fairseqs_batches(n, max_sentences, max_tokens, multiple):
    from fairseq.data import data_utils
    rng = np.random.RandomState(n)
    lengths = rng.randint(1, 12, size=n).astype(np.int64)
    indices = np.argsort(lengths, kind="mergesort")
    kwargs = dict(num_tokens_vec=lengths[indices], max_tokens=max_tokens, max_sentences=max_sentences,
                  required_batch_size_multiple=multiple)
    fairseqs = _original_batch_by_size()(indices, lambda i: lengths[i], **kwargs)
    ours = data_utils.batch_by_size(indices, lambda i: lengths[i], **kwargs)
    assert np.array_equal(np.concatenate(ours), indices)  # every index, once, in order
    for a, b in zip(fairseqs, ours):  # fairseq's batches unchanged, at most one batch more
        assert np.array_equal(a, b)
    assert len(ours) - len(fairseqs) == (sum(map(len, fairseqs)) < n)
    for b in ours:
        assert max_sentences is None or len(b) <= max_sentences
        assert max_tokens is None or len(b) * lengths[b].max() <= max_tokens
    with eval_last_batch.fairseq_batching():  # the training batches: fairseq's exactly
        again = data_utils.batch_by_size(indices, lambda i: lengths[i], **kwargs)
    assert len(again) == len(fairseqs) and all(np.array_equal(a, b) for a, b in zip(again, fairseqs))


def test_the_shim_reports_what_it_restores(caplog):
    from fairseq.data import data_utils
    with caplog.at_level("INFO", logger=eval_last_batch.__name__):
        data_utils.batch_by_size(np.arange(461), lambda i: 1, num_tokens_vec=np.ones(461, dtype=np.int64),
                                 max_sentences=64, required_batch_size_multiple=8)
    assert [r.getMessage() for r in caplog.records] == [
        "kept the last batch (5 of 461 sentences) that fairseq's batch_by_size drops: its size is "
        "not a multiple of --required-batch-size-multiple 8"]


# -- the CLIs on 13 sentences -------------------------------------------------------------------
@pytest.fixture(scope="module")
def copy13(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval13")
    rng = random.Random(13)
    for split, n in (("train", 300), ("valid", N_EVAL), ("test", N_EVAL)):
        src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]
        write_lines(root / f"{split}.src", src)
        write_lines(root / f"{split}.tgt", [" ".join(reversed(s.split())) for s in src])
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
        "--destdir", root / "bin", "--workers", "1",
        *[x for s in ("train", "valid", "test") for x in (f"--{s}pref", root / s)])
    return root


def _train_args(root, save):
    # 300 training sentences at --batch-size 16: fairseq drops 4 of them (296 = 18 x 16 + 8);
    # validation: one batch of at most 16 sentences, so that its "bsz" is the sentence count.
    return [root / "bin", *COMMON, *TRAIN_WITH_VALID, *MODEL, "--batch-size", "16",
            "--batch-size-valid", "16", "--max-epoch", "1", "--save-dir", save]


def _train_inner(out):
    lines = [_TIMING.sub("", line[line.index("epoch"):]) for line in out.splitlines()
             if "train_inner" in line]
    assert lines, out[-3000:]
    return lines


def _valid_bsz(out):
    m = re.search(r"valid on 'valid' subset.*\| bsz ([0-9.]+)", out)
    assert m, out[-3000:]
    return float(m.group(1))


@pytest.fixture(scope="module")
def trained(copy13):
    out = run("fairseq-train", *_train_args(copy13, copy13 / "ckpt"))
    return copy13 / "ckpt" / "checkpoint_last.pt", out


def test_training_batches_unchanged_and_validation_counts_every_sentence(copy13, trained):
    _, out = trained
    plain = run_without_shim("train", *_train_args(copy13, copy13 / "ckpt-plain"))
    assert _train_inner(out) == _train_inner(plain)  # same batches, same losses, step by step
    assert len(_train_inner(out)) == 19  # fairseq's 296 of 300 training sentences, as before
    # Validation: fairseq alone scores one batch of 8 sentences; with the shim 8 + 5 (bsz is the
    # mean over batches; test_validation_iterator_yields_every_sentence counts them).
    assert _valid_bsz(plain) == 8
    assert _valid_bsz(out) == N_EVAL / 2
    assert "kept the last batch (5 of 13 sentences)" in out
    assert "kept the last batch" not in plain


def test_validation_iterator_yields_every_sentence(copy13):
    """fairseq-train's own validation path (Trainer.get_valid_iterator), counted batch by batch;
    the training iterator of the same trainer still drops what fairseq drops."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer
    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(
        parser, [str(copy13 / "bin"), *COMMON, *MODEL, "--batch-size", "16", "--max-tokens-valid", "4000"]))
    task = tasks.setup_task(cfg.task)
    task.load_dataset("valid")
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    valid = list(trainer.get_valid_iterator("valid").next_epoch_itr(shuffle=False))
    assert [b["nsentences"] for b in valid] == [8, 5]
    train = trainer.get_train_iterator(epoch=1).frozen_batches
    assert sum(map(len, train)) == 296 and len(train) == 19


def test_rebuilt_training_batches_stay_fairseqs():
    """--rebuild-batches (tasks that have it): fairseq makes the training batches later, once per
    epoch, through the iterator's batch_sampler; those too are built as fairseq builds them."""
    seen = []
    itr = types.SimpleNamespace(batch_sampler=lambda dataset, epoch: seen.append(
        eval_last_batch._building_train_batches.get()))
    wrapped = eval_last_batch._training_batches_as_fairseq(lambda trainer: itr)
    assert wrapped(None) is itr
    itr.batch_sampler(None, 1)
    assert seen == [True] and not eval_last_batch._building_train_batches.get()


def test_fairseq_validate_with_max_tokens_counts_every_sentence(copy13, trained):
    ckpt, _ = trained
    out = run("fairseq-validate", copy13 / "bin", "--path", ckpt, *COMMON, "--task", "translation",
              "--valid-subset", "valid",
              "--max-tokens", "4000")
    assert _valid_bsz(out) == N_EVAL  # it reduces all batches at once: bsz is the sentence count
    assert "kept the last batch (5 of 13 sentences)" in out


def _translated(out):
    m = re.search(r"Translated ([0-9,]+) sentences", out)
    assert m, out[-3000:]
    return int(m.group(1).replace(",", "")), sorted(int(i) for i in re.findall(r"^H-(\d+)", out, re.M))


def _hypotheses(generate_out, reference):
    """examples/translation/hypotheses.sh, as the recipes run it."""
    return subprocess.run(["bash", HYPOTHESES, generate_out, reference], capture_output=True, text=True)


@pytest.mark.parametrize("batching", [["--batch-size", "8"], ["--max-tokens", "4000"]])
def test_generate_translates_every_sentence(copy13, trained, batching, tmp_path):
    ckpt, _ = trained
    args = [copy13 / "bin", "--path", ckpt, *COMMON, "--beam", "2", "--gen-subset", "test", *batching]
    out = run("fairseq-generate", *args)
    assert _translated(out) == (N_EVAL, list(range(N_EVAL)))
    if batching[0] == "--batch-size":  # the control: fairseq alone translates 8 of 13
        plain = run_without_shim("generate", *args)
        count, ids = _translated(plain)
        assert count == len(ids) == 8
        # the recipes' check: the hypotheses in test order, or a stop with a clear error
        write_lines(tmp_path / "all", out.splitlines())
        write_lines(tmp_path / "part", plain.splitlines())
        ok = _hypotheses(tmp_path / "all", copy13 / "test.tgt")
        short = _hypotheses(tmp_path / "part", copy13 / "test.tgt")
        hyps = {int(i): h for i, h in re.findall(r"^H-(\d+)\t[^\t]*\t(.*)$", out, re.M)}
        assert ok.returncode == 0 and ok.stdout.splitlines() == [hyps[i] for i in range(N_EVAL)], ok.stderr
        assert short.returncode == 1 and not short.stdout
        assert "has 8 hypotheses for 8 sentences" in short.stderr and "13 reference sentences" in short.stderr


def test_interactive_translates_every_sentence(copy13, trained):
    ckpt, _ = trained
    lines = (copy13 / "test.src").read_text()
    args = [copy13 / "bin", "--path", ckpt, *COMMON, "--beam", "2", "--source-lang", "src",
            "--target-lang", "tgt", "--buffer-size", "16", "--batch-size", "8",
            "--required-batch-size-multiple", "8"]
    for out in (run("fairseq-interactive", *args, stdin=lines),
                run_without_shim("interactive", *args, stdin=lines)):  # fairseq alone: the same
        assert len(re.findall(r"^H-\d+", out, re.M)) == N_EVAL


def test_eval_lm_scores_every_token(tiny_lm_corpus):
    """fairseq-eval-lm batches with a multiple of 1 whatever the command line says: all 20
    sentences of the valid split (batches of 8, 8, 4), every token and end of sentence."""
    root, save = tiny_lm_corpus, tiny_lm_corpus / "eval13-lm"
    run("fairseq-train", root / "lm-bin", *COMMON, *TRAIN, "--task", "language_modeling",
        "--arch", "fwp_lm_tiny", "--tokens-per-sample", "16", "--sample-break-mode", "eos",
        "--batch-size", "8", "--max-update", "1", "--save-dir", save)
    args = [root / "lm-bin", "--path", save / "checkpoint_last.pt", *COMMON, "--gen-subset", "valid",
            "--sample-break-mode", "eos", "--tokens-per-sample", "16", "--batch-size", "8",
            "--required-batch-size-multiple", "8"]
    lines = (root / "valid.txt").read_text().splitlines()
    assert len(lines) % 8
    for out in (run("fairseq-eval-lm", *args), run_without_shim("eval_lm", *args)):  # fairseq alone too
        m = re.search(r"Evaluated ([0-9,]+) tokens", out)
        assert m, out[-3000:]
        assert int(m.group(1).replace(",", "")) == sum(len(line.split()) + 1 for line in lines)
