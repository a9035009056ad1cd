"""Where one training step of the Multi30k recipe's model spends its CPU time (torch.profiler).

Builds run_multi30k.sh's model (3+3 layers, 256 dims, 4 heads, FFN 512, shared embeddings) for
each --rows kernel, runs forward + backward of label-smoothed cross-entropy on one batch of random
tokens shaped like the recipe's (--batch sentences x --len tokens on both sides, about 4,096
target tokens), and prints the ops by self CPU time and the step's total, rows interleaved over
--reps rounds so that a drifting machine load hits every row alike.

    python benchmarks/profile_step.py [--rows softmax dpfp] [--reps 3] [--top 15] [--threads 1]
"""
import argparse
import statistics
import time

import torch

RECIPE = ["--arch", "fwp_transformer", "--encoder-layers", "3", "--decoder-layers", "3",
          "--encoder-embed-dim", "256", "--decoder-embed-dim", "256", "--encoder-ffn-embed-dim", "512",
          "--decoder-ffn-embed-dim", "512", "--encoder-attention-heads", "4",
          "--decoder-attention-heads", "4", "--share-all-embeddings", "--dropout", "0.3"]
ROWS = {"softmax": ["--fwp-kernel", "softmax"],
        "linear": ["--fwp-kernel", "linear", "--fwp-update", "sum"],
        "dpfp": ["--fwp-kernel", "dpfp", "--fwp-dpfp-nu", "2", "--fwp-update", "sum"],
        "delta": ["--fwp-kernel", "linear", "--fwp-update", "delta"]}


def build(row, vocab):
    import os
    import types

    from fairseq import models, options
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    pkg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fwp_fairseq")
    args = options.parse_args_and_arch(options.get_training_parser(), [
        "/nonexistent", "--task", "translation", "--user-dir", pkg, *RECIPE, *ROWS[row]])
    d = Dictionary()
    for i in range(vocab):
        d.add_symbol(f"w{i}")
    torch.manual_seed(0)
    task = types.SimpleNamespace(source_dictionary=d, target_dictionary=d)
    return models.build_model(convert_namespace_to_omegaconf(args).model, task).train(), d


def step_fn(model, d, batch, length):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(d.nspecial, len(d), (batch, length), generator=g)
    tgt = torch.randint(d.nspecial, len(d), (batch, length), generator=g)
    prev = torch.cat([torch.full((batch, 1), d.eos()), tgt[:, :-1]], 1)
    lengths = torch.full((batch,), length)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(src, lengths, prev)
        lp = model.get_normalized_probs(out, log_probs=True)
        nll = -lp.gather(-1, tgt.unsqueeze(-1)).mean()
        loss = 0.9 * nll - 0.1 * lp.mean()  # label smoothing 0.1
        loss.backward()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=["softmax", "dpfp"], choices=tuple(ROWS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--len", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true", help="only the interleaved step times")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import fwp_fairseq
    fwp_fairseq.register()
    steps = {}
    for row in args.rows:
        model, d = build(row, args.vocab)
        steps[row] = step_fn(model, d, args.batch, args.len)
        steps[row]()  # warm-up
    times = {row: [] for row in args.rows}
    for _ in range(args.reps):
        for row in args.rows:
            t0 = time.process_time()
            steps[row]()
            times[row].append(time.process_time() - t0)
    base = statistics.median(times[args.rows[0]])
    for row in args.rows:
        med = statistics.median(times[row])
        print(f"{row}: median step {med * 1e3:.0f} ms CPU ({len(times[row])} reps: "
              f"{', '.join(f'{t * 1e3:.0f}' for t in times[row])}), {args.rows[0]} / {row} = {base / med:.2f}x")
    if args.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile
    for row in args.rows:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps[row]()
        print(f"\n== {row}: ops by self CPU time ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
