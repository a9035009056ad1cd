"""Draw what carry_state_drift.py --json measured: the loss by position along the stream (bins of
segments) and, for carried checkpoints, the norm of every layer's carried state after each segment.

    python experiments/carried_state/plot_drift.py OUT.png LABEL=drift.json [LABEL=drift.json ...]
        [--bin-segments 16] [--title "..."]

One curve per file in the loss panel; one curve per file and layer in the state panel (files
without carried state have none). Segments are counted from the start of the split.
"""
import argparse
import json


def binned(bits, tokens, size):
    """Token-weighted mean bits per bin of `size` segments: (bin centres, means)."""
    xs, ys = [], []
    for lo in range(0, len(bits), size):
        b, t = bits[lo:lo + size], tokens[lo:lo + size]
        xs.append(lo + (len(b) - 1) / 2)
        ys.append(sum(x * n for x, n in zip(b, t)) / sum(t))
    return xs, ys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("png")
    ap.add_argument("runs", nargs="+", metavar="LABEL=JSON")
    ap.add_argument("--bin-segments", type=int, default=16)
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    if args.bin_segments < 1:
        raise SystemExit("--bin-segments must be >= 1")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(11, 4))
    for run in args.runs:
        label, sep, path = run.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=JSON, got {run!r}")
        with open(path) as f:
            d = json.load(f)
        line, = ax_loss.plot(*binned(d["bits"], d["tokens"], args.bin_segments), label=label)
        for layer, norms in enumerate(zip(*(d.get("state_norm") or []))):
            ax_norm.plot(range(1, len(norms) + 1), norms, color=line.get_color(),
                         alpha=1.0 - 0.6 * layer / max(1, len(d["state_norm"][0]) - 1),
                         label=f"{label}, layer {layer}")
    ax_loss.set(xlabel="segment along the stream", ylabel=f"bits per token (bins of {args.bin_segments})",
                title="loss by position")
    ax_norm.set(xlabel="segments read", ylabel="|S| (Frobenius)", title="carried state norm",
                xscale="log", yscale="log")
    for ax in (ax_loss, ax_norm):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
