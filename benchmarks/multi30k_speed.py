"""Speed of the Multi30k recipe's rows on this machine (CPU), optionally against another checkout:

1. training words/s: examples/translation/run_multi30k.sh itself, --max-update N (default 40),
   the mean of fairseq's train_inner wps after the first logging interval (start-up excluded);
   its generation step is cut to one token (GEN_ARGS), so that only training is timed;
2. fairseq-generate, beam 5, batch 64, on the test split with the checkpoints trained in 1: every
   hypothesis pinned to --gen-len tokens (--min-len = --max-len-b, --max-len-a 0), so that rows
   whose briefly trained models stop at other lengths are timed on the same work. Sentences/s as
   fairseq-generate reports it. Quality is irrelevant here: the models are barely trained.
   With --other, whether both checkouts wrote the same hypotheses (H- lines) is recorded too.

Rows run one after another in one process; with --other ROOT (a second checkout, e.g. the
previous commit unpacked with `git archive`), each row runs there first, then here, so that a
drifting machine load hits both alike.

    python benchmarks/multi30k_speed.py --data data-bin/multi30k [--other DIR] [--rows softmax dpfp]
        [--updates 40] [--threads 1] [--gen-rows softmax linear dpfp] [--gen-len 20] [--gen-shards 1]
        [--gen-only] [--out DIR]

Writes <out>/speed.md and <out>/speed.json (default out: results/multi30k_speed)."""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ROWS = ("softmax", "linear", "dpfp", "delta")  # run_multi30k.sh's rows


def _env(root, threads):
    env = dict(os.environ, PYTHONPATH=root, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    env.update(THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def train_wps(root, row, data, out, updates, threads):
    """Mean training words/s of the recipe's row `row` run from checkout `root`."""
    env = _env(root, threads)
    env.update(DATA=data, OUT=out, MAX_UPDATE=str(updates),
               EXTRA_ARGS="--log-interval 10 --disable-validation",
               GEN_ARGS="--max-len-a 0 --max-len-b 1")
    subprocess.run(["bash", os.path.join(root, "examples", "translation", "run_multi30k.sh"), row],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = open(os.path.join(out, row, "train.log")).read()
    wps = [float(w) for w in re.findall(r"\| train_inner \|.*?\bwps[= ](\d+(?:\.\d+)?)", log)]
    if len(wps) < 2:
        raise RuntimeError(f"{row}: fewer than two train_inner lines in {out}/{row}/train.log")
    return statistics.mean(wps[1:])


def generate_speed(root, row, data, ckpt_dir, threads, gen_len, shards):
    """(sentences/s, tokens/s, hypotheses) of fairseq-generate beam 5, batch 64, hypotheses of
    gen_len tokens, on the first of `shards` shards of the test split (fairseq's --num-shards:
    every shards-th batch); hypotheses: the sorted (H-id, tokens) pairs."""
    cmd = [os.path.join(BIN, "fairseq-generate"), data, "--user-dir", os.path.join(root, "fwp_fairseq"),
           "--task", "translation", "--source-lang", "de", "--target-lang", "en",
           "--path", os.path.join(ckpt_dir, "checkpoint_last.pt"), "--gen-subset", "test",
           "--beam", "5", "--batch-size", "64", "--num-workers", "0", "--max-len-a", "0",
           "--max-len-b", str(gen_len), "--min-len", str(gen_len), "--cpu",
           "--num-shards", str(shards), "--shard-id", "0"]
    p = subprocess.run(cmd, env=_env(root, threads), capture_output=True, text=True)
    m = re.search(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in [\d.]+s "
                  r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", p.stdout + p.stderr)
    if p.returncode != 0 or m is None:
        raise RuntimeError(f"fairseq-generate failed for {row}:\n{(p.stdout + p.stderr)[-3000:]}")
    # "H-<id>\t<score>\t<tokens>": compare the tokens (scores may differ in the last printed digit)
    hyps = sorted((f[0], f[-1]) for f in (line.split("\t") for line in p.stdout.splitlines())
                  if f[0].startswith("H-"))
    return float(m.group(3)), float(m.group(4)), hyps


def markdown(res):
    c = res["config"]
    L = [f"Multi30k De-En, run_multi30k.sh rows, {c['threads']} thread(s), {c['updates'] or 'no'} updates; "
         f"'other' = {c['other'] or '-'}", "",
         "| row | train wps, other | train wps, this | this / other | this / softmax (this) |",
         "|---|---|---|---|---|"]
    soft = res["train"].get("softmax", {}).get("this")
    for row, r in res["train"].items():
        o, t = r.get("other"), r["this"]
        L.append(f"| {row} | {'-' if o is None else f'{o:.0f}'} | {t:.0f} | "
                 f"{'-' if o is None else f'{t / o:.2f}x'} | {'-' if soft is None else f'{t / soft:.2f}x'} |")
    if res["generate"]:
        L += ["", f"fairseq-generate beam 5, batch 64, test (1/{c['gen_shards']} of its batches, {c['gen_len']} "
              "tokens per hypothesis), sentences/s", "",
              "| row | other | this | this / other | this / softmax (this) | same hypotheses |",
              "|---|---|---|---|---|---|"]
        soft = res["generate"].get("softmax", {}).get("this")
        for row, r in res["generate"].items():
            o, t = r.get("other"), r["this"]
            same = res.get("same_hypotheses", {}).get(row)
            L.append(f"| {row} | {'-' if o is None else f'{o:.1f}'} | {t:.1f} | "
                     f"{'-' if o is None else f'{t / o:.2f}x'} | {'-' if soft is None else f'{t / soft:.2f}x'} | "
                     f"{'-' if same is None else ('yes' if same else 'NO')} |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "data-bin", "multi30k"))
    ap.add_argument("--other", help="a second checkout to time first (e.g. the previous commit)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--gen-rows", nargs="*", default=["softmax", "linear", "dpfp"], choices=ROWS)
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gen-len", type=int, default=20)
    ap.add_argument("--gen-shards", type=int, default=1, help="time 1 / N of the test split")
    ap.add_argument("--gen-only", action="store_true",
                    help="no training: generate with the checkpoints an earlier run left in --out")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "multi30k_speed"))
    args = ap.parse_args(argv)
    data, out = os.path.abspath(args.data), os.path.abspath(args.out)
    other = None if args.other is None else os.path.abspath(args.other)
    roots = ([("other", other)] if other else []) + [("this", ROOT)]
    res = {"config": {"updates": None if args.gen_only else args.updates, "threads": args.threads, "gen_len": args.gen_len,
                      "gen_shards": args.gen_shards, "other": other}, "train": {}, "generate": {}, "same_hypotheses": {}}
    for row in [] if args.gen_only else args.rows:
        res["train"][row] = {name: train_wps(root, row, data, os.path.join(out, name), args.updates,
                                             args.threads) for name, root in roots}
        print(json.dumps({row: res["train"][row]}), flush=True)
    for row in args.gen_rows:
        ckpt = os.path.join(out, "this", row, "checkpoints")  # the same model for both checkouts
        if not os.path.exists(os.path.join(ckpt, "checkpoint_last.pt")):
            raise SystemExit(f"--gen-rows {row}: not trained here (add it to --rows)")
        runs = {name: generate_speed(root, row, data, ckpt, args.threads, args.gen_len, args.gen_shards)
                for name, root in roots}
        res["generate"][row] = {name: r[0] for name, r in runs.items()}
        if other:
            res["same_hypotheses"][row] = runs["other"][2] == runs["this"][2]
        print(json.dumps({row: res["generate"][row]}), flush=True)
    md = markdown(res)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "speed.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "speed.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(md)


if __name__ == "__main__":
    main()
