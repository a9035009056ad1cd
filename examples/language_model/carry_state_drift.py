"""How a carried-state checkpoint fares along its streams: loss by position, and the size of
each layer's carried fast weights (task fwp_stream_lm --fwp-carry-state, fwp_lm).

    python examples/language_model/carry_state_drift.py CHECKPOINT [--data data-bin/tinyshakespeare]
        [--split valid] [--streams 1] [--tokens-per-sample 256] [--bin-segments 20]

Prints, for each bin of consecutive segments, the loss (bits per token) of the tokens in it, and
the Frobenius norm of every layer's carried state S after 1, 2, 4, ... segments; the last line is
the whole split's loss, the number fairseq-eval-lm prints for the same streams. A loss that
rises with the position while |S| keeps growing means the state has not settled within the
trained stream length (README: "Fast weights carried across segments").
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
    args = ap.parse_args(argv)

    from fairseq import checkpoint_utils

    import fwp_fairseq

    fwp_fairseq.register()
    overrides = {"data": args.data, "fwp_carry_state": True, "eval_streams": args.streams}
    if args.tokens_per_sample:
        overrides["tokens_per_sample"] = args.tokens_per_sample
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.checkpoint], arg_overrides=overrides)
    if task.__class__.__name__ != "StreamLanguageModelingTask":
        raise SystemExit("the checkpoint was not trained with --task fwp_stream_lm")
    model = models[0].eval()
    layers = model.fast_self_attention()
    task.load_dataset(args.split)
    batches = task.eval_lm_dataloader(task.dataset(args.split), num_workers=0)
    pad = task.target_dictionary.pad()

    bins, total, count, report = {}, 0.0, 0, 1
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
            s, c = bins.get(b // args.bin_segments, (0.0, 0))
            bins[b // args.bin_segments] = (s + nll, c + n)
            if b + 1 == report:  # after 1, 2, 4, ... segments
                report *= 2
                norms = " ".join(f"{layer._carried['eval'][0].norm().item():9.2f}" for layer in layers)
                print(f"after {b + 1:5d} segments: |S| per layer {norms}", flush=True)
    for k, (s, c) in sorted(bins.items()):
        first = k * args.bin_segments
        print(f"segments {first:5d}-{first + args.bin_segments - 1:5d}: {s / c / math.log(2):.4f} bits/token")
    print(f"whole split: {total / count / math.log(2):.4f} bits/token "
          f"(perplexity {2 ** (total / count / math.log(2)):.2f})")


if __name__ == "__main__":
    main()
