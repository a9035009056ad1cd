"""A run killed with SIGKILL at any moment, inside the save and the copy included
(tests/kill_train.py makes each moment reproducible), resumes with the same command: no
checkpoint it leaves is unreadable, every resume loads, and every update's logged loss equals
the uninterrupted run's (fwp_fairseq/compat/atomic_checkpoint_copy.py). A damaged
checkpoint_last.pt gives an error naming it and the newest intact checkpoint beside it."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fairseq")
from helpers import COMMON, TRAIN, per_update, run  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOTAL = 10  # an epoch is 6 updates: the runs cross an epoch boundary
# A checkpoint every 4 updates (none at the end of the epoch), validated, so that
# each save writes checkpoint_E_U.pt and copies it to checkpoint_best.pt (when better) and
# checkpoint_last.pt.
ARGS = [*COMMON, *[a for a in TRAIN if a != "--disable-validation"], "--task", "language_modeling",
        "--arch", "fwp_lm_tiny", "--tokens-per-sample", "32", "--sample-break-mode", "none",
        "--max-tokens", "256", "--fwp-kernel", "performer", "--fwp-update", "delta",
        "--fwp-performer-features", "8", "--dropout", "0.1", "--log-format", "json",
        "--max-update", str(TOTAL), "--save-interval-updates", "4", "--validate-interval-updates", "4",
        "--save-interval", "1000"]

# Moments of the fast chain, each in a process resumed from the previous one's last checkpoint:
# in update 5 (checkpoint_last.pt of update 4 in place); then, resumed from 4, halfway through
# the copy onto checkpoint_last.pt at update 8 (fairseq's plain copy leaves it truncated; the
# old one must survive); then in update 9, so that the last run resumes in epoch 2
# (compat/resume_batches.py).
FAST = ["step:5:before", "copy:2:mid", "step:5:before"]
# The full chain: before any update, at every step of the first save (checkpoint_1_4.pt, its
# copies to checkpoint_best.pt and checkpoint_last.pt), in training, inside later saves.
FULL = ["step:1:before", "save:1:mid", "rename:1:before", "rename:1:after", "copy:1:mid",
        "copy:2:mid", "replace:2:before", "replace:2:after", "step:2:before", "save:2:mid",
        "copy:1:mid", "replace:1:before", "rename:1:after"]


def train(data, save, moment=None):
    """(return code, output) of kill_train.py with the chain's arguments."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("FWP_KILL_AT", None)
    if moment:
        env["FWP_KILL_AT"] = moment
    p = subprocess.run([sys.executable, os.path.join(HERE, "kill_train.py"), data, *map(str, ARGS),
                        "--save-dir", str(save)], capture_output=True, text=True, env=env, timeout=600)
    return p.returncode, p.stdout + p.stderr


def restored_from(out):
    m = re.search(r"[Ll]oaded checkpoint .* \(epoch \d+ @ (\d+) updates\)", out)
    return int(m.group(1)) if m else 0


def unreadable(save):
    bad = []
    for name in sorted(os.listdir(save)):
        if name.startswith("checkpoint") and name.endswith(".pt"):
            try:
                torch.load(save / name, weights_only=False)  # our own files
            except Exception as e:
                bad.append(f"{name}: {type(e).__name__}")
    return bad


@pytest.fixture(scope="module")
def uninterrupted(tiny_lm_corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("uninterrupted")
    rc, out = train(tiny_lm_corpus / "lm-bin", save)
    assert rc == 0, out[-3000:]
    losses = per_update(out)
    assert sorted(losses) == list(range(1, TOTAL + 1))
    last = torch.load(save / "checkpoint_last.pt", weights_only=False)["extra_state"]["train_iterator"]
    assert last["epoch"] == 2 and last["iterations_in_epoch"] > 0, last  # mid-epoch 2
    return losses, save


def kill_and_resume(data, save, moments, expected):
    """Each moment kills a run resumed from the one before; then a run to the end. Returns the
    restore point of every run."""
    restored = []
    for moment in [*moments, None]:
        rc, out = train(data, save, moment)
        restored.append(restored_from(out))
        if moment is None:
            assert rc == 0, out[-3000:]
        else:
            assert rc == -signal.SIGKILL and f"FWP_KILLED {moment}" in out, (moment, rc, out[-3000:])
            assert unreadable(save) == [], (moment, os.listdir(save))
        got = per_update(out)
        assert sorted(got) == list(range(restored[-1] + 1, restored[-1] + 1 + len(got))), moment
        assert {u: expected[u] for u in got} == got, moment
    assert restored[-1] < TOTAL and max(per_update(out)) == TOTAL
    return restored


def test_killed_runs_resume_identically(tiny_lm_corpus, tmp_path, uninterrupted):
    restored = kill_and_resume(tiny_lm_corpus / "lm-bin", tmp_path, FAST, uninterrupted[0])
    assert restored == [0, 4, 4, 8], restored


@pytest.mark.slow
def test_killed_runs_resume_identically_at_every_moment(tiny_lm_corpus, tmp_path, uninterrupted):
    restored = kill_and_resume(tiny_lm_corpus / "lm-bin", tmp_path, FULL, uninterrupted[0])
    assert len(FULL) >= 10 and restored == [0] * 8 + [4, 4, 8, 8, 8, 8], restored


def test_damaged_checkpoint_last_names_the_newest_intact_one(tiny_lm_corpus, tmp_path, uninterrupted):
    save = uninterrupted[1]
    for i, name in enumerate(("checkpoint_1_4.pt", "checkpoint_2_8.pt")):
        (tmp_path / name).write_bytes((save / name).read_bytes())
        os.utime(tmp_path / name, (1e9 + i, 1e9 + i))
    last = (save / "checkpoint_last.pt").read_bytes()
    (tmp_path / "checkpoint_last.pt").write_bytes(last[: len(last) // 2])  # a copy cut short
    out = run("fairseq-train", tiny_lm_corpus / "lm-bin", *ARGS, "--save-dir", tmp_path, fails=True)
    assert f"cannot read the checkpoint {tmp_path / 'checkpoint_last.pt'}" in out, out[-3000:]
    assert f"newest intact checkpoint beside it is {tmp_path / 'checkpoint_2_8.pt'}" in out
