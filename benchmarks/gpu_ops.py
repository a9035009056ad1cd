"""GPU benchmark of the fast-weight recurrences against the fastest public baselines.

    python benchmarks/gpu_ops.py --out DIR [--T 512 2048 8192] [--D 64 128] [--budget-s 240]
    python benchmarks/gpu_ops.py --suite chunk --out DIR [--budget-s 240]

--suite chunk: the chunkwise tensor-core kernels (kernel="chunk", delta rule bf16) side by side
with the sequential kernel (bf16), causal flash SDPA (bf16), fla's chunk_delta_rule (bf16) and
fused_recurrent_delta_rule (bf16), shape by shape in one process (every ratio from one run), at
the paper's shapes (arXiv 2102.11174, Sec. 6: B*H = 768, D = 16, T = 256; B*H = 448, D = 32,
T = 384; B*H = 2048, D = 64, T = 64) and at B = 8, H = 8, T = 512 ... 16384, D = 64, 128:
forward, forward+backward and peak memory; DIR/chunk.json after every run, DIR/chunk.md at the end.

B=8, H=8. For every (T, D): forward+backward (and forward without grad) time of
  cuda / chunked / auto    fwp_fairseq.ops (delta rule fp32 and bf16, sum rule fp32)
  sdpa_flash               torch's causal scaled_dot_product_attention, flash backend (bf16, fp16)
  fla_fused_recurrent      flash-linear-attention fused_recurrent_delta_rule (fp32)
  fla_chunk                flash-linear-attention chunk_delta_rule (bf16)
fla runs are skipped with a note when the package cannot be imported. Writes DIR/bench.json and
DIR/bench.md."""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fwp_fairseq.ops import cuda_available, fast_weight_delta, fast_weight_sum  # noqa: E402

B, H = 8, 8
# (B, H, T, D) of the chunk suite: the paper's shapes, then the long-sequence sweep.
CHUNK_SHAPES = ([(96, 8, 256, 16), (56, 8, 384, 32), (256, 8, 64, 64)]
                + [(8, 8, T, D) for T in (512, 1024, 2048, 4096, 8192, 16384) for D in (64, 128)])
CHUNK_METHODS = ["chunk_delta_bf16", "cuda_delta_bf16", "sdpa_flash_bf16", "fla_chunk_bf16",
                 "fla_fused_recurrent_bf16"]


def _features(shape, dtype, gen):
    x = torch.rand(shape, generator=gen, device="cuda") + 0.1
    return (x / x.sum(-1, keepdim=True)).to(dtype)


def make_inputs(T, D, dtype, layout="bhtd", seed=0, b=B, h=H):
    """Sum-normalised q, k (as the delta-rule models use), v, beta; all requiring grad."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (b, h, T, D) if layout == "bhtd" else (b, T, h, D)
    q, k = _features(shape, dtype, gen), _features(shape, dtype, gen)
    v = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    beta = torch.rand(shape[:3], generator=gen, device="cuda").to(dtype)
    return [x.requires_grad_(True) for x in (q, k, v, beta)]


def _ours(rule, impl):
    if rule == "delta":
        return lambda q, k, v, b: fast_weight_delta(q, k, v, b, impl=impl)[0]
    return lambda q, k, v, b: fast_weight_sum(q, k, v, impl=impl)[0]


def _chunk_kernel(q, k, v, b):
    from fwp_fairseq.ops import cuda_backend

    return cuda_backend.delta_rule_cuda(q, k, v, b, kernel="chunk")[0]


def _sdpa(q, k, v, b):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _fla():
    try:
        from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"flash-linear-attention not importable: {type(e).__name__}: {e}"
    return (fused_recurrent_delta_rule, chunk_delta_rule), "ok"


def _fla_fn(op):
    # fla takes (B, T, H, D); scale=1 matches o_t = S_t^T q_t.
    return lambda q, k, v, b: op(q, k, v, b, scale=1.0)[0]


# What the targets compare first: cuda vs fla's fused recurrent (fp32), auto vs flash softmax
# (T=8192), auto bf16 vs fla's chunk kernel; then the rest.
PRIORITY = ["cuda_delta_fp32", "fla_fused_recurrent_fp32", "sdpa_flash_bf16", "auto_delta_bf16",
            "fla_chunk_bf16", "chunked_delta_bf16", "auto_delta_fp32", "cuda_sum_fp32",
            "chunked_delta_fp32", "cuda_delta_bf16", "sdpa_flash_fp16", "chunk_delta_bf16",
            "fla_fused_recurrent_bf16"]


# name -> (function maker, dtype, layout)
def methods(fla_ops):
    m = {
        "cuda_delta_fp32": (lambda: _ours("delta", "cuda"), torch.float32, "bhtd"),
        "cuda_delta_bf16": (lambda: _ours("delta", "cuda"), torch.bfloat16, "bhtd"),
        "cuda_sum_fp32": (lambda: _ours("sum", "cuda"), torch.float32, "bhtd"),
        "chunked_delta_fp32": (lambda: _ours("delta", "chunked"), torch.float32, "bhtd"),
        "chunked_delta_bf16": (lambda: _ours("delta", "chunked"), torch.bfloat16, "bhtd"),
        "auto_delta_fp32": (lambda: _ours("delta", "auto"), torch.float32, "bhtd"),
        "auto_delta_bf16": (lambda: _ours("delta", "auto"), torch.bfloat16, "bhtd"),
        "sdpa_flash_bf16": (lambda: _sdpa, torch.bfloat16, "bhtd"),
        "sdpa_flash_fp16": (lambda: _sdpa, torch.float16, "bhtd"),
    }
    if fla_ops is not None:
        fused, chunk = fla_ops
        m["fla_fused_recurrent_fp32"] = (lambda: _fla_fn(fused), torch.float32, "bthd")
        m["fla_chunk_bf16"] = (lambda: _fla_fn(chunk), torch.bfloat16, "bthd")
        m["fla_fused_recurrent_bf16"] = (lambda: _fla_fn(fused), torch.bfloat16, "bthd")
    m["chunk_delta_bf16"] = (lambda: _chunk_kernel, torch.bfloat16, "bhtd")
    return m


def _time(fn, reps):
    """Median milliseconds of fn() over reps runs, after one warm-up (builds, autotuning)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_one(fn, inputs, reps):
    q, k, v, b = inputs
    w = torch.randn_like(v)

    def fwd_bwd():
        for x in inputs:
            x.grad = None
        o = fn(q, k, v, b)
        (o * w).sum().backward()

    def fwd():
        with torch.no_grad():
            fn(q, k, v, b)

    rec = {"fwd_bwd_ms": _time(fwd_bwd, reps), "fwd_ms": _time(fwd, reps)}
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()  # peak memory above the inputs, of one forward+backward
    torch.cuda.synchronize()
    rec["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return rec


def cross_check(fla_ops):
    """Max relative difference of our fp32 delta-rule output against fla's fused recurrent."""
    out = {}
    q, k, v, b = [x.detach() for x in make_inputs(512, 64, torch.float32)]
    with torch.no_grad():
        ref = fast_weight_delta(q.double(), k.double(), v.double(), b.double(), impl="chunked")[0]
        scale = ref.abs().max()
        for impl in ("cuda", "chunked"):
            try:
                o = fast_weight_delta(q, k, v, b, impl=impl)[0]
                out[f"{impl}_vs_fp64"] = ((o.double() - ref).abs().max() / scale).item()
            except Exception as e:  # noqa: BLE001
                out[f"{impl}_vs_fp64"] = f"error: {e}"
        if fla_ops is not None:
            t = [x.transpose(1, 2).contiguous() for x in (q, k, v)] + [b.transpose(1, 2).contiguous()]
            o = fla_ops[0](*t, scale=1.0)[0].transpose(1, 2)
            out["fla_fused_vs_fp64"] = ((o.double() - ref).abs().max() / scale).item()
    return out


def write_table(results, path, device):
    results = [r for r in results if (r.get("B", B), r.get("H", H)) == (B, H)]
    measured = {r["method"] for r in results if "fwd_bwd_ms" in r}
    names = sorted(measured, key=lambda n: (not n.startswith("cuda"), n))
    unmeasured = sorted({r["method"] for r in results} - measured)
    keys = sorted({(r["T"], r["D"]) for r in results})
    get = {(r["T"], r["D"], r["method"]): r for r in results}
    lines = ["Forward+backward time in ms (forward without grad in parentheses), B=8, H=8, "
             "on " + device + ".", "",
             "| T | D | " + " | ".join(names) + " | cuda/fla_fused | auto_bf16/flash_bf16 |",
             "|---|---|" + "---|" * (len(names) + 2)]
    for T, D in keys:
        cells = []
        for n in names:
            r = get.get((T, D, n))
            if r is None or "fwd_bwd_ms" not in r:
                cells.append("n/a" if r is None else "skip" if "skipped" in r else "err")
            else:
                cells.append(f"{r['fwd_bwd_ms']:.2f} ({r['fwd_ms']:.2f})")

        def ratio(a, b):
            ra, rb = get.get((T, D, a), {}), get.get((T, D, b), {})
            if "fwd_bwd_ms" in ra and "fwd_bwd_ms" in rb:
                return f"{ra['fwd_bwd_ms'] / rb['fwd_bwd_ms']:.2f}x"
            return "n/a"

        lines.append(f"| {T} | {D} | " + " | ".join(cells) + f" | "
                     f"{ratio('cuda_delta_fp32', 'fla_fused_recurrent_fp32')} | "
                     f"{ratio('auto_delta_bf16', 'sdpa_flash_bf16')} |")
    if unmeasured:  # a column with no number at all is left out, and named here
        lines += ["", "Not measured (time budget or error, see bench.json): " + ", ".join(unmeasured)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chunk_table(results, path, device):
    """The chunk suite's table: a row per shape, a cell per method (fwd+bwd ms, forward ms, peak
    MiB), and the chunk kernel's time over each other method's (below 1: the chunk kernel is
    faster); cells that did not run say why."""
    get = {(r["B"], r["H"], r["T"], r["D"], r["method"]): r for r in results}
    shapes = list(dict.fromkeys((r["B"], r["H"], r["T"], r["D"]) for r in results))
    others = CHUNK_METHODS[1:]
    lines = [f"Delta rule, ms forward+backward / forward / peak MiB, on {device}.", "",
             "| B | H | T | D | " + " | ".join(CHUNK_METHODS) + " | "
             + " | ".join(f"chunk/{n}" for n in others) + " |",
             "|---|---|---|---|" + "---|" * (len(CHUNK_METHODS) + len(others))]
    for shape in shapes:
        cells, fb = [], {}
        for n in CHUNK_METHODS:
            r = get.get((*shape, n))
            if r is None:
                cells.append("n/a")
            elif "fwd_bwd_ms" in r:
                fb[n] = r["fwd_bwd_ms"]
                cells.append(f"{r['fwd_bwd_ms']:.2f} / {r['fwd_ms']:.2f} / {r['peak_mb']:.0f}")
            else:
                cells.append("skip" if "skipped" in r else "err")
        ratios = [f"{fb['chunk_delta_bf16'] / fb[n]:.2f}x" if "chunk_delta_bf16" in fb and n in fb
                  else "n/a" for n in others]
        lines.append("| " + " | ".join(map(str, shape)) + " | " + " | ".join(cells + ratios) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def chunk_check():
    """Relative RMS difference of the chunk kernel's bf16 delta-rule output from fp64 (T=300,
    D=64): a wrong kernel shows here before its timings are read."""
    q, k, v, b = [x.detach() for x in make_inputs(300, 64, torch.bfloat16)]
    with torch.no_grad():
        ref = fast_weight_delta(q.double(), k.double(), v.double(), b.double(), impl="chunked")[0]
        try:
            o = _chunk_kernel(q, k, v, b).double()
        except Exception as e:  # noqa: BLE001
            return f"error: {type(e).__name__}: {str(e)[:300]}"
    return ((o - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def run_chunk_suite(args, meta, fla_ops):
    """Shape by shape, every method of CHUNK_METHODS (side by side in this process); partial
    results in DIR/chunk.json after each run."""
    meta["chunk_check_rel_rms"] = chunk_check()
    print("chunk check:", meta["chunk_check_rel_rms"], flush=True)
    table, results, t_start = methods(fla_ops), [], time.time()
    for b, h, T, D in CHUNK_SHAPES:
        for name in CHUNK_METHODS:
            rec = {"method": name, "B": b, "H": h, "T": T, "D": D, "dtype": "bfloat16"}
            if name not in table:
                rec["skipped"] = meta["fla"]
            elif time.time() - t_start > args.budget_s:
                rec["skipped"] = "time budget"
            else:
                make, dtype, layout = table[name]
                try:
                    rec.update(bench_one(make(), make_inputs(T, D, dtype, layout, b=b, h=h), args.reps))
                except Exception as e:  # noqa: BLE001 - record and go on
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                finally:
                    torch.cuda.empty_cache()
            results.append(rec)
            print(json.dumps(rec), flush=True)
            with open(os.path.join(args.out, "chunk.json"), "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
    write_chunk_table(results, os.path.join(args.out, "chunk.md"), meta["device"])
    print(open(os.path.join(args.out, "chunk.md")).read())


def dump(meta, results, out):
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip what is left after this")
    ap.add_argument("--only", nargs="*", help="method names to run (default: all)")
    ap.add_argument("--suite", choices=["ops", "chunk"], default="ops",
                    help="ops: the B=8, H=8 table (bench.md); chunk: the chunk kernels (chunk.md)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("gpu_ops.py needs a CUDA device")

    fla_ops, fla_note = _fla()
    ok, why = cuda_available()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "B": B, "H": H, "cuda_backend": why if not ok else "ok", "fla": fla_note}
    try:
        import fla
        meta["fla_version"] = getattr(fla, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    print(json.dumps(meta), flush=True)
    if args.suite == "chunk":
        return run_chunk_suite(args, meta, fla_ops)
    meta["cross_check"] = cross_check(fla_ops)
    print("cross-check:", meta["cross_check"], flush=True)

    t_start = time.time()
    results = []
    # Method by method in PRIORITY order (each over every shape), so that a budget that runs out
    # costs the least important columns, not the largest T.
    table = methods(fla_ops)
    order = [n for n in PRIORITY if n in table] + [n for n in table if n not in PRIORITY]
    for name in order:
        make, dtype, layout = table[name]
        if args.only and name not in args.only:
            continue
        for T in args.T:
            for D in args.D:
                rec = {"method": name, "T": T, "D": D, "dtype": str(dtype).replace("torch.", "")}
                if time.time() - t_start > args.budget_s:
                    rec["skipped"] = "time budget"
                    results.append(rec)
                    continue
                try:
                    inputs = make_inputs(T, D, dtype, layout)
                    rec.update(bench_one(make(), inputs, args.reps))
                except Exception as e:  # noqa: BLE001 - record and go on
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                finally:
                    inputs = None
                    torch.cuda.empty_cache()
                results.append(rec)
                print(json.dumps(rec), flush=True)
                dump(meta, results, args.out)  # after each run: a killed benchmark keeps its numbers

    dump(meta, results, args.out)
    write_table(results, os.path.join(args.out, "bench.md"), meta["device"])
    print(open(os.path.join(args.out, "bench.md")).read())


if __name__ == "__main__":
    main()
