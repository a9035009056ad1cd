"""How a carried-state checkpoint fares along its streams: loss by position, and the size of
each layer's carried fast weights (task fwp_stream_lm --fwp-carry-state, fwp_lm).

    python experiments/carried_state/carry_state_drift.py CHECKPOINT [--data data-bin/tinyshakespeare]
        [--split valid] [--streams 1] [--tokens-per-sample 256] [--bin-segments 20]
        [--reset-segments 128] [--context-window 192] [--fold 32] [--json drift.json]

Prints, for each bin of consecutive segments, the loss (bits per token) of the tokens in it, and
the Frobenius norm of every layer's carried state S after 1, 2, 4, ... segments; the last line is
the whole split's loss, the number fairseq-eval-lm prints for the same streams. A loss that
rises with the position while |S| keeps growing means the state has not settled within the
trained stream length (experiments/carried_state/README.md).

A checkpoint trained without carried state (task language_modeling) is scored the way
run_carry_state.sh scores it, with sliding windows of --tokens-per-sample tokens of which the
last (tokens-per-sample - context-window) are scored, and binned by the same segments, so that
the two models of a pair can be compared bin by bin on the same text.

--fold N also prints the loss by position within each period of N segments (position 0, 1,
2-3, 4-7, ...): with N the reset period, what a carried state adds as it ages; the same N on the
model without carried state gives the numbers to compare on the same characters.

--json PATH writes the loss of every segment and, for carried checkpoints, every layer's |S|
after every segment (plot_drift.py draws them by position).
"""
import argparse
import math

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="data-bin/tinyshakespeare")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--streams", type=int, default=1, help="streams the split is cut into")
    ap.add_argument("--tokens-per-sample", type=int, default=None, help="default: the checkpoint's")
    ap.add_argument("--bin-segments", type=int, default=20, help="segments per loss bin")
    ap.add_argument("--reset-segments", type=int, default=0,
                    help="carried state: reset it every N segments (--fwp-eval-reset-segments)")
    ap.add_argument("--context-window", type=int, default=None,
                    help="checkpoints without carried state: context tokens of each sliding window "
                         "(default: 3/4 of --tokens-per-sample, as run_carry_state.sh)")
    ap.add_argument("--fold", type=int, default=0,
                    help="also print the loss by position within each period of N segments")
    ap.add_argument("--json", default=None, help="write the loss (and |S|) of every segment here")
    args = ap.parse_args(argv)
    if args.fold < 0 or args.bin_segments < 1:
        raise SystemExit("--fold must be >= 0 and --bin-segments >= 1")

    from fairseq import checkpoint_utils

    import fwp_fairseq

    fwp_fairseq.register()
    state = checkpoint_utils.load_checkpoint_to_cpu(args.checkpoint)
    carried = state["cfg"]["task"]._name == "fwp_stream_lm"
    overrides = {"data": args.data}
    if carried:
        overrides.update(fwp_carry_state=True, eval_streams=args.streams)
    elif args.reset_segments:
        raise SystemExit("--reset-segments: the checkpoint was trained without carried state")
    if args.tokens_per_sample:
        overrides["tokens_per_sample"] = args.tokens_per_sample
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.checkpoint], arg_overrides=overrides)
    model = models[0].eval()
    if not carried:
        return sliding_windows(model, task, args)
    # set here, not as an override: checkpoints from before the option lack the field
    model.set_carry_reset(model.carry_reset_segments, args.reset_segments)
    layers = model.fast_self_attention()
    task.load_dataset(args.split)
    batches = task.eval_lm_dataloader(task.dataset(args.split), num_workers=0)
    pad = task.target_dictionary.pad()

    segs, norms_by_seg, total, count, report = {}, [], 0.0, 0, 1
    print(f"{args.split}: {args.streams} stream(s), {len(layers)} fast-weight layers")
    with torch.no_grad():
        for b, batch in enumerate(batches):
            out = model(**batch["net_input"])
            lp = model.get_normalized_probs(out, log_probs=True)
            tgt = batch["target"]
            keep = tgt.ne(pad)
            nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[keep].sum().item()
            n = int(keep.sum())
            total, count = total + nll, count + n
            segs[b] = (nll, n)
            norms_by_seg.append([layer._carried["eval"][0].norm().item() for layer in layers])
            if b + 1 == report:  # after 1, 2, 4, ... segments
                report *= 2
                norms = " ".join(f"{x:9.2f}" for x in norms_by_seg[-1])
                print(f"after {b + 1:5d} segments: |S| per layer {norms}", flush=True)
    _report(segs, args.bin_segments, total, count, args.fold)
    _write_json(args, segs, norms_by_seg)


def _write_json(args, segs, norms_by_seg=None):
    """--json: per segment, bits per token and tokens; per segment and layer, |S| (carried only)."""
    if not args.json:
        return
    import json

    rows = [segs[i] for i in sorted(segs)]
    out = {"checkpoint": args.checkpoint, "split": args.split, "reset_segments": args.reset_segments,
           "bits": [s / c / math.log(2) for s, c in rows], "tokens": [c for _, c in rows],
           "state_norm": norms_by_seg}
    with open(args.json, "w") as f:
        json.dump(out, f)
    print(f"wrote {args.json}")


def _report(segs, bin_segments, total, count, fold=0):
    """segs: {segment index: (nll sum in nats, tokens)}."""
    for k, (s, c) in sorted(_pool(segs, lambda i: i // bin_segments).items()):
        first = k * bin_segments
        print(f"segments {first:5d}-{first + bin_segments - 1:5d}: {s / c / math.log(2):.4f} bits/token")
    for lo, hi, bits, tokens in fold_bins(segs, fold):
        print(f"position {lo:5d}-{hi:5d} of every {fold} segments: {bits:.4f} bits/token ({tokens:,} tokens)")
    print(f"whole split: {total / count / math.log(2):.4f} bits/token "
          f"(perplexity {2 ** (total / count / math.log(2)):.2f})")


def _pool(segs, key):
    """Sum the segments {index: (nll, tokens)} that share key(index): {key: (nll, tokens)}."""
    pooled = {}
    for i, (s, c) in segs.items():
        ps, pc = pooled.get(key(i), (0.0, 0))
        pooled[key(i)] = (ps + s, pc + c)
    return pooled


def fold_bins(segs, fold):
    """Pool the segments {index: (nll sum in nats, tokens)} by position within each period of
    `fold` segments, in groups 0, 1, 2-3, 4-7, ...: [(first, last, bits per token, tokens)]."""
    if not fold:
        return []
    # the group of position p starts at the highest power of two <= p (0 for p = 0)
    pooled = _pool(segs, lambda i: (i % fold) and 1 << ((i % fold).bit_length() - 1))
    return [(lo, min(fold, max(1, 2 * lo)) - 1, s / c / math.log(2), c) for lo, (s, c) in sorted(pooled.items())]


def sliding_windows(model, task, args):
    """Score target p (inputs </s>, x_1.., targets x_1..) in the window that ends with the block of
    `stride` targets holding it and starts `context` tokens before that block (fewer at the start),
    as fairseq-eval-lm --context-window does; bin the losses by segment of --tokens-per-sample."""
    import numpy as np
    from fairseq.data import data_utils

    from fwp_fairseq.data import TokenStream

    if args.streams != 1:
        raise SystemExit("--streams: a checkpoint without carried state is scored as one stream")
    seg = task.args.tokens_per_sample
    context = seg * 3 // 4 if args.context_window is None else args.context_window
    if not 0 <= context < seg:
        raise SystemExit(f"--context-window must be in [0, {seg}), got {context}")
    stride = seg - context
    d = task.source_dictionary
    data = data_utils.load_indexed_dataset(f"{args.data}/{args.split}", d, task.args.dataset_impl)
    if data is None:
        raise SystemExit(f"no {args.split} split in {args.data}")
    tgt = torch.from_numpy(TokenStream(data, d.pad(), d.eos()).tokens.astype(np.int64))
    inp = torch.cat([tgt.new_tensor([d.eos()]), tgt[:-1]])
    n = len(tgt)
    print(f"{args.split}: {n:,} tokens, sliding windows of {seg} scoring the last {stride} "
          f"(no carried state)")
    nll = torch.zeros(n)
    with torch.no_grad():
        # Blocks whose window is shorter than seg (the first ones), then full windows in batches.
        starts = list(range(0, n, stride))
        full = [a for a in starts if a + stride - seg >= 0 and a + stride <= n]
        for a in sorted(set(starts) - set(full)):
            lo, hi = max(0, a + stride - seg), min(n, a + stride)
            lp = model.get_normalized_probs(model(inp[lo:hi][None]), log_probs=True)[0]
            nll[a:hi] = -lp[a - lo:].gather(-1, tgt[a:hi, None]).squeeze(-1)
        for i in range(0, len(full), 64):
            blocks = torch.tensor(full[i:i + 64])
            idx = blocks[:, None] + torch.arange(stride - seg, stride)[None]
            lp = model.get_normalized_probs(model(inp[idx]), log_probs=True)[:, context:]
            nll[idx[:, context:]] = -lp.gather(-1, tgt[idx[:, context:]].unsqueeze(-1)).squeeze(-1)
    segs = {i: (chunk.sum().item(), len(chunk)) for i, chunk in enumerate(nll.split(seg))}
    _report(segs, args.bin_segments, nll.sum().item(), n, args.fold)
    _write_json(args, segs)


if __name__ == "__main__":
    main()
