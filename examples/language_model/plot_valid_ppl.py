"""Draw valid perplexity over updates for the rows of run_tinyshakespeare.sh, from the
validations that fairseq-train logged in each row's train.log.

    python examples/language_model/plot_valid_ppl.py OUT.png RESULTS_DIR [RESULTS_DIR ...] [--title "..."]

Every RESULTS_DIR/ROW/train.log with logged validations gives one curve (colour per row, line
style per RESULTS_DIR, e.g. one per seed). These are fairseq-train's numbers: the valid split cut
into blocks of the training context, so each block's first characters have little context and the
perplexity is above the sliding-window one of fairseq-eval-lm in the table.
"""
import argparse
import os
import re

# fairseq's simple log: "... | valid | epoch 001 | valid on 'valid' subset | loss 2.7 | ppl 6.61 | ... | num_updates 123 ..."
VALID_LINE = re.compile(r"\| valid on 'valid' subset \|.*?\| ppl ([0-9.]+) \|.*?\| num_updates ([0-9]+)")


def valid_curve(log_path):
    """(updates, perplexities) of the validations in one fairseq-train log, sorted by update,
    one point per update (the last logged one: an epoch's end can coincide with the interval)."""
    points = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            m = VALID_LINE.search(line)
            if m:
                points[int(m.group(2))] = float(m.group(1))
    updates = sorted(points)
    return updates, [points[u] for u in updates]


def curves(results_dirs):
    """{(results_dir, row): (updates, ppls)} for every row folder with logged validations."""
    found = {}
    for results in results_dirs:
        for row in sorted(os.listdir(results)) if os.path.isdir(results) else []:
            log = os.path.join(results, row, "train.log")
            if os.path.isfile(log):
                updates, ppls = valid_curve(log)
                if updates:
                    found[(results, row)] = (updates, ppls)
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("png")
    ap.add_argument("results", nargs="+", metavar="RESULTS_DIR")
    ap.add_argument("--title", default="Tiny Shakespeare: valid perplexity (fairseq-train, blocks of the context)")
    args = ap.parse_args(argv)
    found = curves(args.results)
    if not found:
        print(f"plot_valid_ppl: no validations logged under {' '.join(args.results)}; no plot")
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = sorted({row for _, row in found})
    colours = {row: plt.get_cmap("tab10")(i % 10) for i, row in enumerate(rows)}
    styles = {d: ("-", "--", ":", "-.")[i % 4] for i, d in enumerate(args.results)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (results, row), (updates, ppls) in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        label = row if len(args.results) == 1 else f"{row} ({os.path.basename(os.path.normpath(results))})"
        ax.plot(updates, ppls, styles[results], color=colours[row], marker=".", label=label)
    ax.set_xlabel("updates")
    ax.set_ylabel("valid perplexity (per character)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 10, not 10^1
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_title(args.title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"Plot: {args.png}")


if __name__ == "__main__":
    main()
