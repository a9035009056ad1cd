#!/usr/bin/env python
"""`make demo`, state tracking: parity with beta in (0, 1) vs (0, 2), and permutations of 3
elements (S3) with DeltaProduct.

Parity (--group cyclic, the default): small fwp_lm models (2 layers, d_model 64, no positional
embeddings) learn the running parity of bit strings of length 64 (task state_tracking, a target
at every position), then predict the parity of whole strings of length 64, 128, 256 and 512
(final-position accuracy, 256 fresh strings per length; chance is 0.5). Grazzi et al. (ICLR 2025)
find that the delta rule with beta in (0, 2) (--fwp-beta-range double, unit keys) extrapolates,
beta in (0, 1) does not.

S3 (--group s3): one-layer models learn the running composition of random permutations of 3
elements on strings of length 64 and are tested up to 4x that length (chance 1/6): DeltaProduct
with N = 1 and N = 2 writes per token (--fwp-householder), beta in (0, 2), and softmax attention.
Siems et al. (2025) find that one layer needs N = 2 for S3 (a 3-cycle is two reflections).

Each run is a plain `fairseq-train` (the command in README.md), two at a time, one thread each.
Writes results.{csv,json,md,png} and the training logs under --out-dir.

    python examples/state_tracking/run_demo.py            # parity, ~5 min on 2 CPU cores
    python examples/state_tracking/run_demo.py --group s3 # S3
    python examples/state_tracking/run_demo.py --quick    # a smoke test
"""
import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FAST = ["--fwp-kernel", "identity", "--fwp-l2-normalize", "--fwp-update", "delta"]
# key -> (label, model flags)
MODELS = {
    "delta_unit": ("DeltaNet beta in (0,1)", FAST + ["--fwp-beta-range", "unit"]),
    "delta_double": ("DeltaNet beta in (0,2)", FAST + ["--fwp-beta-range", "double"]),
    "gated_unit": ("Gated DeltaNet beta in (0,1)", FAST + ["--fwp-beta-range", "unit", "--fwp-gate", "scalar"]),
    "gated_double": ("Gated DeltaNet beta in (0,2)", FAST + ["--fwp-beta-range", "double", "--fwp-gate", "scalar"]),
    "softmax": ("Softmax (no positions)", ["--fwp-kernel", "softmax"]),
}
PRODUCT = FAST + ["--fwp-beta-range", "double"]
S3_MODELS = {
    "product1": ("DeltaProduct N=1 beta in (0,2)", PRODUCT + ["--fwp-householder", "1"]),
    "product2": ("DeltaProduct N=2 beta in (0,2)", PRODUCT + ["--fwp-householder", "2"]),
    "softmax": ("Softmax (no positions)", ["--fwp-kernel", "softmax"]),
}
TRAIN_LENGTH = 64
# --group -> its experiment: models, decoder layers, default updates, test lengths, output folder
EXPERIMENTS = {
    "cyclic": dict(models=MODELS, layers=2, max_update=250, lengths=[64, 128, 256, 512], out=""),
    "s3": dict(models=S3_MODELS, layers=1, max_update=600, lengths=[64, 128, 256], out="s3"),
}


def train_args(model_flags, save_dir, max_update, seed, modulus=2, group="cyclic"):
    """The fairseq-train arguments of one run (README.md shows the same command)."""
    task = ["--modulus", str(modulus)] if group == "cyclic" else ["--group", group]
    layers = EXPERIMENTS[group]["layers"]
    return ["--user-dir", os.path.join(REPO, "fwp_fairseq"), "--cpu", "--seed", str(seed),
            "--task", "state_tracking", *task, "--train-length", str(TRAIN_LENGTH),
            "--arch", "fwp_lm", "--decoder-layers", str(layers), "--decoder-embed-dim", "64",
            "--decoder-input-dim", "64", "--decoder-output-dim", "64", "--decoder-attention-heads", "4",
            "--decoder-ffn-embed-dim", "128", "--decoder-normalize-before",
            "--no-token-positional-embeddings", "--dropout", "0", *model_flags,
            "--criterion", "cross_entropy", "--optimizer", "adam", "--lr", "3e-3",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100", "--clip-norm", "1.0",
            "--batch-size", "32", "--max-update", str(max_update), "--train-size", "3200",
            "--save-dir", save_dir, "--no-epoch-checkpoints", "--no-last-checkpoints",
            "--log-format", "simple", "--log-interval", "50", "--no-progress-bar"]


def train(key, args, save_root):
    save_dir = os.path.join(save_root, key)
    log = os.path.join(args.out_dir, "logs", f"{key}.log")
    best = os.path.join(save_dir, "checkpoint_best.pt")
    if args.reuse_checkpoints and os.path.exists(best):
        return key, best, 0.0
    models = EXPERIMENTS[args.group]["models"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "fairseq-train"),
           *train_args(models[key][1], save_dir, args.max_update, args.seed, args.modulus, args.group)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"{key}: fairseq-train failed (exit {rc}); see {log}")
    return key, best, time.time() - start


def evaluate(checkpoint, lengths, strings):
    import torch
    from fairseq import checkpoint_utils
    sys.path.insert(0, REPO)
    import fwp_fairseq
    fwp_fairseq.register()  # the task and model of the checkpoint
    torch.set_num_threads(1)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint])
    return task.evaluate_lengths(models[0], lengths, num_strings=strings)


def write_outputs(rows, lengths, out_dir, meta):
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "label", "train_seconds", *[f"acc_len_{n}" for n in lengths]])
        for r in rows:
            w.writerow([r["model"], r["label"], r["train_seconds"], *[r["accuracy"][str(n)] for n in lengths]])
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"{meta['metric']} (chance {meta['chance']:.2f})\n\n")
        f.write("| model | " + " | ".join(f"len {n}" for n in lengths) + " |\n")
        f.write("|---|" + "---:|" * len(lengths) + "\n")
        for r in rows:
            f.write(f"| {r['label']} | " + " | ".join(f"{r['accuracy'][str(n)]:.3f}" for n in lengths) + " |\n")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import set DEBUG
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(lengths, [r["accuracy"][str(n)] for n in lengths], marker="o", label=r["label"])
    ax.axhline(meta["chance"], color="grey", linestyle=":", label="chance")
    ax.axvline(TRAIN_LENGTH, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel(f"string length (trained on {TRAIN_LENGTH})")
    ax.set_ylabel("final-position accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", choices=sorted(EXPERIMENTS), default="cyclic",
                   help="cyclic: parity (addition modulo --modulus); s3: permutations of 3 elements")
    p.add_argument("--out-dir", default=None,
                   help="default results/demo/state_tracking (cyclic), results/demo/state_tracking/s3 (s3)")
    p.add_argument("--models", default=None, help="comma-separated; cyclic: " + ",".join(MODELS)
                   + "; s3: " + ",".join(S3_MODELS) + " (default: all of the group's)")
    p.add_argument("--max-update", type=int, default=None,
                   help="training updates per model (default: cyclic 250, s3 600)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    p.add_argument("--threads", type=int, default=1, help="threads per training")
    p.add_argument("--strings", type=int, default=256, help="test strings per length")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--modulus", type=int, default=2, help="--group cyclic: 2: parity; m > 2: addition modulo m")
    p.add_argument("--reuse-checkpoints", action="store_true",
                   help="evaluate the checkpoints an earlier run left in --out-dir instead of training")
    p.add_argument("--quick", action="store_true", help="20 updates, 32 strings: a smoke test")
    args = p.parse_args()
    exp = EXPERIMENTS[args.group]
    models, lengths = exp["models"], exp["lengths"]
    if args.group != "cyclic" and args.modulus != 2:
        raise SystemExit("--modulus: applies to --group cyclic only")
    if args.out_dir is None:
        args.out_dir = os.path.join(REPO, "results", "demo", "state_tracking", exp["out"])
    if args.max_update is None:
        args.max_update = exp["max_update"]
    keys = [k for k in (args.models or ",".join(models)).split(",") if k]
    unknown = [k for k in keys if k not in models]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {','.join(models)}")
    if args.quick:
        args.max_update, args.strings = 20, 32
    os.makedirs(os.path.join(args.out_dir, "logs"), exist_ok=True)
    save_root = os.path.join(args.out_dir, "checkpoints")
    start = time.time()
    task_name = {"s3": "S3 (permutations of 3)"}.get(args.group, "parity" if args.modulus == 2
                                                       else f"addition mod {args.modulus}")
    print(f"state tracking ({task_name}): {len(keys)} fairseq trainings, {args.max_update} updates each, "
          f"{args.jobs} at a time; logs in {os.path.join(args.out_dir, 'logs')}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        trained = list(pool.map(lambda k: train(k, args, save_root), keys))
    rows = []
    for key, ckpt, seconds in trained:
        acc = evaluate(ckpt, lengths, args.strings)
        rows.append(dict(model=key, label=models[key][0], train_seconds=round(seconds, 1),
                         accuracy={str(n): acc[n] for n in lengths}))
        print(f"{models[key][0]:32s} " + "  ".join(f"{n}: {acc[n]:.3f}" for n in lengths), flush=True)
    meta = dict(group=args.group, max_update=args.max_update, strings_per_length=args.strings, seed=args.seed,
                modulus=args.modulus, chance=1 / (6 if args.group == "s3" else args.modulus),
                jobs=args.jobs, threads=args.threads, wall_seconds=round(time.time() - start, 1),
                metric=f"final-position accuracy, {task_name}, trained on length {TRAIN_LENGTH}")
    write_outputs(rows, lengths, args.out_dir, meta)
    print(f"wall time {time.time() - start:.0f} s. Written: {os.path.join(args.out_dir, 'results.md')}, "
          f".csv, .json, .png")


if __name__ == "__main__":
    main()
