#!/usr/bin/env bash
# WikiText-103 (word level) -> fairseq language-modelling data (paper's Table 2).
usage() {
    cat <<USAGE
Usage: $(basename "$0") [options]

Prepares WikiText-103 v1 (word level, the tokenised release) for fairseq
language modelling: fairseq-preprocess --only-source on wiki.{train,valid,test}.tokens
(vocabulary ~267K words, as in the paper's Table 2 and fairseq's adaptive-input recipes).

Source: wikitext-103-v1.zip from the canonical S3 URL
  https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip
(often answers 403 nowadays; the script then tries https://wikitext.smerity.com/).
Checked: md5 9ddaacaf6af0710eda8c456decff7832 (the value torchtext uses) and the
line counts 1,801,350 / 3,760 / 4,358.

Options:
  --from DIR     read wikitext-103-v1.zip from DIR instead of downloading
  --out DIR      output directory (default: data-bin/wikitext-103 in the repo)
  --workers N    fairseq-preprocess workers (default: number of CPUs)
  --force        rebuild even if DIR was already prepared (keeps the download)
  --no-verify    skip the md5 check of the archive
  -h, --help     this help

Needs ~1 GB of disk (archive 0.2 GB, text 0.5 GB, binary 0.2 GB) and a few
minutes. Uses \$PYTHON, else the repository's .venv/bin/python, else python3.
A second run with the same settings does nothing.
USAGE
}
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

URLS="https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip https://wikitext.smerity.com/wikitext-103-v1.zip"
MD5=9ddaacaf6af0710eda8c456decff7832
declare -A LINES=([train]=1801350 [valid]=3760 [test]=4358)

FROM="" OUT="$REPO_ROOT/data-bin/wikitext-103" WORKERS=$(nproc 2>/dev/null || echo 1) FORCE=0 NO_VERIFY=0
while [[ $# -gt 0 ]]; do
    case $1 in
        *) common_option "$@"; shift "$SHIFT_BY" ;;
    esac
done
SETTINGS="wikitext-103 v1 word-level"
finish_options "WikiText-103" "$SETTINGS"
find_python
need_python_module fairseq_cli "ve-fairseq (or fairseq)"

mkdir -p "$OUT/raw"
rm -f "$OUT/$STAMP_NAME"
fetch "$URLS" "$OUT/raw/wikitext-103-v1.zip" "$FROM"
verify "$OUT/raw/wikitext-103-v1.zip" md5 "$MD5"
log "archive verified; unpacking"
# python's zipfile, so that 'unzip' need not be installed.
"$PYTHON" -m zipfile -e "$OUT/raw/wikitext-103-v1.zip" "$OUT/raw/"
for split in train valid test; do
    f="$OUT/raw/wikitext-103/wiki.$split.tokens"
    [[ -f "$f" ]] || die "archive lacks wikitext-103/wiki.$split.tokens"
    n=$(wc -l <"$f" | tr -d ' ')
    if [[ "$n" != "${LINES[$split]}" && "$NO_VERIFY" == 0 ]]; then
        die "$f has $n lines, expected ${LINES[$split]}"
    fi
done

log "binarising with fairseq-preprocess ($WORKERS workers)"
fairseq_preprocess --only-source \
    --trainpref "$OUT/raw/wikitext-103/wiki.train.tokens" \
    --validpref "$OUT/raw/wikitext-103/wiki.valid.tokens" \
    --testpref "$OUT/raw/wikitext-103/wiki.test.tokens" \
    --destdir "$OUT" --workers "$WORKERS" \
    >"$OUT/preprocess.stdout" 2>&1 || { tail -20 "$OUT/preprocess.stdout" >&2; die "fairseq-preprocess failed (log: $OUT/preprocess.stdout)"; }

write_stamp "$OUT" "$SETTINGS"
report "$OUT"
echo "Train: see examples/language_model/README.md (archs fwp_lm_wiki103_small / fwp_lm_wiki103_medium)."
