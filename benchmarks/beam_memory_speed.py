"""Beam search with the encoder-decoder memory kept once per sentence (modules/beam_memory.py)
against one memory row per beam (as before it), in one process, interleaved batch by batch, on a
trained Multi30k checkpoint: beam 5, batch 64, every hypothesis pinned to --gen-len tokens (as in
multi30k_speed.py); reports sentences/s of both (process CPU time of SequenceGenerator.generate)
and whether they give the same hypotheses (tokens and scores).

    python benchmarks/beam_memory_speed.py --data data-bin/multi30k --path CKPT.pt [--batches 5]
        [--reps 2] [--gen-len 20] [--threads 1]
"""
import argparse
import statistics
import time

import torch


def load(path, data):
    import fwp_fairseq
    fwp_fairseq.register()
    from fairseq import checkpoint_utils
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    task.load_dataset("test")
    itr = task.get_batch_iterator(task.dataset("test"), max_sentences=64, num_workers=0)
    return models[0].eval(), task, list(itr.next_epoch_itr(shuffle=False))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--path", required=True, help="a checkpoint of examples/translation/run_multi30k.sh")
    ap.add_argument("--batches", type=int, default=5, help="the first N batches of 64 test sentences")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--gen-len", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fairseq.sequence_generator import SequenceGenerator

    from fwp_fairseq.modules import fast_weight_attention
    model, task, batches = load(args.path, args.data)
    batches = batches[:args.batches]
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=5, max_len_a=0,
                            max_len_b=args.gen_len, min_len=args.gen_len)
    shared_rows = fast_weight_attention.one_row_per_sentence
    modes = {"one row per beam": lambda *a: None, "one row per sentence": shared_rows}
    seconds = {m: [] for m in modes}
    hypos = {}
    with torch.no_grad():
        for _ in range(args.reps):
            for mode, pick in modes.items():
                fast_weight_attention.one_row_per_sentence = pick
                t0 = time.process_time()
                out = [gen.generate([model], b) for b in batches]
                seconds[mode].append(time.process_time() - t0)
                hypos[mode] = [[(h["tokens"].tolist(), h["score"].item()) for h in sent] for batch in out
                               for sent in batch]
    fast_weight_attention.one_row_per_sentence = shared_rows
    n = sum(b["nsentences"] for b in batches)
    speed = {m: n / statistics.median(s) for m, s in seconds.items()}
    a, b = hypos.values()
    same_tokens = [[t for t, _ in s] for s in a] == [[t for t, _ in s] for s in b]
    score_diff = max(abs(x[1] - y[1]) for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    print(f"{n} sentences x {args.reps} reps, beam 5, {args.gen_len} tokens, {args.threads} thread(s)")
    print("| memory | sentences/s (CPU) | runs (s) |")
    print("|---|---|---|")
    for m, s in seconds.items():
        print(f"| {m} | {speed[m]:.1f} | {', '.join(f'{x:.1f}' for x in s)} |")
    print(f"per sentence / per beam: {speed['one row per sentence'] / speed['one row per beam']:.2f}x; "
          f"same hypotheses (tokens): {same_tokens}; largest score difference {score_diff:.2e}")


if __name__ == "__main__":
    main()
