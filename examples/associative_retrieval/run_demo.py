#!/usr/bin/env python
"""`make demo`: the paper's associative-retrieval experiment (section 6.1) through fairseq.

Every run is one plain fairseq training (task associative_retrieval, arch fwp_retrieval,
criterion half_mse, data generated from the seed), stopped once the eval loss is below 0.001
or at its update budget. Runs go to --jobs worker processes that each import fairseq once and
call fairseq_cli.train.main in-process (a fresh `fairseq-train` costs ~4 s of start-up per run;
--subprocess runs the CLI instead). At the end: a table of final eval losses next to the
paper's, written as CSV, JSON and a PNG plot under --out-dir.

    python examples/associative_retrieval/run_demo.py            # ~10 min on 2 CPU cores
    python examples/associative_retrieval/run_demo.py --full     # S = 20..600 as in the paper (GPU / long)
    python examples/associative_retrieval/run_demo.py --quick    # seconds: a smoke test
"""
import argparse
import csv
import json
import logging
import multiprocessing as mp
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# Models of the paper's figure: (key, label, kernel, nu, performer m, d_dot).
MODELS = {
    "linear": ("Linear", "linear", 1, 64, 64),
    "dpfp1": ("DPFP nu=1", "dpfp", 1, 64, 128),
    "dpfp2": ("DPFP nu=2", "dpfp", 2, 64, 256),
    "dpfp3": ("DPFP nu=3", "dpfp", 3, 64, 384),
    "favor64": ("FAVOR+ m=64", "performer", 1, 64, 128),
    "softmax": ("Softmax", "softmax", 1, 64, None),
}

# Final eval loss published in the paper (arXiv 2102.11174, section 6.1). Softmax: <= .001 up to
# S = 500, stored as .001; FAVOR+ m=64: .30 at S = 40, .5 beyond.
PAPER_S1 = {
    "linear": {40: .0008, 80: .110, 120: .232, 240: .366, 280: .391, 360: .421, 400: .422, 600: .452},
    "dpfp1": {40: .0003, 80: .0002, 120: .0086, 240: .230, 280: .284, 360: .339, 400: .346, 600: .418},
    "dpfp2": {40: .0006, 80: .0006, 120: .0003, 240: .0005, 280: .046, 360: .160, 400: .166, 600: .326},
    "dpfp3": {40: .0009, 80: .0007, 120: .0005, 240: .0005, 280: .0009, 360: .0045, 400: .036, 600: .201},
    "favor64": {40: .30, 80: .5, 120: .5, 240: .5, 280: .5, 360: .5, 400: .5, 600: .5},
    "softmax": {**{s: .001 for s in range(20, 501, 20)}, 600: .054},
}
PAPER_S2 = {"sum": {20: .105, 100: .117, 200: .239}, "delta": {20: .0008, 100: .0001, 200: .185}}

# The demo's grid: every model at S = 40, 80, 120; beyond that only the models whose capacity
# question is still open there (linear, DPFP nu=1 and FAVOR+ have failed by S = 120; S = 240 shows
# linear and DPFP nu=1 failing further). Update budgets are before --steps-scale: runs that can
# store S pairs stop early at the 0.001 target, runs that cannot stop once their eval loss stalls
# (--stop-patience), and bigger S learns slower.
DEMO_S1 = {"linear": [40, 80, 120, 240], "dpfp1": [40, 80, 120, 240], "dpfp2": [40, 80, 120, 240, 360],
           "dpfp3": [40, 80, 120, 240, 360], "favor64": [40, 80, 120], "softmax": [40, 80, 120, 240, 360]}
DEMO_S2 = [20, 100]
QUICK_S1, QUICK_S2 = [8], [8]
FULL_S1, FULL_S2 = list(range(20, 601, 20)), list(range(20, 201, 20))


def demo_budget(S):
    return 500 if S <= 80 else 700 if S <= 120 else 1000


def plan_runs(mode):
    """The list of runs: dicts with setting, model, update, S, max_update."""
    if mode == "quick":
        grid, s2, budget = {m: QUICK_S1 for m in ("linear", "dpfp1", "softmax")}, QUICK_S2, lambda S: 20
    elif mode == "full":
        grid, s2, budget = {m: FULL_S1 for m in MODELS}, FULL_S2, lambda S: 20000
    else:
        grid, s2, budget = DEMO_S1, DEMO_S2, demo_budget
    runs = [dict(setting=1, model=m, update="sum", S=S, max_update=budget(S)) for m, Ss in grid.items() for S in Ss]
    for update in ("sum", "delta"):
        for S in s2:
            # Setting 2 sequences are 2S long: budget as for 2S keys.
            runs.append(dict(setting=2, model="dpfp1", update=update, S=S, max_update=budget(2 * S)))
    return runs


def fairseq_args(run, args, save_dir):
    """The fairseq-train command line of one run (without the program name)."""
    _, kernel, nu, m, _ = MODELS[run["model"]]
    S = run["S"]
    queries = min(args.queries, S * run["setting"])
    interval = args.valid_interval
    argv = [
        "--user-dir", args.user_dir,
        "--task", "associative_retrieval", "--num-keys", str(S), "--setting", str(run["setting"]),
        "--queries-per-seq", str(queries), "--train-size", str(32 * interval), "--valid-size", str(args.valid_size),
        "--valid-queries-per-seq", str(min(args.valid_queries, S * run["setting"])),
        "--arch", "fwp_retrieval", "--fwp-kernel", kernel, "--fwp-update", run["update"],
        "--fwp-dpfp-nu", str(nu), "--fwp-performer-features", str(m),
        "--criterion", "half_mse",
        "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "32",
        "--max-update", str(max(1, int(run["max_update"] * args.steps_scale))),
        "--stop-loss", "0.001", "--stop-patience", str(args.stop_patience),
        "--stop-min-improvement", str(args.stop_min_improvement),
        "--best-checkpoint-metric", "stop_metric", "--patience", "1",
        "--seed", str(args.seed), "--num-workers", "0", "--no-save", "--save-dir", save_dir,
        "--log-format", "json", "--log-interval", str(10 ** 9),
    ]
    if args.cpu:
        argv.append("--cpu")
    return argv


def _valid_records(lines):
    out = []
    for line in lines:
        if '"valid_loss"' in line:
            out.append(json.loads(line[line.index("{"):]))
    return out


# --- worker side ---------------------------------------------------------------------------

class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _worker_init(threads):
    os.environ.setdefault("LOGLEVEL", "WARNING")  # fairseq_cli.train reads it at import
    warnings.filterwarnings("ignore")  # hydra/omegaconf deprecation chatter, once per run
    import torch
    torch.set_num_threads(threads)
    logging.getLogger().setLevel(logging.WARNING)
    import fairseq_cli.train  # noqa: F401  (import once per worker, not once per run)


def _train_in_process(argv):
    """fairseq_cli.train.main on argv; returns fairseq's JSON log lines."""
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    # fairseq keeps the best metric on function attributes: clear the previous run's.
    for fn in (train.should_stop_early, checkpoint_utils.save_checkpoint):
        for attr in ("best", "num_runs"):
            if hasattr(fn, attr):
                delattr(fn, attr)
    bar_logger = logging.getLogger("fairseq.logging.progress_bar")
    capture = _Capture()
    bar_logger.addHandler(capture)
    bar_logger.setLevel(logging.INFO)
    bar_logger.propagate = False
    try:
        parser = options.get_training_parser()
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, input_args=argv))
        train.main(cfg)
    finally:
        bar_logger.removeHandler(capture)
    return capture.lines


def _train_subprocess(argv, threads):
    exe = os.path.join(os.path.dirname(sys.executable), "fairseq-train")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), LOGLEVEL="INFO")
    res = subprocess.run([exe] + argv, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"fairseq-train failed:\n{res.stderr[-4000:]}")
    return res.stdout.splitlines()


def run_one(job):
    run, argv, log_path, subprocess_mode, threads = job
    start = time.time()
    lines = _train_subprocess(argv, threads) if subprocess_mode else _train_in_process(argv)
    seconds = time.time() - start
    with open(log_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    valid = _valid_records(lines)
    if not valid:
        raise RuntimeError(f"no validation result in the log of {run}: see {log_path}")
    last = valid[-1]
    return dict(run, eval_loss=float(last["valid_loss"]), eval_accuracy=float(last.get("valid_accuracy", "nan")),
                updates=int(last["valid_num_updates"]), seconds=round(seconds, 1))


# --- reporting --------------------------------------------------------------------------------

def paper_value(r):
    if r["setting"] == 1:
        return PAPER_S1[r["model"]].get(r["S"])
    return PAPER_S2[r["update"]].get(r["S"])


def row_label(r):
    label, _, _, m, d_dot = MODELS[r["model"]]
    if r["setting"] == 2:
        return f"{label} {r['update']} rule"
    return label + (f" (d_dot {d_dot})" if d_dot else "")


def fmt(x, paper=False):
    if x is None:
        return "-"
    if paper and x == .001:
        return "<=.001"
    return f"{x:.4f}" if x < 0.01 else f"{x:.3f}"


def format_tables(results):
    out = []
    for setting in (1, 2):
        rs = [r for r in results if r["setting"] == setting]
        if not rs:
            continue
        Ss = sorted({r["S"] for r in rs})
        title = "Setting 1 (S distinct keys)" if setting == 1 else "Setting 2 (keys repeat, 2S writes)"
        out.append(f"{title}: final eval loss, measured (paper)")
        head = f"| {'model':28s} | " + " | ".join(f"S={S:<13d}" for S in Ss) + " |"
        out += [head, "|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|"]
        labels = []
        for r in rs:
            if row_label(r) not in labels:
                labels.append(row_label(r))
        for label in labels:
            cells = []
            for S in Ss:
                hit = [r for r in rs if row_label(r) == label and r["S"] == S]
                cells.append(f"{fmt(hit[0]['eval_loss'])} ({fmt(paper_value(hit[0]), True)})" if hit else "-")
            out.append(f"| {label:28s} | " + " | ".join(f"{c:15s}" for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def write_outputs(results, out_dir, meta):
    fields = ["setting", "model", "label", "update", "S", "d_dot", "eval_loss", "paper_loss", "eval_accuracy",
              "updates", "max_update", "seconds"]
    rows = []
    for r in results:
        rows.append(dict(r, label=row_label(r), d_dot=MODELS[r["model"]][4], paper_loss=paper_value(r)))
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(meta, runs=rows), f, indent=1)
    plot(rows, os.path.join(out_dir, "results.png"))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, setting in zip(axes, (1, 2)):
        rs = [r for r in rows if r["setting"] == setting]
        labels = list(dict.fromkeys(r["label"] for r in rs))
        for i, label in enumerate(labels):
            pts = sorted((r["S"], r["eval_loss"], r["paper_loss"]) for r in rs if r["label"] == label)
            c = colors[i % len(colors)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=label)
            paper = [(p[0], p[2]) for p in pts if p[2] is not None]
            if paper:
                ax.plot([p[0] for p in paper], [p[1] for p in paper], "x--", color=c, alpha=0.5)
        ax.set_xlabel("number of unique keys S")
        ax.set_ylabel("final eval loss  0.5 |v* - v_hat|^2")
        ax.set_ylim(-0.01, 0.52)
        ax.set_title("setting 1" if setting == 1 else "setting 2 (DPFP nu=1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="o measured, x paper", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- driver -----------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny runs (seconds): a smoke test")
    mode.add_argument("--full", action="store_true", help="S = 20..600 (setting 2: 20..200) as in the paper")
    p.add_argument("--out-dir", default=os.path.join(REPO, "results", "demo"))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs trained in parallel")
    p.add_argument("--threads", type=int, default=0, help="torch threads per job (0: cores / jobs)")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiplies every run's update budget (the time budget knob)")
    p.add_argument("--queries", type=int, default=16,
                   help="queries per training sequence (the paper: 1; more = less gradient noise per update)")
    p.add_argument("--valid-interval", type=int, default=50, help="updates between validations")
    p.add_argument("--valid-size", type=int, default=16, help="validation sequences")
    p.add_argument("--valid-queries", type=int, default=64, help="queries per validation sequence (0: all)")
    p.add_argument("--stop-patience", type=int, default=4,
                   help="stop a run after this many validations without progress (0: never; --full: 10)")
    p.add_argument("--stop-min-improvement", type=float, default=0.02,
                   help="progress = eval loss this much (relative) below its value at the last progress "
                        "(--full: 0, i.e. any new best)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated model keys to run (default: all)")
    p.add_argument("--subprocess", action="store_true", help="run the fairseq-train CLI per run")
    p.add_argument("--cpu", action="store_true", help="pass --cpu to fairseq (train on CPU even with a GPU)")
    p.add_argument("--user-dir", default=os.path.join(REPO, "fwp_fairseq"))
    args = p.parse_args()
    mode_name = "quick" if args.quick else "full" if args.full else "demo"
    if args.full:  # the paper's code: stop after 10 evaluations without a new best, or at 0.001
        args.stop_patience, args.stop_min_improvement = 10, 0.0
    if args.valid_queries == 0:
        args.valid_queries = 10 ** 9

    runs = plan_runs(mode_name)
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r["model"] in keep]
    os.makedirs(os.path.join(args.out_dir, "logs"), exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    save_dir = tempfile.mkdtemp(prefix="fwp_demo_")
    jobs = []
    for r in runs:
        name = f"s{r['setting']}_{r['model']}_{r['update']}_S{r['S']}"
        jobs.append((r, fairseq_args(r, args, save_dir), os.path.join(args.out_dir, "logs", name + ".log"),
                     args.subprocess, threads))
    # Longest first (roughly: budget x sequence length x (d_dot + S)), so the jobs end together.
    def cost(run):
        d_dot = MODELS[run["model"]][4] or 64
        return run["max_update"] * run["S"] * run["setting"] * (d_dot + run["S"]) * (3 if run["update"] == "delta" else 1)
    order = sorted(range(len(jobs)), key=lambda i: -cost(jobs[i][0]))
    print(f"{mode_name}: {len(runs)} fairseq trainings on {args.jobs} job(s) x {threads} thread(s); "
          f"logs in {os.path.join(args.out_dir, 'logs')}", flush=True)
    print("one run, by hand: fairseq-train " + " ".join(shlex.quote(a) for a in jobs[order[0]][1]), flush=True)

    # A plain kill (SIGTERM) unwinds like Ctrl-C, so the pool takes its workers down with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.time()
    results = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs, initializer=_worker_init, initargs=(threads,)) as pool:
        for n, res in enumerate(pool.imap_unordered(run_one, [jobs[i] for i in order]), 1):
            results.append(res)
            paper = paper_value(res)
            print(f"[{n:2d}/{len(jobs)}] setting {res['setting']} {row_label(res):26s} S={res['S']:<4d} "
                  f"eval loss {fmt(res['eval_loss']):>6s} (paper {fmt(paper, True):>6s}) "
                  f"after {res['updates']:5d} updates, {res['seconds']:5.0f} s  [{time.time() - start:4.0f} s]",
                  flush=True)
        pool.close()
        pool.join()
    wall = time.time() - start
    results.sort(key=lambda r: (r["setting"], list(MODELS).index(r["model"]), r["update"] != "sum", r["S"]))
    meta = dict(mode=mode_name, wall_seconds=round(wall, 1), jobs=args.jobs, threads=threads,
                steps_scale=args.steps_scale, queries_per_seq=args.queries, seed=args.seed,
                command=" ".join(shlex.quote(a) for a in sys.argv))
    write_outputs(results, args.out_dir, meta)
    print()
    print(format_tables(results))
    print(f"wall time {wall:.0f} s. Written: {os.path.join(args.out_dir, 'results.csv')}, "
          f"{os.path.join(args.out_dir, 'results.json')}, {os.path.join(args.out_dir, 'results.png')}")


if __name__ == "__main__":
    main()
