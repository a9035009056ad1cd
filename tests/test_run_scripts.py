"""The table-making run scripts end to end, with stand-in fairseq CLIs: which rows train with which
flags, what is scored, what lands in the table, the clear stop where the data is missing, and
scripts/gpu_recipes.sh running them all at once as on a GPU machine.

The scripts run from a copy of themselves (and examples/run_lib.sh) in a temporary tree, so that a
checkout's .venv/bin never puts the real fairseq in front of the stand-ins; run_lib.sh then makes
that tree the working directory, as the repository root is in real use."""
import gzip
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM_SCRIPT = "examples/language_model/run_tinyshakespeare.sh"
CARRY_SCRIPT = "experiments/carried_state/run_carry_state.sh"
MT_SCRIPT = "examples/translation/run_multi30k.sh"
SETTINGS = ("MAX_UPDATE", "CONTEXT", "BATCH", "SEED", "HEADS", "DPFP_NU", "FFN", "EXTRA_ARGS",
            "GEN_ARGS", "DATA", "OUT", "MULTI30K_ROWS", "CARRY_STATE_ROWS", "RECIPES")

# Records its arguments (one shell-quoted line a call) and prints what the scripts read from
# fairseq's output: the parameter count, the update count, a perplexity per scored subset, and
# the hypotheses of the two reference lines (out of order, as fairseq-generate prints them).
FAKE_FAIRSEQ = r"""#!/usr/bin/env bash
tool=$(basename "$0")
{ printf '%q ' "$tool" "$@"; echo; } >>"$FAKE_CALLS"
case $tool in
    fairseq-train) echo "num. shared model params: 1,234 (num. trained: 1,234)"; echo "epoch 001 | num_updates 7" ;;
    fairseq-eval-lm)
        if [[ " $* " == *" --fwp-eval-reset-segments "* ]]; then p=16.00
        elif [[ " $* " == *" --gen-subset valid "* ]]; then p=8.00
        else p=4.00; fi
        echo "Loss (base 2): 2.0000, Perplexity: $p" ;;
    fairseq-generate) printf 'H-1\t-0.1\tb b\nH-0\t-0.2\ta a\n' ;;
esac
"""
# python3 as the scripts call it, but `-m sacrebleu` prints a fixed score and the GPU scripts'
# `-c "import fairseq..."` checks pass without the seconds of importing fairseq.
FAKE_PYTHON3 = r"""#!/usr/bin/env bash
case "${1:-} ${2:-}" in
    "-m sacrebleu") echo 12.3 ;;
    "-c import fairseq"*) ;;
    *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def stand_in_tree(tmp_path, *files, data=True):
    """A copy of FILES (and the helpers they call: examples/run_lib.sh, hypotheses.sh) under tmp_path/repo, stand-in fairseq CLIs, and a
    stand-in data folder for both the LM and the Multi30k scripts (empty if data=False).
    Returns (tree, environment, calls file, OUT folder): every setting at its script's default."""
    tree = tmp_path / "repo"
    for rel in (*files, "examples/run_lib.sh", "examples/translation/hypotheses.sh",
                "examples/language_model/plot_valid_ppl.py"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), tree / rel)
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool, text in (("fairseq-train", FAKE_FAIRSEQ), ("fairseq-eval-lm", FAKE_FAIRSEQ),
                       ("fairseq-generate", FAKE_FAIRSEQ), ("python3", FAKE_PYTHON3)):
        (fake / tool).write_text(text)
        (fake / tool).chmod(0o755)
    data_dir = tmp_path / "data"
    (data_dir / "raw").mkdir(parents=True)
    if data:
        for name in ("dict.txt", "dict.de.txt"):
            (data_dir / name).write_text("a 1\n")
        with gzip.open(data_dir / "raw" / "test_2016_flickr.en.gz", "wt") as f:
            f.write("a a\nb b\n")
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(PATH=f"{fake}:{os.environ['PATH']}", REAL_PYTHON=sys.executable,
               FAKE_CALLS=str(calls), DATA=str(data_dir), OUT=str(out), THREADS="1")
    return tree, env, calls, out


def read_calls(calls):
    """The stand-ins' calls, each as its argument list (the tool's name first)."""
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [shlex.split(line) for line in lines]


def run_recipe(tmp_path, script, *rows, data=True, **env_vars):
    """Run SCRIPT ROWS... in a stand-in tree, its settings at their defaults but for ENV_VARS.
    Returns (process, fairseq calls as argument lists, OUT folder)."""
    tree, env, calls, out = stand_in_tree(tmp_path, script, data=data)
    p = subprocess.run(["bash", str(tree / script), *rows], env=dict(env, **env_vars),
                       capture_output=True, text=True, timeout=120)
    return p, read_calls(calls), out


def flags_once(call):
    """No flag given twice (a second one would silently override the first)."""
    flags = [a for a in call if a.startswith("--")]
    return len(flags) == len(set(flags))


def joined(call):
    """A call as one string with a space at both ends: `f" {flags} " in joined(call)`."""
    return " " + " ".join(call) + " "


def test_lm_recipe_trains_and_scores_every_row(tmp_path):
    p, calls, out = run_recipe(tmp_path, LM_SCRIPT)
    assert p.returncode == 0, p.stderr
    rows = {"softmax": "--fwp-kernel softmax",
            "linear": "--fwp-kernel linear --fwp-update sum",
            "deltanet": "--fwp-kernel linear --fwp-update delta",
            "dpfp_delta": "--fwp-kernel dpfp --fwp-dpfp-nu 1 --fwp-update delta"}
    assert [c[0] for c in calls] == ["fairseq-train", "fairseq-eval-lm", "fairseq-eval-lm"] * 4
    assert all(map(flags_once, calls))
    for i, (row, row_flags) in enumerate(rows.items()):
        train, valid, test = map(joined, calls[3 * i:3 * i + 3])
        for flags in ("--arch fwp_lm", row_flags, f"--save-dir {out}/{row}/checkpoints",
                      "--tokens-per-sample 256", "--sample-break-mode none --max-tokens 8192",
                      "--decoder-attention-heads 4", "--max-update 2000 --seed 1"):
            assert f" {flags} " in train, flags
        for call, subset in ((valid, "valid"), (test, "test")):
            assert f"--path {out}/{row}/checkpoints/checkpoint_last.pt --gen-subset {subset}" in call
            assert "--tokens-per-sample 256 --context-window 192" in call
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + 4
    assert table[2] == "| softmax | `--fwp-kernel softmax` | 1,234 | 7 | 0 min | 8.00 | 4.00 | 2.000 |"


def test_lm_recipe_extension_rows(tmp_path):
    """The Delta Net's extensions (gate, beta in (0, 2), one softmax layer in four): the Delta Net's
    flags plus one each, trained and scored like the other rows."""
    rows = {"deltanet_gated": "--fwp-gate scalar", "deltanet_beta2": "--fwp-beta-range double",
            "deltanet_hybrid": "--fwp-softmax-layers 3",
            "deltanet_gated_hybrid": "--fwp-gate scalar --fwp-softmax-layers 3"}
    p, calls, out = run_recipe(tmp_path, LM_SCRIPT, *rows)
    assert p.returncode == 0, p.stderr
    assert [c[0] for c in calls] == ["fairseq-train", "fairseq-eval-lm", "fairseq-eval-lm"] * 4
    for i, (row, extra) in enumerate(rows.items()):
        train = joined(calls[3 * i])
        assert flags_once(calls[3 * i]) and f" --fwp-kernel linear --fwp-update delta {extra} " in train
        assert f"--save-dir {out}/{row}/checkpoints" in train
    p, _, _ = run_recipe(tmp_path / "bad", LM_SCRIPT, "deltanet_typo")
    assert p.returncode != 0 and "unknown row deltanet_typo" in p.stderr


def test_lm_recipe_gated_deltanet_rows(tmp_path):
    """Today's DeltaNet layer: the preset's flag set (the same as fwp_lm_gated_deltanet's), and the
    short convolution, the output norm and DeltaProduct each added to the Delta Net; the rows with new
    projections give their parameters back in the FFN (the output norm's gate projection: 896,
    DeltaProduct's second writes: 768, instead of 1024); validation logged every 25 updates."""
    from fwp_fairseq.models.presets import gated_deltanet_flags
    rows = {"gated_deltanet": (" ".join(gated_deltanet_flags()), 896),
            "shortconv": ("--fwp-kernel linear --fwp-update delta --fwp-short-conv 4", 1024),
            "outnorm": ("--fwp-kernel linear --fwp-update delta --fwp-output-norm rms-gated", 896),
            "deltaproduct2": ("--fwp-kernel linear --fwp-update delta --fwp-householder 2", 768)}
    p, calls, out = run_recipe(tmp_path, LM_SCRIPT, *rows)
    assert p.returncode == 0, p.stderr
    assert [c[0] for c in calls] == ["fairseq-train", "fairseq-eval-lm", "fairseq-eval-lm"] * 4
    for i, (row, (flags, ffn)) in enumerate(rows.items()):
        train = joined(calls[3 * i])
        assert flags_once(calls[3 * i]) and f" {flags} " in train, (row, train)
        assert f" --decoder-ffn-embed-dim {ffn} " in train and f"--save-dir {out}/{row}/checkpoints" in train
        assert " --validate-interval-updates 25 " in train
    # the stand-in logs no validation: the recipe says so and draws nothing
    assert "no validations logged" in p.stdout and not (out / "valid_ppl.png").exists()


# row -> (model flags, training task flags)
CARRY_ROWS = {
    "deltanet": ("--fwp-kernel linear --fwp-update delta", "--task language_modeling"),
    "deltanet_carry": ("--fwp-kernel linear --fwp-update delta",
                       "--task fwp_stream_lm --fwp-carry-state --batch-size 32"),
    "linear_carry": ("--fwp-kernel linear --fwp-update sum", "--fwp-carry-state"),
    "dpfp_delta_l2": ("--fwp-kernel dpfp --fwp-dpfp-nu 1 --fwp-update delta --fwp-l2-normalize",
                      "--task language_modeling"),
    "identity_delta_l2_carry": ("--fwp-kernel identity --fwp-update delta --fwp-l2-normalize",
                                "--fwp-carry-state"),
    "dpfp_delta_l2_carry128": ("--fwp-kernel dpfp --fwp-dpfp-nu 1 --fwp-update delta --fwp-l2-normalize",
                               "--fwp-carry-state --batch-size 32 --fwp-carry-reset-segments 128"),
    "dpfp_delta_l2_stream": ("--fwp-kernel dpfp --fwp-dpfp-nu 1 --fwp-update delta --fwp-l2-normalize",
                             "--task fwp_stream_lm --batch-size 32"),
}


@pytest.fixture(scope="module")
def carry_run(tmp_path_factory):
    """run_carry_state.sh over every row of CARRY_ROWS at once: {row: its fairseq calls}, table."""
    p, calls, out = run_recipe(tmp_path_factory.mktemp("carry"), CARRY_SCRIPT, *CARRY_ROWS)
    assert p.returncode == 0, p.stderr
    assert all(map(flags_once, calls))
    by_row = {row: [c for c in calls if f"{out}/{row}/" in joined(c)] for row in CARRY_ROWS}
    return by_row, (out / "table.md").read_text()


@pytest.mark.parametrize("row", CARRY_ROWS)
def test_carry_rows_train_and_score_as_named(carry_run, row):
    """A row name MODEL[_l2][_carry[N]|_stream] picks the model flags, the data feeding in
    training, and how it is scored: carried rows as one stream, the others in sliding windows."""
    by_row, table = carry_run
    model, task = CARRY_ROWS[row]
    train, *evals = by_row[row]
    train = joined(train)
    assert train.startswith(" fairseq-train ")
    for flags in ("--arch fwp_lm", model, "--no-token-positional-embeddings", task,
                  "--decoder-attention-heads 4"):
        assert f" {flags} " in train, flags
    carried = "_carry" in row
    assert ("--fwp-carry-state" in train) == carried
    assert ("--fwp-carry-reset-segments" in train) == row.endswith("_carry128")
    streamed = carried or row.endswith("_stream")
    assert ("--sample-break-mode none --max-tokens 8192" in train) == (not streamed)
    # valid and test, and for ROW_carryN both again with the state reset every N segments
    assert len(evals) == (4 if row.endswith("_carry128") else 2)
    for call in map(joined, evals):
        assert call.startswith(" fairseq-eval-lm ") and f"/{row}/checkpoints/checkpoint_last.pt --gen-subset" in call
        assert ("--task fwp_stream_lm --fwp-carry-state" in call) == carried
        assert ("--context-window 192" in call) == (not carried)
    if row.endswith("_carry128"):
        assert "--fwp-eval-reset-segments 128" in joined(evals[2]) and "| 16.00 / 16.00 |" in table
    assert f"| {row} | `{model}` | 4 |" in table


def test_unknown_carry_row_stops_before_training(tmp_path):
    p, calls, _ = run_recipe(tmp_path, CARRY_SCRIPT, "softmax_carry")
    assert p.returncode != 0 and "unknown row softmax" in p.stderr
    assert calls == []


@pytest.mark.parametrize("script, prepare", [
    (LM_SCRIPT, "prepare-tinyshakespeare.sh"), (CARRY_SCRIPT, "prepare-tinyshakespeare.sh"),
    (MT_SCRIPT, "prepare-multi30k.sh")])
def test_missing_data_names_the_prepare_script(tmp_path, script, prepare):
    p, calls, out = run_recipe(tmp_path, script, data=False)
    assert p.returncode == 1 and f"run data-scripts/{prepare} first" in p.stderr
    assert calls == [] and not out.exists()


def test_gpu_recipes_runs_every_row_and_collects_the_tables(tmp_path):
    """scripts/gpu_recipes.sh (the GPU machine's recipe runs): every row of both recipes its own
    run, with the recipe's implementation and a time stop appended, and every table collected."""
    tree, env, calls, out = stand_in_tree(
        tmp_path, MT_SCRIPT, CARRY_SCRIPT, "scripts/gpu_recipes.sh", "scripts/fairseq_wheels.sh")
    env.update(PYTHON=str(tmp_path / "bin" / "python3"), RECIPES_WORK=str(tmp_path / "work"),
               MULTI30K_ROWS="linear delta", CARRY_STATE_ROWS="deltanet deltanet_carry")
    p = subprocess.run(["bash", str(tree / "scripts" / "gpu_recipes.sh")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    trains = [" ".join(c) for c in read_calls(calls) if c[0] == "fairseq-train"]
    assert len(trains) == 4
    assert all(re.search(r" --fwp-impl chunked --stop-time-hours [0-9.]+$", t) for t in trains)
    recipes = (out / "recipes.md").read_text()
    for name, line in (("multi30k_linear", "| linear | `--fwp-kernel linear --fwp-update sum` | 1,234 | 7 | 0 min | 12.3 |"),
                       ("multi30k_delta", "| delta |"),
                       ("carry_state_deltanet", "| deltanet | `--fwp-kernel linear --fwp-update delta` | 4 | no |"),
                       ("carry_state_deltanet_carry", "| deltanet_carry |")):
        assert f"{name}:" in recipes and line in recipes, name
    assert (out / "recipes.tar.gz").is_file()


@pytest.mark.parametrize("row, arch, extra", [
    ("delta", "fwp_transformer", "--fwp-kernel linear --fwp-update delta"),
    ("gated_deltanet", "fwp_transformer_gated_deltanet", ""),
    ("gated_deltanet_encconv", "fwp_transformer_gated_deltanet", "--fwp-short-conv-encoder")])
def test_multi30k_rows_train_their_architecture(tmp_path, row, arch, extra):
    """Each row trains one architecture (a preset row its own, once), then is scored and tabled."""
    p, calls, out = run_recipe(tmp_path, MT_SCRIPT, row)
    assert p.returncode == 0, p.stderr
    train, generate = calls
    assert all(map(flags_once, calls))
    assert train[0] == "fairseq-train" and f" --arch {arch} {extra}".rstrip() + " " in joined(train)
    assert generate[0] == "fairseq-generate" and f"{out}/{row}/checkpoints/checkpoint_last.pt" in generate
    assert f"| {row} | `" in (out / "table.md").read_text()


def test_unknown_multi30k_row_stops_before_training(tmp_path):
    p, calls, _ = run_recipe(tmp_path, MT_SCRIPT, "delta", "gated_deltanett")
    assert p.returncode == 2 and "unknown row gated_deltanett" in p.stderr
    assert calls == []
