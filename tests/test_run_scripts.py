"""The shell scripts: every one parses (bash -n), and run_carry_state.sh turns row names
(MODEL[_l2][_carry[N]|_stream]) into the right model and task flags."""
import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "**", "*.sh"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "scripts", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "experiments", "**", "*.sh"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "data-scripts", "*.sh")))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_script_parses(script):
    subprocess.run(["bash", "-n", script], check=True)


def carry_row(row):
    """(model flags, training task flags) of a run_carry_state.sh row, from its own functions."""
    script = os.path.join(ROOT, "experiments", "carried_state", "run_carry_state.sh")
    prog = (f'eval "$(sed -n "/^row_args()/,/^}}/p;/^reset_period()/,/^}}/p;/^task_args()/,/^}}/p" {script})"; BATCH=32; CONTEXT=256; '
            f'row_args {row} && task_args {row}')
    out = subprocess.run(["bash", "-c", prog], capture_output=True, text=True)
    if out.returncode:
        raise ValueError(out.stderr.strip())
    return out.stdout.strip().split("\n")


@pytest.mark.parametrize("row, model, task", [
    ("deltanet", "--fwp-kernel linear --fwp-update delta", "--task language_modeling"),
    ("deltanet_carry", "--fwp-kernel linear --fwp-update delta", "--task fwp_stream_lm --fwp-carry-state --batch-size 32"),
    ("linear_carry", "--fwp-kernel linear --fwp-update sum", "--fwp-carry-state"),
    ("dpfp_delta_l2", "--fwp-kernel dpfp --fwp-dpfp-nu 1 --fwp-update delta --fwp-l2-normalize", "--task language_modeling"),
    ("identity_delta_l2_carry", "--fwp-kernel identity --fwp-update delta --fwp-l2-normalize", "--fwp-carry-state"),
    ("dpfp_delta_l2_carry128", "--fwp-kernel dpfp --fwp-dpfp-nu 1 --fwp-update delta --fwp-l2-normalize",
     "--fwp-carry-state --batch-size 32 --fwp-carry-reset-segments 128"),
    ("dpfp_delta_l2_stream", "--fwp-kernel dpfp --fwp-dpfp-nu 1 --fwp-update delta --fwp-l2-normalize",
     "--task fwp_stream_lm --batch-size 32"),
])
def test_carry_rows(row, model, task):
    got_model, got_task = carry_row(row)
    assert got_model == model
    assert task in got_task
    assert ("--fwp-carry-reset-segments" in got_task) == bool(re.search(r"_carry\d+$", row))
    assert ("--fwp-carry-state" in got_task) == ("_carry" in row)


def test_unknown_carry_row_is_an_error():
    with pytest.raises(ValueError, match="unknown row softmax"):
        carry_row("softmax_carry")
