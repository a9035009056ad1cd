"""Forward+backward time of the fast-weight ops on this machine's CPU, against causal softmax
attention (torch's scaled_dot_product_attention) and the step-by-step reference, and the cost of
the gated rules (a log-decay g) over the ungated chunked forms.

    python benchmarks/ops.py [--lengths 256 1024 4096] [--out results/ops] [--threads N] [--clock cpu]

Writes <out>.md (the README's tables), <out>.json and <out>.png. Shapes: B=4, H=8, D=64, fp32,
sum-normalised keys and queries (as the models use them); decays exp(g) = sigmoid(N(3, 1)),
about 0.93 on average."""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fwp_fairseq.ops import fast_weight_delta, fast_weight_sum  # noqa: E402
from fwp_fairseq.ops._chunking import CHUNK  # noqa: E402


def inputs(B, H, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).softmax(-1).requires_grad_()
    k = torch.randn(B, H, T, D, generator=g).softmax(-1).requires_grad_()
    v = torch.randn(B, H, T, D, generator=g).requires_grad_()
    beta = torch.rand(B, H, T, generator=g).requires_grad_()
    log_g = F.logsigmoid(torch.randn(B, H, T, generator=g) + 3).requires_grad_()
    return q, k, v, beta, log_g


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def timed_together(fns, reps, warmup=1):
    """Median times of several ops run in turn, rep after rep: on a shared machine a burst of
    load then slows all of them alike, and their ratios stay meaningful."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fwd_bwd(op):
    def run():
        o = op()
        o.backward(torch.ones_like(o))
    return run


def delta_chunked_flops(BH, T, Dk, Dv, C=CHUNK):
    """Multiply-add FLOPs (2 m n k per product) of every product in the chunked delta rule's
    forward and backward (delta_rule/chunked.py), plus the C^3/3 triangular inverse."""
    C = min(C, T)
    N = -(-T // C)
    cc, ckv = C * C, C * Dk * Dv
    fwd = 2 * (cc * Dk + cc * (Dk + Dv) + 2 * ckv + cc * Dk + ckv + cc * Dv) + C ** 3 / 3
    bwd = 2 * (cc * Dv + ckv + 2 * ckv + cc * Dv + ckv + cc * Dk + ckv + cc * Dk + ckv
               + 2 * cc * (Dk + Dv) + 2 * cc * Dk)
    return BH * N * (fwd + bwd)


def matmul_gflops(n=1024, reps=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timed(lambda: a @ b, reps) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reference-max-len", type=int, default=1024,
                    help="skip the step-by-step reference above this length (it takes seconds per 1K steps)")
    ap.add_argument("--out", default="results/ops")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or this process's CPU time (steadier on a shared machine: time spent "
                         "waiting for a core is not counted; with several threads their times add up)")
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    B, H, D = args.batch, args.heads, args.dim
    rows = []
    mm = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 1024^3 matmul: {mm:.0f} GFLOP/s",
          flush=True)
    for T in args.lengths:
        q, k, v, beta, log_g = inputs(B, H, T, D)
        row = {"T": T}
        row.update(timed_together({
            "chunked_delta_s": fwd_bwd(lambda: fast_weight_delta(q, k, v, beta, impl="chunked")[0]),
            "gated_delta_s": fwd_bwd(lambda: fast_weight_delta(q, k, v, beta, impl="chunked", g=log_g)[0]),
            "chunked_sum_s": fwd_bwd(lambda: fast_weight_sum(q, k, v, impl="chunked")[0]),
            "gated_sum_s": fwd_bwd(lambda: fast_weight_sum(q, k, v, impl="chunked", g=log_g)[0]),
        }, args.reps))
        row["sdpa_s"] = timed(fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                              max(1, args.reps // 2))
        if T <= args.reference_max_len:
            row["reference_delta_s"] = timed(
                fwd_bwd(lambda: fast_weight_delta(q, k, v, beta, impl="reference")[0]), 1, warmup=0)
        else:
            row["reference_delta_s"] = None
        row["chunked_delta_gflops"] = delta_chunked_flops(B * H, T, D, D) / row["chunked_delta_s"] / 1e9
        row["matmul_gflops"] = mm
        rows.append(row)
        print(json.dumps(row), flush=True)
    write(rows, args, B, H, D)


def write(rows, args, B, H, D):
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    head = (f"B={B}, H={H}, D={D}, fp32, forward+backward, median of {args.reps} ({args.clock} clock); "
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    lines = [head, "",
             "| T | reference delta (s) | chunked delta (s) | chunked sum (s) | causal SDPA (s) "
             "| delta vs reference | delta vs SDPA | chunked delta GFLOP/s | fp32 matmul GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = r["reference_delta_s"]
        ref_s = "skipped" if ref is None else f"{ref:.3f}"
        speedup = "-" if ref is None else f"{ref / r['chunked_delta_s']:.0f}x"
        lines.append(
            f"| {r['T']} | {ref_s} | {r['chunked_delta_s']:.4f} "
            f"| {r['chunked_sum_s']:.4f} | {r['sdpa_s']:.4f} "
            f"| {speedup} "
            f"| {r['sdpa_s'] / r['chunked_delta_s']:.2f}x | {r['chunked_delta_gflops']:.0f} | {r['matmul_gflops']:.0f} |")
    lines += ["", "The gated rules (a log-decay g), chunked, against the same rules without g:", "",
              "| T | chunked delta (s) | gated delta (s) | gated / ungated delta "
              "| chunked sum (s) | gated sum (s) | gated / ungated sum |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['chunked_delta_s']:.4f} | {r['gated_delta_s']:.4f} "
            f"| {r['gated_delta_s'] / r['chunked_delta_s']:.2f}x "
            f"| {r['chunked_sum_s']:.4f} | {r['gated_sum_s']:.4f} | {r['gated_sum_s'] / r['chunked_sum_s']:.2f}x |")
    md = "\n".join(lines) + "\n"
    with open(args.out + ".md", "w") as f:
        f.write(md)
    with open(args.out + ".json", "w") as f:
        json.dump({"config": {"B": B, "H": H, "D": D, "reps": args.reps, "clock": args.clock,
                              "threads": torch.get_num_threads()}, "rows": rows}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        Ts = [r["T"] for r in rows]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key, label in (("chunked_delta_s", "chunked delta"), ("chunked_sum_s", "chunked sum"),
                           ("gated_delta_s", "chunked gated delta"), ("gated_sum_s", "chunked gated sum"),
                           ("sdpa_s", "causal softmax (SDPA)"), ("reference_delta_s", "step loop (delta)")):
            pts = [(t, r[key]) for t, r in zip(Ts, rows) if r[key] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("forward+backward (s)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=120)
    except ImportError:
        pass
    print(md)
    print(f"wrote {args.out}.md, {args.out}.json, {args.out}.png")


if __name__ == "__main__":
    main()
