#!/usr/bin/env bash
# Tiny Shakespeare -> character-level (or, with --words, word-level) fairseq language-modelling data.
usage() {
    cat <<USAGE
Usage: $(basename "$0") [options]

Prepares Tiny Shakespeare (1,115,394 characters) for fairseq language
modelling at the CHARACTER level, binarised with fairseq-preprocess --only-source.

Split: by character offset, the first 90% of the characters are train, the
next 5% valid, the last 5% test (valid and test may start mid-line).
Tokens: one per character; a space is written as U+2581 (so fairseq's
whitespace tokeniser keeps it) and each line ends with fairseq's </s>, which
thus plays the newline. The vocabulary is ~65 symbols, so there is no <unk>
question and no tokenizer to train, and the perplexity is per character
(bits per character = log2 of it), comparable with the char-rnn literature.

With --words: the same split, tokenised into words and punctuation marks
(regex \w+|[^\w\s], case kept); the dictionary holds the words seen at least
--min-count times (default 2) in train, the rest of valid/test becomes <unk>
(about 6-7% of their tokens with 2). Perplexity is then per word token.

Options:
  --words        word-level instead of character-level
  --min-count N  with --words: rarer training words become <unk> (default 2)
  --from DIR     read input.txt from DIR instead of downloading
                 (e.g. --from /path/to/tinyshakespeare)
  --out DIR      output directory (default: data-bin/tinyshakespeare in the repo,
                 data-bin/tinyshakespeare-words with --words)
  --workers N    fairseq-preprocess workers (default: 1)
  --force        rebuild even if DIR was already prepared (keeps the download)
  --no-verify    skip the size/sha256 check of input.txt
  -h, --help     this help

Uses \$PYTHON, else the repository's .venv/bin/python, else python3 (needs
fairseq). A second run with the same settings does nothing.
USAGE
}
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

URL=https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
SHA256=86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed
SIZE=1115394
FRACTIONS=0.9,0.05,0.05

FROM="" OUT="" WORKERS=1 FORCE=0 NO_VERIFY=0 WORDS=0 MIN_COUNT=2
while [[ $# -gt 0 ]]; do
    case $1 in
        --words) WORDS=1; shift ;;
        --min-count) MIN_COUNT=${2:?--min-count needs a number}; shift 2 ;;
        *) common_option "$@"; shift "$SHIFT_BY" ;;
    esac
done
[[ $MIN_COUNT =~ ^[1-9][0-9]*$ ]] || die "--min-count must be a positive integer, got $MIN_COUNT"
if [[ $WORDS == 1 ]]; then
    OUT=${OUT:-$REPO_ROOT/data-bin/tinyshakespeare-words} UNIT=word
    SETTINGS="tinyshakespeare word-level min-count=$MIN_COUNT split=$FRACTIONS"
else
    OUT=${OUT:-$REPO_ROOT/data-bin/tinyshakespeare} UNIT=character
    SETTINGS="tinyshakespeare char-level split=$FRACTIONS"
fi
finish_options "Tiny Shakespeare" "$SETTINGS"
find_python
need_python_module fairseq_cli "ve-fairseq (or fairseq)"

mkdir -p "$OUT/raw" "$OUT/tok"
rm -f "$OUT/$STAMP_NAME"
fetch "$URL" "$OUT/raw/input.txt" "$FROM"
verify "$OUT/raw/input.txt" sha256 "$SHA256" "$SIZE"
log "input.txt verified"

helper char-split --input "$OUT/raw/input.txt" --out-dir "$OUT/tok" --fractions "$FRACTIONS"

if [[ $WORDS == 1 ]]; then
    # The character split's text, cut into words instead (the same characters in each split).
    helper word-tokenize --inputs "$OUT"/tok/{train,valid,test}.txt --outputs "$OUT"/tok/{train,valid,test}.tok
    helper make-dict --min-count "$MIN_COUNT" --out "$OUT/tok/dict.txt" "$OUT/tok/train.tok"
    # Rare words are expected to become <unk> here: report how many, do not fail.
    helper check-unk --dict "$OUT/tok/dict.txt" "$OUT/tok/valid.tok" "$OUT/tok/test.tok" || true
else
    # Dictionary from train only; check that valid/test use no unseen character.
    helper make-dict --out "$OUT/tok/dict.txt" "$OUT/tok/train.tok"
    helper check-unk --dict "$OUT/tok/dict.txt" "$OUT/tok/valid.tok" "$OUT/tok/test.tok" \
        || die "characters of valid/test missing from the training dictionary"
fi

log "binarising with fairseq-preprocess"
fairseq_preprocess --only-source --srcdict "$OUT/tok/dict.txt" \
    --trainpref "$OUT/tok/train.tok" --validpref "$OUT/tok/valid.tok" --testpref "$OUT/tok/test.tok" \
    --destdir "$OUT" --workers "$WORKERS" \
    >"$OUT/preprocess.stdout" 2>&1 || { tail -20 "$OUT/preprocess.stdout" >&2; die "fairseq-preprocess failed (log: $OUT/preprocess.stdout)"; }

write_stamp "$OUT" "$SETTINGS"
report "$OUT"
echo "Raw splits: $OUT/tok/{train,valid,test}.txt; $UNIT tokens: $OUT/tok/*.tok"
echo "Train: fairseq-train $OUT --user-dir fwp_fairseq --task language_modeling ... (examples/language_model/)"
