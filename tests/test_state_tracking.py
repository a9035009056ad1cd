"""Task state_tracking: strings and running sums from the seed, batches an LM trains on,
final-position accuracy at other lengths, option errors; one short fairseq-train (slow)."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("fairseq")
import fwp_fairseq  # noqa: E402

fwp_fairseq.register()
from fwp_fairseq.tasks.state_tracking import (StateTrackingTask, make_example, make_group_example,  # noqa: E402
                                              s3_table)
from helpers import PKG  # noqa: E402


def task(**kw):
    cfg = dict(modulus=2, train_length=8, valid_length=0, train_size=16, valid_size=4,
               tokens_per_sample=64, max_target_positions=None, seed=3)
    cfg.update(kw)
    return StateTrackingTask(argparse.Namespace(**cfg))


@pytest.mark.parametrize("modulus", [2, 5])
def test_targets_are_running_sums(modulus):
    x, y = make_example(np.random.default_rng(0), modulus, 50)
    assert x.min() >= 0 and x.max() < modulus
    assert all(y[t] == x[: t + 1].sum() % modulus for t in range(50))


def test_batches_are_lm_shaped_and_reproducible():
    t = task(modulus=5)
    t.load_dataset("train")
    t.load_dataset("valid")
    d = t.datasets["train"]
    batch = d.collater([d[i] for i in range(3)])
    src, tgt = batch["net_input"]["src_tokens"], batch["target"]
    assert src.shape == tgt.shape == (3, 8) and batch["ntokens"] == 24
    digits = src - t.offset
    assert torch.equal((digits.cumsum(1) % 5) + t.offset, tgt)
    assert [t.dictionary[i] for i in range(t.offset, t.offset + 5)] == ["0", "1", "2", "3", "4"]
    again = t.datasets["train"][0]["source"]
    d.set_epoch(2)
    assert torch.equal(task(modulus=5)._dataset(16, 8, 0, True)[0]["source"], again)  # pure in the seed
    assert not torch.equal(d[0]["source"], again)  # fresh strings every epoch
    v = t.datasets["valid"]
    v.set_epoch(2)
    first = v[0]["source"]
    v.set_epoch(3)
    assert torch.equal(v[0]["source"], first)  # validation is fixed


class _Oracle(torch.nn.Module):
    """Predicts the running sum exactly (or always "0"): what evaluate_lengths scores."""

    def __init__(self, t, right=True):
        super().__init__()
        self.t, self.right, self.w = t, right, torch.nn.Parameter(torch.zeros(1))

    def forward(self, src):
        m, off = self.t.cfg.modulus, self.t.offset
        pred = ((src - off).cumsum(1) % m) if self.right else torch.zeros_like(src)
        return torch.nn.functional.one_hot(pred + off, len(self.t.dictionary)).float(), None


def test_evaluate_lengths_scores_the_final_position():
    t = task()
    assert t.evaluate_lengths(_Oracle(t), [8, 33], num_strings=40, batch_size=16) == {8: 1.0, 33: 1.0}
    acc = t.evaluate_lengths(_Oracle(t, right=False), [200], num_strings=400)[200]
    assert 0.4 < acc < 0.6  # chance


@pytest.mark.parametrize("kw, flag", [(dict(modulus=1), "--modulus"), (dict(train_length=0), "--train-length"),
                                      (dict(valid_size=0), "--valid-size"), (dict(valid_length=-1), "--valid-length")])
def test_bad_options_name_the_flag(kw, flag):
    with pytest.raises(ValueError, match=f"^{flag}"):
        task(**kw)


# -- S3: composition of permutations of 3 elements ------------------------------------------

def test_s3_table_is_the_symmetric_group():
    names, table = s3_table()
    perms = [tuple(int(c) for c in n) for n in names]
    assert sorted(perms) == sorted(__import__("itertools").permutations(range(3))) and names[0] == "012"
    for a in range(6):
        for b in range(6):  # table[a, b] = b o a: apply a, then b
            assert perms[table[a, b]] == tuple(perms[b][perms[a][i]] for i in range(3))
    assert (table[0] == np.arange(6)).all() and (table[:, 0] == np.arange(6)).all()  # identity
    assert all(sorted(row) == list(range(6)) for row in table)  # every element invertible
    assert (table != table.T).any()  # not abelian
    assert all(table[table[a, b], c] == table[a, table[b, c]] for a in range(6) for b in range(6) for c in range(6))


def test_s3_targets_are_running_compositions():
    names, table = s3_table()
    perms = [tuple(int(c) for c in n) for n in names]
    x, y = make_group_example(np.random.default_rng(0), table, 40)
    assert x.min() >= 0 and x.max() < 6 and len(set(x.tolist())) == 6
    state = (0, 1, 2)
    for t in range(40):  # position i holds state[i]; the permutation x_t moves it on
        state = tuple(perms[x[t]][state[i]] for i in range(3))
        assert names[y[t]] == "".join(map(str, state))


class _S3Oracle(torch.nn.Module):
    def __init__(self, t):
        super().__init__()
        self.t, self.w = t, torch.nn.Parameter(torch.zeros(1))

    def forward(self, src):
        x = (src - self.t.offset).numpy()
        pred = np.zeros_like(x)
        for b in range(x.shape[0]):
            acc = 0
            for i in range(x.shape[1]):
                acc = self.t.table[acc, x[b, i]]
                pred[b, i] = acc
        return torch.nn.functional.one_hot(torch.from_numpy(pred) + self.t.offset, len(self.t.dictionary)).float(), None


def test_s3_task_batches_and_scoring():
    t = task(group="s3")
    assert [t.dictionary[i] for i in range(t.offset, t.offset + 6)] == s3_table()[0] and t.num_classes == 6
    t.load_dataset("train")
    d = t.datasets["train"]
    batch = d.collater([d[i] for i in range(3)])
    src, tgt = batch["net_input"]["src_tokens"] - t.offset, batch["target"] - t.offset
    assert src.shape == tgt.shape == (3, 8) and bool((src >= 0).all() and (src < 6).all())
    assert all(int(tgt[b, i]) == t.table[int(tgt[b, i - 1]), int(src[b, i])] for b in range(3) for i in range(1, 8))
    assert torch.equal(tgt[:, 0], src[:, 0])
    assert t.evaluate_lengths(_S3Oracle(t), [8, 50], num_strings=20, batch_size=8) == {8: 1.0, 50: 1.0}


@pytest.mark.parametrize("kw, flag", [(dict(group="s3", modulus=5), "--modulus"), (dict(group="s4"), "--group")])
def test_s3_bad_options_name_the_flag(kw, flag):
    with pytest.raises(ValueError, match=f"^{flag}"):
        task(**kw)


@pytest.mark.slow
def test_fairseq_train_runs_and_reports_final_acc(tmp_path):
    cmd = [os.path.join(os.path.dirname(sys.executable), "fairseq-train"), "--user-dir", PKG, "--cpu",
           "--task", "state_tracking", "--train-length", "16", "--train-size", "64", "--valid-size", "16",
           "--arch", "fwp_lm_tiny", "--no-token-positional-embeddings", "--fwp-kernel", "identity",
           "--fwp-l2-normalize", "--fwp-beta-range", "double", "--fwp-gate", "scalar",
           "--criterion", "cross_entropy", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "16",
           "--max-update", "4", "--save-dir", str(tmp_path), "--no-save", "--log-format", "simple"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "final_acc" in p.stdout + p.stderr
