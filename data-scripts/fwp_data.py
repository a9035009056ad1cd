#!/usr/bin/env python3
"""Small helpers for the prepare-*.sh scripts (sentencepiece, dictionary,
character-level tokens, checks). Run `python fwp_data.py SUBCOMMAND --help`."""

import argparse
import collections
import gzip
import html
import os
import re
import sys

SPACE = "\u2581"  # the sentencepiece word marker, reused for character-level spaces


def open_text(path, mode="rt"):
    # Raw downloads are often gzipped; read them without unpacking to disk.
    if path.endswith(".gz"):
        return gzip.open(path, mode, encoding="utf-8", newline="\n")
    return open(path, mode, encoding="utf-8", newline="\n")


def read_lines(path):
    with open_text(path) as f:
        for line in f:
            yield line.rstrip("\n")


# ---------------------------------------------------------------- sentencepiece

def spm_train(a):
    import sentencepiece as spm

    kwargs = dict(
        input=",".join(a.input),
        model_prefix=a.prefix,
        vocab_size=a.vocab_size,
        model_type=a.model_type,
        character_coverage=a.character_coverage,
        byte_fallback=a.byte_fallback,
        num_threads=a.threads,
        # fairseq adds its own <pad>/<s>/</s>/<unk>; keep spm's ids irrelevant.
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        minloglevel=2,
    )
    if a.input_sentence_size:
        kwargs.update(input_sentence_size=a.input_sentence_size, shuffle_input_sentence=True)
    # spm reads plain files only; unpack gz inputs to a temporary file.
    tmp = None
    if any(p.endswith(".gz") for p in a.input):
        tmp = a.prefix + ".train-input.txt"
        with open(tmp, "w", encoding="utf-8") as out:
            for p in a.input:
                for line in read_lines(p):
                    out.write(line + "\n")
        kwargs["input"] = tmp
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    finally:
        if tmp:
            os.remove(tmp)


def _encode_chunks(sp, lines, threads):
    return sp.encode(lines, out_type=str, num_threads=threads)


def spm_encode(a):
    """Encode one file, or a parallel pair with length filtering (train only)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=a.model)
    if len(a.inputs) != len(a.outputs):
        sys.exit("spm-encode: give as many --outputs as --inputs")
    readers = [read_lines(p) for p in a.inputs]
    writers = [open(p, "w", encoding="utf-8") for p in a.outputs]
    kept = dropped = 0
    chunk = []

    def flush():
        nonlocal kept, dropped
        cols = [_encode_chunks(sp, [row[i] for row in chunk], a.threads) for i in range(len(readers))]
        for pieces in zip(*cols):
            if a.filter:
                lens = [len(p) for p in pieces]
                # Empty sides and very long or lopsided pairs are noise
                # (mostly from the web-crawled corpora).
                if min(lens) == 0 or max(lens) > a.max_len or max(lens) > a.ratio * min(lens):
                    dropped += 1
                    continue
            for w, p in zip(writers, pieces):
                w.write(" ".join(p) + "\n")
            kept += 1
        chunk.clear()

    for row in zip(*readers, strict=True):
        chunk.append(row)
        if len(chunk) >= 20000:
            flush()
    if chunk:
        flush()
    for w in writers:
        w.close()
    print(f"spm-encode: {kept} lines written" + (f", {dropped} dropped by the length filter" if a.filter else ""),
          file=sys.stderr)


def make_dict(a):
    """fairseq dict.txt from the *encoded* training text, plus every other
    piece of the sentencepiece vocabulary with count 0. --min-count N keeps only
    the symbols seen at least N times (the rest become fairseq's <unk>).

    Counting the encoded text (rather than converting spm's vocab file with its
    scores) cannot drop or misorder a frequent piece; appending the unseen
    pieces (byte-fallback pieces included) means valid/test text encoded by the
    same model can never hit fairseq's <unk>.
    """
    if a.model and a.min_count > 1:
        sys.exit("make-dict: --min-count drops pieces that --model would add back; use one of them")
    counts = collections.Counter()
    for p in a.encoded:
        for line in read_lines(p):
            counts.update(line.split())
    counts = {t: c for t, c in counts.items() if c >= a.min_count}
    if a.model:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=a.model)
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            counts.setdefault(sp.id_to_piece(i), 0)
    with open(a.out, "w", encoding="utf-8") as f:
        for piece, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            f.write(f"{piece} {c}\n")
    print(f"make-dict: {len(counts)} symbols -> {a.out}", file=sys.stderr)


def check_unk(a):
    """Fail when any token of the given encoded files is missing from dict.txt."""
    with open(a.dict, encoding="utf-8") as f:
        vocab = {line.rsplit(" ", 1)[0] for line in f}
    bad_total = 0
    for p in a.files:
        n = 0
        missing = collections.Counter()
        for line in read_lines(p):
            toks = line.split()
            n += len(toks)
            missing.update(t for t in toks if t not in vocab)
        bad = sum(missing.values())
        bad_total += bad
        msg = f"check-unk: {p}: {n} tokens, {bad} would become <unk>"
        if bad:
            msg += f" (e.g. {', '.join(repr(t) for t, _ in missing.most_common(5))})"
        print(msg, file=sys.stderr)
    if bad_total:
        sys.exit(2)


# ---------------------------------------------------------------- characters

def text_lines(text):
    """The lines of a text; a trailing newline does not open a new (empty) line."""
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")


def char_split(a):
    """Split a text by character offsets (first f0, next f1, rest) and write
    character-level token files: one token per character, space as U+2581,
    one line per line (fairseq's </s> then stands for the newline)."""
    with open(a.input, encoding="utf-8", newline="") as f:
        text = f.read()
    if SPACE in text:
        sys.exit(f"char-split: input already contains {SPACE!r}; cannot use it for spaces")
    fracs = [float(x) for x in a.fractions.split(",")]
    n = len(text)
    cut1 = int(n * fracs[0])
    cut2 = int(n * (fracs[0] + fracs[1]))
    parts = {"train": text[:cut1], "valid": text[cut1:cut2], "test": text[cut2:]}
    os.makedirs(a.out_dir, exist_ok=True)
    for name, part in parts.items():
        with open(os.path.join(a.out_dir, f"{name}.txt"), "w", encoding="utf-8", newline="") as f:
            f.write(part)
        lines = text_lines(part)
        with open(os.path.join(a.out_dir, f"{name}.tok"), "w", encoding="utf-8") as f:
            for line in lines:
                f.write(" ".join(SPACE if c == " " else c for c in line) + "\n")
        print(f"char-split: {name}: characters {len(part)}, lines {len(lines)}", file=sys.stderr)


WORD = re.compile(r"\w+|[^\w\s]")


def word_tokenize(a):
    """Words and single punctuation marks as tokens, one line per line (as char-split:
    fairseq's </s> stands for the newline; blank lines stay blank)."""
    if len(a.inputs) != len(a.outputs):
        sys.exit("word-tokenize: as many --outputs as --inputs")
    for src, dst in zip(a.inputs, a.outputs):
        with open(src, encoding="utf-8", newline="") as f:
            text = f.read()
        lines = text_lines(text)
        n = 0
        with open(dst, "w", encoding="utf-8") as f:
            for line in lines:
                toks = WORD.findall(line)
                n += len(toks)
                f.write(" ".join(toks) + "\n")
        print(f"word-tokenize: {src}: {n} words and marks, {len(lines)} lines", file=sys.stderr)


def char_decode_line(tokens):
    return "".join(" " if t == SPACE else t for t in tokens)


# ---------------------------------------------------------------- WMT sgm

def sgm_to_text(a):
    seg = re.compile(r"<seg[^>]*>(.*)</seg>")
    with open(a.output, "w", encoding="utf-8") as out:
        for line in read_lines(a.input):
            m = seg.search(line)
            if m:
                out.write(html.unescape(m.group(1)).strip() + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("spm-train", help="train a sentencepiece model")
    s.add_argument("--input", nargs="+", required=True)
    s.add_argument("--prefix", required=True)
    s.add_argument("--vocab-size", type=int, required=True)
    s.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    s.add_argument("--character-coverage", type=float, default=1.0)
    s.add_argument("--byte-fallback", action="store_true")
    s.add_argument("--input-sentence-size", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(fn=spm_train)

    s = sub.add_parser("spm-encode", help="encode text into space-separated pieces")
    s.add_argument("--model", required=True)
    s.add_argument("--inputs", nargs="+", required=True)
    s.add_argument("--outputs", nargs="+", required=True)
    s.add_argument("--filter", action="store_true", help="drop empty / long / lopsided pairs")
    s.add_argument("--max-len", type=int, default=250)
    s.add_argument("--ratio", type=float, default=1.5)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(fn=spm_encode)

    s = sub.add_parser("make-dict", help="fairseq dict.txt from encoded text")
    s.add_argument("--out", required=True)
    s.add_argument("--model", help="sentencepiece model whose unseen pieces are appended")
    s.add_argument("--min-count", type=int, default=1, help="drop symbols seen fewer times")
    s.add_argument("encoded", nargs="+")
    s.set_defaults(fn=make_dict)

    s = sub.add_parser("check-unk", help="fail if a token is not in dict.txt")
    s.add_argument("--dict", required=True)
    s.add_argument("files", nargs="+")
    s.set_defaults(fn=check_unk)

    s = sub.add_parser("char-split", help="character-offset split + char tokens")
    s.add_argument("--input", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--fractions", default="0.9,0.05,0.05")
    s.set_defaults(fn=char_split)

    s = sub.add_parser("word-tokenize", help="words and punctuation marks as tokens")
    s.add_argument("--inputs", nargs="+", required=True)
    s.add_argument("--outputs", nargs="+", required=True)
    s.set_defaults(fn=word_tokenize)

    s = sub.add_parser("sgm-to-text", help="extract <seg> lines of a WMT .sgm file")
    s.add_argument("--input", required=True)
    s.add_argument("--output", required=True)
    s.set_defaults(fn=sgm_to_text)

    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
