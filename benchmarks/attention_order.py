"""The association order at translation lengths, on this machine's CPU (1 thread by default):

1. the attention core, forward+backward: the state order (what runs now: noncausal.py's K^T V then
   Q S, the chunked sum and delta rules) against the attention order (Q K^T) V (noncausal.py,
   quadratic.py), with ops/plan.py's flop ratio and pick;
2. one decoding step (beam reorder + write + read, no grad) with the state kept as its factors
   (K, U) against the d_dot x Dv matrix, at t = 1..96 steps written; and one encoder-decoder read;
3. where the time of one FastWeightAttention layer goes, forward+backward: its pieces timed from
   the outside (projections, feature map with its normalisation, attention normaliser, core),
   the whole layer as it is (the cheaper order picked by the ops), and the whole layer with the
   state order forced (the ops' order choice switched off for the timing only), against
   fairseq's softmax attention.

    python benchmarks/attention_order.py [--reps 5] [--threads 1] [--out results/attention_order]

Writes <out>.md and <out>.json. Times are medians of the process's CPU time (time.process_time).
Default shape: B=220 sentences of T=15 tokens, 256 dims in 4 heads of 64, fp32; d_dot 256 for
DPFP nu=2, 64 for linear (elu+1) features."""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fwp_fairseq.ops import fast_weight_delta, fast_weight_noncausal, fast_weight_sum  # noqa: E402
from fwp_fairseq.ops.plan import causal_flops, keep_factored, noncausal_flops  # noqa: E402
from fwp_fairseq.ops.factored_state import FactoredState  # noqa: E402
from fwp_fairseq.ops.quadratic import delta_rule_quadratic, sum_rule_quadratic  # noqa: E402

FEATURES = {"dpfp nu=2": ("dpfp", 2), "linear": ("linear", 1)}


def timed(fn, reps, warmup=1):
    """Median CPU time of this process per call, in ms: on a shared machine the wall clock also
    counts the time other processes hold the cores (with 1 thread, CPU time ~ wall time alone)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return 1e3 * statistics.median(times)


def fwd_bwd(fn, *leaves):
    """Forward then backward of a random linear function of the output (all leaves get grads)."""
    def run():
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        for x in leaves:
            x.grad = None
    return run


def features(B, H, T, Dk, Dv, seed=0):
    """Sum-normalised positive features, values, beta: what the layers feed the core."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, T, Dk, generator=g) + 0.1
    k = torch.rand(B, H, T, Dk, generator=g) + 0.1
    q, k = q / q.sum(-1, keepdim=True), k / k.sum(-1, keepdim=True)
    v = torch.randn(B, H, T, Dv, generator=g)
    beta = torch.rand(B, H, T, generator=g)
    return [x.requires_grad_() for x in (q, k, v, beta)]


# -- 1. the core ------------------------------------------------------------------------------
def core_table(B, H, T, D, reps):
    rows = []
    for name, Dk in (("dpfp nu=2", 2 * D * 2), ("linear", D)):
        q, k, v, beta = features(B, H, T, Dk, D)
        cases = {
            "non-causal": (lambda q, k, v: fast_weight_noncausal(q, k, v, order="state")[0],
                           lambda q, k, v: fast_weight_noncausal(q, k, v, order="quadratic")[0],
                           noncausal_flops(T, T, Dk, D), (q, k, v)),
            "causal sum": (lambda q, k, v: fast_weight_sum(q, k, v, impl="chunked")[0],
                           sum_rule_quadratic, causal_flops("sum", T, Dk, D), (q, k, v)),
            "causal delta": (lambda q, k, v, b: fast_weight_delta(q, k, v, b, impl="chunked")[0],
                             delta_rule_quadratic, causal_flops("delta", T, Dk, D), (q, k, v, beta)),
        }
        for kind, (state_fn, quad_fn, flops, leaves) in cases.items():
            row = {"features": name, "d_dot": Dk, "kind": kind,
                   "state_ms": timed(fwd_bwd(state_fn, *leaves), reps),
                   "quadratic_ms": timed(fwd_bwd(quad_fn, *leaves), reps),
                   "flop_ratio": flops["state"] / flops["quadratic"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# -- 2. decoding steps -------------------------------------------------------------------------
def decoding_table(B, H, D, steps, reps):
    rows = []
    order = torch.arange(B).flip(0)  # a beam reorder that moves every row
    with torch.no_grad():
        for name, Dk in (("dpfp nu=2", 4 * D), ("linear", D)):
            q, k, v, beta = (x.detach() for x in features(B, H, max(steps) + 1, Dk, D))
            for rule in ("sum", "delta"):
                b = beta if rule == "delta" else None
                for t in steps:
                    row = {"features": name, "d_dot": Dk, "rule": rule, "t": t,
                           "auto": "factored" if keep_factored(t, Dk, D) else "matrix"}
                    for form, fold in (("factored", "never"), ("matrix", "now")):
                        state = FactoredState()
                        for i in range(t - 1):
                            state.append(k[:, :, i:i + 1], v[:, :, i:i + 1],
                                         None if b is None else b[:, :, i:i + 1], fold=fold)

                        def step(state=state, fold=fold):
                            s = state if state.empty else state.index_select(order)
                            s = FactoredState(s.keys, s.values, s.matrix)  # append mutates: a fresh copy
                            s.append(k[:, :, t:t + 1], v[:, :, t:t + 1],
                                     None if b is None else b[:, :, t:t + 1], fold=fold)
                            return s.read(q[:, :, t:t + 1])
                        row[f"{form}_ms"] = timed(step, reps)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def cross_table(B, H, D, Tsrc, reps):
    """Encoder-decoder attention while decoding: build once, then per step reorder + read."""
    rows = []
    order = torch.arange(B).flip(0)
    with torch.no_grad():
        for name, Dk in (("dpfp nu=2", 4 * D), ("linear", D)):
            q, k, v, _ = (x.detach() for x in features(B, H, Tsrc, Dk, D))
            row = {"features": name, "d_dot": Dk, "Tsrc": Tsrc,
                   "auto": "factored" if keep_factored(Tsrc, Dk, D) else "matrix"}
            for form, fold in (("factored", "never"), ("matrix", "now")):
                row[f"{form}_build_ms"] = timed(lambda: FactoredState.written(k, v, fold=fold), reps)
                mem = FactoredState.written(k, v, fold=fold)
                row[f"{form}_step_ms"] = timed(lambda: mem.index_select(order).read(q[:, :, :1]), reps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# -- 3. the whole layer -----------------------------------------------------------------------
LAYERS = {  # name: FastWeightAttention keywords (the models' defaults for the normalisations)
    "dpfp nu=2 non-causal": dict(feature_map="dpfp", dpfp_nu=2, causal=False),
    "dpfp nu=2 causal sum": dict(feature_map="dpfp", dpfp_nu=2, causal=True, update="sum"),
    "dpfp nu=2 causal delta": dict(feature_map="dpfp", dpfp_nu=2, causal=True, update="delta"),
    "linear non-causal": dict(feature_map="linear", causal=False),
    "linear causal sum": dict(feature_map="linear", causal=True, update="sum"),
    "linear causal delta": dict(feature_map="linear", causal=True, update="delta"),
}


@contextlib.contextmanager
def state_order_forced():
    """The layer as it ran before the order was wired: the ops' order choice switched off (the
    causal rule's pick and fast_weight_noncausal's order), for the timing only."""
    from fwp_fairseq.modules import fast_weight_attention as fwa
    from fwp_fairseq.ops import plan
    saved = plan.causal_order, fwa.fast_weight_noncausal
    plan.causal_order = lambda *args, **kw: "state"
    fwa.fast_weight_noncausal = lambda q, k, v: saved[1](q, k, v, order="state")
    try:
        yield
    finally:
        plan.causal_order, fwa.fast_weight_noncausal = saved


PIECES = ("projections", "feature map (q, k)", "attention normaliser", "core, state order",
          "core, attention order")


def layer_pieces(a, x, reps):
    """Forward+backward of each piece of a, on leaf inputs shaped as inside a.forward."""
    from fwp_fairseq.modules.precision import to_accumulation as _acc
    T, B, E = x.shape
    pieces = {}
    projs = [a.q_proj, a.k_proj, a.v_proj, a.out_proj] + ([a.beta_proj] if a.beta_proj is not None else [])
    pieces["projections"] = timed(fwd_bwd(lambda x: sum(p(x).sum() for p in projs), x), reps)
    xp = a.q_proj(x).detach().requires_grad_()
    xk = a.k_proj(x).detach().requires_grad_()
    pieces["feature map (q, k)"] = timed(fwd_bwd(
        lambda xp, xk: a._phi(a._heads(xp, B)).sum() + a._phi(a._heads(xk, B)).sum(), xp, xk), reps)
    with torch.no_grad():
        q, k = a._phi(a._heads(xp, B)), a._phi(a._heads(xk, B))
        v = a._heads(a.v_proj(x), B)
        beta = torch.sigmoid(a.beta_proj(x)).permute(1, 2, 0) if a.beta_proj is not None else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((beta,) if beta is not None else ())]
    if a.attn_normalize:
        o = torch.randn(B, a.num_heads, T, v.size(-1)).requires_grad_()

        def norm(o, q, k):
            z = _acc(k).cumsum(2) if a.causal else _acc(k).sum(2, keepdim=True)
            return a._normalise(o, q, z)
        pieces["attention normaliser"] = timed(fwd_bwd(norm, o, *leaves[:2]), reps)
    if not a.causal:
        state = lambda q, k, v: fast_weight_noncausal(q, k, v, order="state")[0]  # noqa: E731
        quad = lambda q, k, v: fast_weight_noncausal(q, k, v, order="quadratic")[0]  # noqa: E731
    elif a.update == "sum":
        state, quad = (lambda q, k, v: fast_weight_sum(q, k, v, impl="chunked")[0]), sum_rule_quadratic
    else:
        state, quad = (lambda q, k, v, b: fast_weight_delta(q, k, v, b, impl="chunked")[0]), delta_rule_quadratic
    pieces["core, state order"] = timed(fwd_bwd(state, *leaves), reps)
    pieces["core, attention order"] = timed(fwd_bwd(quad, *leaves), reps)
    return pieces


def whole_layer(a, x, reps, mask=None):
    def run():
        out = a(x, x, x, attn_mask=mask, need_weights=False)[0]
        out.backward(torch.ones_like(out))
        a.zero_grad(set_to_none=True)
        x.grad = None
    return timed(run, reps)


def layer_table(B, T, E, H, reps):
    import fwp_fairseq
    fwp_fairseq.register()
    from fairseq.modules import MultiheadAttention
    from fwp_fairseq.modules.fast_weight_attention import FastWeightAttention
    x = torch.randn(T, B, E, generator=torch.Generator().manual_seed(0)).requires_grad_()
    rows = []
    torch.manual_seed(0)
    softmax = MultiheadAttention(E, H, self_attention=True)
    future = torch.triu(torch.full((T, T), float("-inf")), 1)
    for name, mask in (("fairseq softmax non-causal", None), ("fairseq softmax causal", future)):
        rows.append({"layer": name, "layer_ms": whole_layer(softmax, x, reps, mask)})
        print(json.dumps(rows[-1]), flush=True)
    for name, kw in LAYERS.items():
        torch.manual_seed(0)
        a = FastWeightAttention(E, H, self_attention=True, **kw)
        row = {"layer": name, "d_dot": a.feature_map.out_dim, "layer_ms": whole_layer(a, x, reps)}
        with state_order_forced():
            row["layer_state_order_ms"] = whole_layer(a, x, reps)
        row["pieces_ms"] = layer_pieces(a, x, reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# -- the report -------------------------------------------------------------------------------
def markdown(res):
    c = res["config"]
    L = [f"B={c['B']}, H={c['H']}, T={c['T']}, head dim {c['D']}, fp32, median CPU time of {c['reps']}; "
         f"{c['cpu']}, {c['threads']} thread(s), torch {c['torch']}", "",
         "## Attention core, forward+backward (ms)", "",
         "| features | d_dot | attention | state order | attention order | speed-up | flop ratio | rule picks |",
         "|---|---|---|---|---|---|---|---|"]
    for r in res["core"]:
        pick = "attention" if r["flop_ratio"] > 1 else "state"
        L.append(f"| {r['features']} | {r['d_dot']} | {r['kind']} | {r['state_ms']:.1f} | {r['quadratic_ms']:.1f} "
                 f"| {r['state_ms'] / r['quadratic_ms']:.2f}x | {r['flop_ratio']:.2f} | {pick} |")
    L += ["", "## One decoding step: beam reorder + write + read, no grad (ms)", "",
          "t = steps written including this one; auto = what keep_factored picks.", "",
          "| features | d_dot | rule | t | factored | matrix | factored / matrix | auto |",
          "|---|---|---|---|---|---|---|---|"]
    for r in res["decoding"]:
        L.append(f"| {r['features']} | {r['d_dot']} | {r['rule']} | {r['t']} | {r['factored_ms']:.2f} "
                 f"| {r['matrix_ms']:.2f} | {r['factored_ms'] / r['matrix_ms']:.2f} | {r['auto']} |")
    L += ["", "## Encoder-decoder attention while decoding (ms)", "",
          "| features | d_dot | T_src | build factored | build matrix | step factored | step matrix | auto |",
          "|---|---|---|---|---|---|---|---|"]
    for r in res["cross"]:
        L.append(f"| {r['features']} | {r['d_dot']} | {r['Tsrc']} | {r['factored_build_ms']:.2f} "
                 f"| {r['matrix_build_ms']:.2f} | {r['factored_step_ms']:.2f} | {r['matrix_step_ms']:.2f} "
                 f"| {r['auto']} |")
    names = [n for n in PIECES if any(n in r.get("pieces_ms", {}) for r in res["layers"])]
    L += ["", f"## One attention layer ({c['E']} dims, {c['H']} heads), forward+backward (ms)", "",
          "Layer as is: the order the ops pick (the attention order at this length); state order: "
          "the choice switched off. Pieces timed one by one on leaf inputs; 'rest' = layer as is - "
          "the pieces with the attention-order core (reshapes, masking, casts, autograd bookkeeping).", "",
          "| layer | d_dot | layer, state order | layer as is | " + " | ".join(names) + " | rest |",
          "|---|---|---|---|" + "---|" * (len(names) + 1)]
    for r in res["layers"]:
        p = r.get("pieces_ms", {})
        cells = [f"{p[n]:.1f}" if n in p else "-" for n in names]
        rest = r["layer_ms"] - sum(v for n, v in p.items() if n != "core, state order") if p else None
        before = r.get("layer_state_order_ms")
        L.append(f"| {r['layer']} | {r.get('d_dot', '-')} | {'-' if before is None else f'{before:.1f}'} | "
                 f"{r['layer_ms']:.1f} | " + " | ".join(cells)
                 + f" | {'-' if rest is None else f'{rest:.1f}'} |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=220)
    ap.add_argument("--length", type=int, default=15)
    ap.add_argument("--embed-dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 48, 64, 96])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-layers", action="store_true", help="only the ops (no fairseq import)")
    ap.add_argument("--out", default="results/attention_order")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, T, E, H = args.batch, args.length, args.embed_dim, args.heads
    D = E // H
    res = {"config": {"B": B, "T": T, "E": E, "H": H, "D": D, "reps": args.reps, "threads": args.threads,
                      "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}}
    res["core"] = core_table(B, H, T, D, args.reps)
    res["decoding"] = decoding_table(B, H, D, args.steps, 4 * args.reps)
    res["cross"] = cross_table(B, H, D, T, 4 * args.reps)
    res["layers"] = [] if args.skip_layers else layer_table(B, T, E, H, args.reps)
    md = markdown(res)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    print(md)
    print(f"wrote {args.out}.md, {args.out}.json")


if __name__ == "__main__":
    main()
