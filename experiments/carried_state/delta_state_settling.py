"""How long a carried delta-rule state takes to settle, for each feature map (fwp_fairseq.ops only).

    python experiments/carried_state/delta_state_settling.py [--T 65536] [--d 16 32 64] [--beta 0.5] [--out DIR]

One head of each size d, keys = sum-normalised phi(x) with x ~ N(0, I_d), values correlated with x
(v = x M + noise, as when both come from the same input), constant beta; the state S is carried
over T steps in segments, and its Frobenius norm is printed after 256, 512, ... steps. A norm that
is still growing at T means the state has not settled: old content along rarely written key
directions is erased too slowly (see experiments/carried_state/README.md). The
smaller the head, the larger each sum-normalised key (|k|^2 >= 1/d) and the sooner it settles.
"""
import argparse
import json
import os

import torch

from fwp_fairseq.modules.feature_maps import DPFPFeatureMap, LinearFeatureMap, l2_normalize, sum_normalize
from fwp_fairseq.ops import fast_weight_delta

# name: (feature map class, normalisation of phi); sum is the paper's, L2 is --fwp-l2-normalize.
# The project's own maps and normalisers (fwp_fairseq.modules.feature_maps imports no fairseq).
FEATURES = {
    "linear (elu+1)": (LinearFeatureMap, sum_normalize),
    "dpfp nu=1": (DPFPFeatureMap, sum_normalize),
    "linear (elu+1), L2": (LinearFeatureMap, l2_normalize),
}


def settle(feature_map, T, d, beta, seed=0, segment=4096, norm=sum_normalize):
    """{t: |S| after t steps} for t = 256, 512, ... and T."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    phi = feature_map(d)
    S, norms, done, mark = None, {}, 0, 256
    while done < T:
        n = min(segment, mark - done, T - done)  # stop at every reporting point
        x = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
        k = norm(phi(x), 1e-6)
        v = x @ M + 0.5 * torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
        b = torch.full((1, 1, n), beta, dtype=torch.float64)
        _, S = fast_weight_delta(k, k, v, b, initial_state=S, output_final_state=True, impl="chunked")
        done += n
        if done == mark:
            norms[done] = S.norm().item()
            mark *= 2
    norms[done] = S.norm().item()
    return norms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--d", type=int, nargs="+", default=[16, 32, 64], help="head dimensions (d_key)")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--out", default=None, help="also write settling.json and settling.md here")
    args = ap.parse_args(argv)
    res = {f"{name}, d={d}": settle(fmap, args.T, d, args.beta, norm=norm)
           for d in args.d for name, (fmap, norm) in FEATURES.items()}
    steps = sorted({t for r in res.values() for t in r})
    lines = [f"|S| of a carried delta-rule state (one head, beta={args.beta}, fp64) after t steps", "",
             "| feature map, head dim | " + " | ".join(str(t) for t in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for name, r in res.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[t]:.1f}" for t in steps) + " |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        json.dump({"args": vars(args), "norms": res}, open(os.path.join(args.out, "settling.json"), "w"), indent=1)
        open(os.path.join(args.out, "settling.md"), "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
