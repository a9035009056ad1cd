"""What the parts of today's DeltaNet layer cost on the CPU: forward + backward of one fwp_lm
decoder layer (fast-weight self-attention, FFN, layer norms; d_model 256, 4 heads, FFN 1024 as
in the Tiny Shakespeare recipe) with the Gated DeltaNet core (identity + L2 q/k, delta rule,
beta in (0, 2), scalar gate), then the same with --fwp-short-conv 4, with --fwp-output-norm
rms-gated, and with both (the fwp_lm_gated_deltanet layer). The variants run interleaved in one
process, each timed reps times; the table gives medians and the ratio to the core layer. The
convolution and the norm run their compiled CPU kernels (modules/cpu_kernels.py), or with
--pytorch-paths the PyTorch paths they fall back to.

    python benchmarks/layer_parts.py --threads 1 [--lengths 256 1024] [--batch 4] [--reps 7]
        [--pytorch-paths] [--out results/layer_parts]
"""
import argparse
import json
import os
import statistics
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ["--fwp-kernel", "identity", "--fwp-l2-normalize", "--fwp-update", "delta", "--fwp-gate", "scalar",
        "--fwp-beta-range", "double"]
VARIANTS = {"core": [], "short conv 4": ["--fwp-short-conv", "4"],
            "rms-gated norm": ["--fwp-output-norm", "rms-gated"],
            "both (preset)": ["--fwp-short-conv", "4", "--fwp-output-norm", "rms-gated"]}


def build_layer(flags, dim=256, heads=4, ffn=1024):
    """Decoder layer 0 of an fwp_lm built through fairseq's own argument path."""
    from fairseq import models, options
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    import fwp_fairseq
    fwp_fairseq.register()
    args = options.parse_args_and_arch(options.get_training_parser(), [
        "/nonexistent", "--task", "language_modeling", "--arch", "fwp_lm", "--user-dir",
        os.path.dirname(fwp_fairseq.__file__), "--dropout", "0", "--decoder-layers", "1",
        "--decoder-embed-dim", str(dim), "--decoder-ffn-embed-dim", str(ffn),
        "--decoder-attention-heads", str(heads), *CORE, *flags])
    d = Dictionary()
    task = types.SimpleNamespace(source_dictionary=d, target_dictionary=d)
    torch.manual_seed(0)
    model = models.build_model(convert_namespace_to_omegaconf(args).model, task)
    return model.decoder.layers[0].train()


def step(layer, x):
    layer.zero_grad(set_to_none=True)
    out = layer(x)[0]
    out.square().mean().backward()


def measure(T, batch, reps):
    layers = {name: build_layer(flags) for name, flags in VARIANTS.items()}
    x = torch.randn(T, batch, 256, generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in layers}
    for name, layer in layers.items():
        step(layer, x)  # warm-up
    for _ in range(reps):  # interleaved: machine load hits every variant alike
        for name, layer in layers.items():
            t = time.process_time()
            step(layer, x)
            times[name].append(time.process_time() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--pytorch-paths", action="store_true",
                    help="the PyTorch paths of the convolution and the norm, not the CPU kernels")
    ap.add_argument("--out", default="results/layer_parts")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    from fwp_fairseq.modules import cpu_kernels
    if args.pytorch_paths:
        os.environ[cpu_kernels.ENV] = "0"
    paths = "PyTorch paths" if cpu_kernels.extension() is None else "CPU kernels"
    rows = {T: measure(T, args.batch, args.reps) for T in args.lengths}
    names = list(VARIANTS)
    lines = [f"B={args.batch}, d_model 256, 4 heads, FFN 1024, fp32, forward+backward of one layer, "
             f"median of {args.reps} (process CPU time, {args.threads} thread(s)), seconds; ratio to the core layer; "
             f"convolution and norm: {paths}",
             "", "| T | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for T, res in rows.items():
        cells = [f"{res[n]:.4f}" + ("" if n == "core" else f" ({res[n] / res['core']:.2f}x)") for n in names]
        lines.append(f"| {T} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": vars(args), "seconds": rows}, f, indent=1)


if __name__ == "__main__":
    main()
