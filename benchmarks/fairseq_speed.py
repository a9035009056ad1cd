"""fwp_lm against the softmax model of the same size (the speed claims of the paper, section 6):

1. fairseq-train words per second at several --tokens-per-sample (real fairseq-train runs on a
   synthetic corpus, the same tokens per update for every length);
2. incremental greedy generation: time per token by position range and peak memory over
   1..N generated tokens (each config in a fresh process, so that peak RSS is its own).

Writes results/fairseq_speed.md and results/fairseq_speed.json (results/ is gitignored).

    .venv/bin/python benchmarks/fairseq_speed.py            # full: 256/1024/4096, 4096 tokens
    .venv/bin/python benchmarks/fairseq_speed.py --quick    # tiny smoke run
"""
import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fwp_fairseq")
BIN = os.path.dirname(sys.executable)

CONFIGS = {
    "softmax": ["--fwp-kernel", "softmax"],
    "linear-sum": ["--fwp-kernel", "linear", "--fwp-update", "sum"],
    "linear-delta": ["--fwp-kernel", "linear", "--fwp-update", "delta"],
    "dpfp-delta": ["--fwp-kernel", "dpfp", "--fwp-update", "delta", "--fwp-dpfp-nu", "1"],
}
RANGES = [(1, 64), (64, 256), (256, 1024), (1024, 2048), (2048, 4096)]


def model_args(layers, dim, heads, ffn):
    # The reference size: fairseq transformer_lm, 4 layers, 256 dims, 4 heads, FFN 1024.
    return ["--arch", "fwp_lm", "--decoder-layers", str(layers), "--decoder-embed-dim", str(dim),
            "--decoder-input-dim", str(dim), "--decoder-output-dim", str(dim),
            "--decoder-attention-heads", str(heads), "--decoder-ffn-embed-dim", str(ffn),
            "--decoder-normalize-before", "--dropout", "0.1"]


def _env(threads):
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


# -- corpus -----------------------------------------------------------------------------------

def make_corpus(workdir, n_tokens, vocab, threads):
    """Zipf-distributed random words, binarised with fairseq-preprocess."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(vocab)]
    weights = [1.0 / (i + 1) for i in range(vocab)]
    text = os.path.join(workdir, "train.txt")
    with open(text, "w") as f:
        left = n_tokens
        while left > 0:
            n = min(left, rng.randint(10, 40))
            f.write(" ".join(rng.choices(words, weights, k=n)) + "\n")
            left -= n
    dest = os.path.join(workdir, "bin")
    subprocess.run([os.path.join(BIN, "fairseq-preprocess"), "--only-source", "--trainpref", text,
                    "--destdir", dest, "--workers", "1"], check=True, capture_output=True, env=_env(threads))
    return dest


# -- training ---------------------------------------------------------------------------------

def train_wps(data, cfg, tps, max_tokens, updates, margs, threads):
    cmd = [os.path.join(BIN, "fairseq-train"), data, "--user-dir", PKG, "--cpu", "--task", "language_modeling",
           *margs, *CONFIGS[cfg], "--tokens-per-sample", str(tps), "--sample-break-mode", "none",
           "--max-tokens", str(max_tokens), "--optimizer", "adam", "--lr", "1e-4",
           "--max-update", str(updates), "--log-interval", "1", "--log-format", "json",
           "--no-progress-bar", "--no-save", "--disable-validation", "--num-workers", "0", "--seed", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads))
    if p.returncode != 0:
        return {"error": (p.stdout + p.stderr)[-2000:]}
    wps = [float(m) for m in re.findall(r'"wps": "?([0-9.]+)', p.stdout + p.stderr)]
    steady = wps[2:] if len(wps) > 3 else wps  # the first updates include warm-up
    return {"wps": statistics.median(steady) if steady else None, "samples": wps}


# -- generation (runs in its own process) -----------------------------------------------------

def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def gen_worker(cfg, n_tokens, vocab, margs, seed=1):
    import types

    import torch
    from fairseq import models, options
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import fwp_fairseq
    fwp_fairseq.register()
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        "/nonexistent", "--task", "language_modeling", "--user-dir", PKG, *margs, *CONFIGS[cfg],
        "--tokens-per-sample", str(n_tokens + 1)])
    d = Dictionary()
    for i in range(vocab):
        d.add_symbol(f"w{i}")
    torch.manual_seed(seed)
    model = models.build_model(convert_namespace_to_omegaconf(args).model,
                               types.SimpleNamespace(source_dictionary=d, target_dictionary=d))
    model.eval()
    tokens = torch.full((1, n_tokens + 1), d.eos(), dtype=torch.long)
    state, times, rss = {}, [], {}
    base = _rss_mb()
    with torch.no_grad():
        for t in range(n_tokens):
            start = time.perf_counter()
            out = model.decoder(tokens[:, : t + 1], incremental_state=state)
            tokens[0, t + 1] = out[0][0, -1].argmax()  # greedy
            times.append(time.perf_counter() - start)
            if (t + 1) in (64, 256, 1024, 2048, 4096) or t + 1 == n_tokens:
                rss[t + 1] = _rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ms = {}
    for lo, hi in RANGES:
        if hi <= n_tokens:
            ms[f"{lo}-{hi}"] = 1000 * statistics.mean(times[lo - 1:hi])
    print("RESULT " + json.dumps({"ms_per_token": ms, "rss_mb_at": rss, "rss_before_mb": base,
                                  "peak_rss_mb": peak, "n_tokens": n_tokens}))


def gen_stats(cfg, n_tokens, vocab, margs, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--gen-worker", cfg, "--gen-tokens", str(n_tokens),
           "--vocab", str(vocab), "--model", json.dumps(margs)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads))
    m = re.search(r"^RESULT (.*)$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        return {"error": (p.stdout + p.stderr)[-2000:]}
    return json.loads(m.group(1))


# -- report -----------------------------------------------------------------------------------

def markdown(res):
    lines = [f"# fwp_lm speed ({res['setup']})", "", "## fairseq-train words per second", ""]
    tps = res["tokens_per_sample"]
    lines += ["| model | " + " | ".join(f"{t} tok/sample" for t in tps) + " |",
              "|---|" + "---|" * len(tps)]
    for cfg, row in res["train"].items():  # noqa: B007
        cells = []
        for t in tps:
            r = row[str(t)]
            soft = res["train"].get("softmax", {}).get(str(t), {}).get("wps")
            if r.get("wps") is None:
                cells.append("error")
            elif soft and cfg != "softmax":
                cells.append(f"{r['wps']:,.0f} ({r['wps'] / soft:.2f}x)")
            else:
                cells.append(f"{r['wps']:,.0f}")
        lines.append(f"| {cfg} | " + " | ".join(cells) + " |")
    lines += ["", f"## Incremental greedy generation, 1..{res['gen_tokens']} tokens", ""]
    ranges = [f"{lo}-{hi}" for lo, hi in RANGES if hi <= res["gen_tokens"]]
    lines += ["| model | " + " | ".join(f"ms/token @ {r}" for r in ranges) + " | peak RSS MB | RSS growth MB |",
              "|---|" + "---|" * (len(ranges) + 2)]
    for cfg, r in res["generate"].items():
        if "error" in r:
            lines.append(f"| {cfg} | error |")
            continue
        growth = max(r["rss_mb_at"].values()) - r["rss_before_mb"]
        lines.append(f"| {cfg} | " + " | ".join(f"{r['ms_per_token'][x]:.2f}" for x in ranges)
                     + f" | {r['peak_rss_mb']:.0f} | {growth:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, minutes)")
    ap.add_argument("--tokens-per-sample", type=int, nargs="+")
    ap.add_argument("--updates", type=int, help="fairseq-train updates per run")
    ap.add_argument("--gen-tokens", type=int)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=0, help="OMP/MKL threads of the runs (0: torch default)")
    ap.add_argument("--only", choices=["train", "generate"], help="run one half only")
    ap.add_argument("--out", default=os.path.join(ROOT, "results"))
    ap.add_argument("--gen-worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.gen_worker:
        return gen_worker(a.gen_worker, a.gen_tokens, a.vocab, json.loads(a.model))

    if a.quick:
        margs, tps, updates, gen = model_args(2, 64, 2, 128), a.tokens_per_sample or [64, 128], a.updates or 4, a.gen_tokens or 64
        vocab = min(a.vocab, 1000)
    else:
        margs, tps, updates, gen = model_args(4, 256, 4, 1024), a.tokens_per_sample or [256, 1024, 4096], a.updates or 12, a.gen_tokens or 4096
        vocab = a.vocab
    max_tokens = max(tps)  # the same number of tokens per update at every length
    res = {"setup": f"{'quick' if a.quick else 'full'}: model {' '.join(margs[2:])}, vocab {vocab}, "
                    f"{max_tokens} tokens/update, {updates} updates, threads {a.threads or 'default'}",
           "tokens_per_sample": tps, "gen_tokens": gen, "train": {}, "generate": {}}
    with tempfile.TemporaryDirectory() as work:
        data = make_corpus(work, max_tokens * (updates + 2), vocab, a.threads) if a.only != "generate" else None
        for cfg in (a.configs if a.only != "generate" else []):
            res["train"][cfg] = {}
            for t in tps:
                r = train_wps(data, cfg, t, max_tokens, updates, margs, a.threads)
                res["train"][cfg][str(t)] = r
                print(f"train {cfg} tps={t}: {r.get('wps') or r.get('error')}", flush=True)
    for cfg in (a.configs if a.only != "train" else []):
        r = gen_stats(cfg, gen, vocab, margs, a.threads)
        res["generate"][cfg] = r
        print(f"generate {cfg}: {r.get('ms_per_token') or r.get('error')}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "fairseq_speed.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(a.out, "fairseq_speed.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
