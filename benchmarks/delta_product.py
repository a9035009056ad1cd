"""DeltaProduct's cost: forward+backward of a causal fast-weight self-attention layer (an LM
layer's attention: projections, feature map, recurrence, output projection) with
--fwp-householder N against N = 1, at several lengths, ungated and with the forget gate;
with --op, of the op fast_weight_delta_product alone (impl chunked, B=4, H=8, D=64).

Process CPU time on one thread (the machine may be shared: CPU time is less disturbed by other
jobs than wall time), the N's interleaved within each repetition, median over --reps.
Writes results/delta_product.md and .json (results/ is gitignored).

    python benchmarks/delta_product.py                      # T = 256, 1024; N = 1, 2, 3
    python benchmarks/delta_product.py --lengths 256 --reps 3
    python benchmarks/delta_product.py --op                 # the op alone
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention  # noqa: E402
from fwp_fairseq.ops import fast_weight_delta_product  # noqa: E402


def build(n, gate, dim, heads):
    torch.manual_seed(0)
    return FastWeightAttention(dim, heads, self_attention=True, causal=True, feature_map="identity",
                               update="delta", l2_norm=True, beta_range="double", gate=gate, householder=n)


class Op:
    """The op alone on unit keys, beta in (0, 2), called like a layer: x (T, B, H*D)."""

    def __init__(self, n, gate, heads, head_dim=64):
        self.n, self.gate, self.heads, self.head_dim = n, gate, heads, head_dim

    def zero_grad(self, set_to_none=True):
        pass

    def __call__(self, x, *_):
        T, B, _ = x.shape
        H, D, n = self.heads, self.head_dim, self.n
        unit = torch.nn.functional.normalize
        q = unit(x.view(T, B, H, D).permute(1, 2, 0, 3), dim=-1)
        k = unit(x.view(T, B, H, D).permute(1, 2, 0, 3).repeat_interleave(n, dim=2).flip(-1), dim=-1)
        v = x.view(T, B, H, D).permute(1, 2, 0, 3).repeat_interleave(n, dim=2)
        beta = 2 * torch.sigmoid(k.sum(-1))
        g = None if self.gate == "none" else -torch.nn.functional.softplus(q.sum(-1))
        return fast_weight_delta_product(q, k, v, beta, n, impl="chunked", g=g)


def step_seconds(layer, x):
    """CPU seconds of one forward + backward."""
    layer.zero_grad(set_to_none=True)
    start = time.process_time()
    layer(x, x, x)[0].sum().backward()
    return time.process_time() - start


def measure(lengths, ns, gates, batch, dim, heads, reps, op=False):
    rows = []
    for gate in gates:
        for T in lengths:
            layers = {n: Op(n, gate, heads) if op else build(n, gate, dim, heads) for n in ns}
            x = torch.randn(T, batch, heads * 64 if op else dim, requires_grad=True)
            for layer in layers.values():  # warm-up
                step_seconds(layer, x)
            times = {n: [] for n in ns}
            for _ in range(reps):
                for n, layer in layers.items():  # interleaved: a load change hits every N alike
                    times[n].append(step_seconds(layer, x))
            med = {n: statistics.median(t) for n, t in times.items()}
            rows.append(dict(gate=gate, T=T, seconds={str(n): med[n] for n in ns},
                             ratio={str(n): med[n] / med[ns[0]] for n in ns}))
            print(f"gate={gate} T={T}: " + "  ".join(f"N={n} {med[n]:.4f}s ({med[n] / med[ns[0]]:.2f}x)" for n in ns),
                  flush=True)
    return rows


def write(rows, ns, out, meta):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(f"{meta['what']}\n\n")
        f.write("| gate | T | " + " | ".join(f"N={n} (s)" for n in ns) + " | "
                + " | ".join(f"N={n} / N={ns[0]}" for n in ns[1:]) + " |\n")
        f.write("|---|---|" + "---|" * (2 * len(ns) - 1) + "\n")
        for r in rows:
            f.write(f"| {r['gate']} | {r['T']} | " + " | ".join(f"{r['seconds'][str(n)]:.4f}" for n in ns) + " | "
                    + " | ".join(f"{r['ratio'][str(n)]:.2f}x" for n in ns[1:]) + " |\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--householder", type=int, nargs="+", default=[1, 2, 3], help="the N's; the first is the baseline")
    p.add_argument("--gates", nargs="+", default=["none", "scalar"], choices=["none", "scalar"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--op", action="store_true",
                   help="time the op alone (impl chunked, head dim 64, --heads heads; default out "
                        "results/delta_product_op)")
    p.add_argument("--out", default=None, help="default results/delta_product (--op: results/delta_product_op)")
    args = p.parse_args()
    if args.out is None:
        args.out = os.path.join(ROOT, "results", "delta_product_op" if args.op else "delta_product")
    torch.set_num_threads(args.threads)
    rows = measure(args.lengths, args.householder, args.gates, args.batch, args.dim, args.heads, args.reps, args.op)
    subject = (f"fast_weight_delta_product (impl chunked, unit keys, beta in (0, 2)), H={args.heads}, D=64"
               if args.op else f"Causal fast-weight self-attention (identity + L2 keys, beta in (0, 2)), "
               f"d_model {args.dim}, {args.heads} heads, impl auto")
    what = (f"{subject}, B={args.batch}, fp32, forward+backward, process CPU seconds on "
            f"{args.threads} thread(s), median of {args.reps}, torch {torch.__version__}")
    write(rows, args.householder, args.out, dict(vars(args), what=what))
    print(f"Written: {args.out}.md, .json")


if __name__ == "__main__":
    main()
