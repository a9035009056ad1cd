"""Train a tiny fwp_lm in fp32 and in bf16 on the CPU for each kernel and print the final losses.

Pass: every bf16 loss is finite and within --tol (relative) of the fp32 run's, for the mean
training loss of the last tenth of the updates and for the validation loss at the end.

    .venv/bin/python scripts/bf16_check.py                 # 2,000 updates: the full check
    .venv/bin/python scripts/bf16_check.py --updates 300 --kernels dpfp linear --jobs 2

The corpus is generated (lines "a b c d a b c d": the second half is predictable only through
attention, so the fast weights must work). Exit status 1 when a check fails."""
import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.join(os.path.dirname(HERE), "fwp_fairseq")
BIN = os.path.dirname(sys.executable)
KERNELS = ("softmax", "linear", "performer", "dpfp")


def make_corpus(root, seed=0):
    """Binarised LM data under root/bin: 12-word vocabulary, each line a 4-word prefix repeated."""
    dest = os.path.join(root, "bin")
    if os.path.exists(os.path.join(dest, "train.bin")):
        return dest  # fairseq-preprocess refuses an existing dictionary: reuse the corpus
    rng = random.Random(seed)
    words = [chr(ord("a") + i) for i in range(12)]
    for split, n in (("train", 2000), ("valid", 100)):
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            for _ in range(n):
                half = [rng.choice(words) for _ in range(4)]
                f.write(" ".join(half + half) + "\n")
    subprocess.run([os.path.join(BIN, "fairseq-preprocess"), "--only-source", "--workers", "1",
                    "--trainpref", os.path.join(root, "train.txt"),
                    "--validpref", os.path.join(root, "valid.txt"),
                    "--destdir", dest], check=True, capture_output=True)
    return dest


def train(data, kernel, update, precision, updates, save_dir):
    """One run; returns (per-update training losses, final validation loss)."""
    flags = [data, "--user-dir", PKG, "--cpu", "--seed", "1", "--task", "language_modeling",
             "--arch", "fwp_lm_tiny", "--fwp-kernel", kernel, "--fwp-update", update,
             "--fwp-performer-features", "16", "--dropout", "0",
             "--tokens-per-sample", "64", "--sample-break-mode", "none", "--max-tokens", "512",
             "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt",
             "--warmup-updates", "100", "--clip-norm", "1.0", "--max-update", str(updates),
             "--log-format", "json", "--log-interval", "1", "--no-progress-bar", "--num-workers", "0",
             "--save-dir", save_dir, "--no-save"]
    if precision == "bf16":
        cmd = [sys.executable, os.path.join(HERE, "train_cpu_bf16.py"), *flags, "--bf16"]
    else:
        cmd = [os.path.join(BIN, "fairseq-train"), *flags]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"{kernel}/{update}/{precision} failed:\n{out[-3000:]}")
    train_losses, valid = [], math.nan
    for line in out.splitlines():
        m = re.search(r"(train_inner|valid)\s*[|:]\s*(\{.*\})\s*$", line)
        if not m:
            continue
        rec = json.loads(m.group(2))
        if "loss" in rec and "num_updates" in rec and "valid_loss" not in rec:
            train_losses.append(float(rec["loss"]))
        if "valid_loss" in rec:
            valid = float(rec["valid_loss"])
    return train_losses, valid


def final(losses):
    """Mean of the last tenth: one batch's loss is too noisy to compare."""
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=2000)
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    ap.add_argument("--update-rule", default="delta", choices=("sum", "delta"))
    ap.add_argument("--tol", type=float, default=0.05, help="relative tolerance on the final losses")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = ap.parse_args(argv)

    root = args.workdir or tempfile.mkdtemp(prefix="bf16_check_")
    os.makedirs(root, exist_ok=True)
    data = make_corpus(root)
    runs = [(k, p) for k in args.kernels for p in ("fp32", "bf16")]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(runs, pool.map(
            lambda r: train(data, r[0], args.update_rule, r[1], args.updates,
                            os.path.join(root, f"ckpt-{r[0]}-{r[1]}")), runs)))
    ok = True
    print(f"{args.updates} updates, fwp_lm_tiny, --fwp-update {args.update_rule}, tolerance {args.tol:.0%}")
    print(f"{'kernel':<10} {'fp32 train':>10} {'bf16 train':>10} {'rel':>7} {'fp32 valid':>10} {'bf16 valid':>10} {'rel':>7}  ok")
    for k in args.kernels:
        (t32, v32), (t16, v16) = results[(k, "fp32")], results[(k, "bf16")]
        f32, f16 = final(t32), final(t16)
        finite = all(math.isfinite(x) for x in t16 + [v16])
        rel_t, rel_v = abs(f16 - f32) / f32, abs(v16 - v32) / v32
        good = finite and len(t16) == args.updates and rel_t <= args.tol and rel_v <= args.tol
        ok &= good
        print(f"{k:<10} {f32:>10.4f} {f16:>10.4f} {rel_t:>7.2%} {v32:>10.4f} {v16:>10.4f} {rel_v:>7.2%}  {'yes' if good else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
