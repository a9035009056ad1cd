#!/usr/bin/env bash
# Multi30k (task 1, raw captions) -> joint sentencepiece BPE -> fairseq binary data.
usage() {
    cat <<USAGE
Usage: $(basename "$0") [options]

Prepares Multi30k task 1 (29,000 train / 1,014 valid / 1,000 test_2016_flickr
caption pairs) for fairseq translation: a joint German+English sentencepiece
BPE model, text encoded with it, and fairseq-preprocess --joined-dictionary.
fairseq splits: train, valid (= val), test (= test_2016_flickr).

Options:
  --from DIR        read the six raw .gz files from DIR instead of downloading
                    (e.g. --from /path/to/multi30k)
  --out DIR         output directory (default: data-bin/multi30k in the repo)
  --src L --tgt L   translation direction (default: --src de --tgt en)
  --vocab-size N    sentencepiece vocabulary size (default: 8000)
  --workers N       fairseq-preprocess workers (default: 1)
  --force           rebuild even if DIR was already prepared (keeps downloads)
  --no-verify       skip the size/sha256 checks of the raw files
  -h, --help        this help

Uses \$PYTHON, else the repository's .venv/bin/python, else python3 (needs
sentencepiece and fairseq). A second run with the same settings does nothing.
USAGE
}
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

URL_BASE=https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw
# sha256 of the upstream gz files.
declare -A SHA256=(
    [train.de.gz]=726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6
    [train.en.gz]=d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f
    [val.de.gz]=f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a
    [val.en.gz]=14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28
    [test_2016_flickr.de.gz]=9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8
    [test_2016_flickr.en.gz]=611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9
)
declare -A SIZE=(
    [train.de.gz]=637044 [train.en.gz]=568929 [val.de.gz]=24681 [val.en.gz]=21650
    [test_2016_flickr.de.gz]=22890 [test_2016_flickr.en.gz]=21077
)

FROM="" OUT="$REPO_ROOT/data-bin/multi30k" SRC=de TGT=en VOCAB=8000 WORKERS=1 FORCE=0 NO_VERIFY=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --src) SRC=$2; shift 2 ;;
        --tgt) TGT=$2; shift 2 ;;
        --vocab-size) VOCAB=$2; shift 2 ;;
        *) common_option "$@"; shift "$SHIFT_BY" ;;
    esac
done
[[ "$SRC-$TGT" == de-en || "$SRC-$TGT" == en-de ]] || die "--src/--tgt must be de/en or en/de"
SETTINGS="multi30k src=$SRC tgt=$TGT vocab=$VOCAB"
finish_options "Multi30k" "$SETTINGS"
find_python
need_python_module sentencepiece sentencepiece
need_python_module fairseq_cli "ve-fairseq (or fairseq)"

mkdir -p "$OUT/raw" "$OUT/tok"
rm -f "$OUT/$STAMP_NAME"
for f in "${!SHA256[@]}"; do
    fetch "$URL_BASE/$f" "$OUT/raw/$f" "$FROM"
    verify "$OUT/raw/$f" sha256 "${SHA256[$f]}" "${SIZE[$f]}"
done
log "raw files verified"

# One joint model for both languages: shared subwords, one embedding table.
log "training sentencepiece BPE ($VOCAB pieces)"
helper spm-train --input "$OUT/raw/train.de.gz" "$OUT/raw/train.en.gz" \
    --prefix "$OUT/spm" --vocab-size "$VOCAB" --model-type bpe --character-coverage 1.0 --byte-fallback

declare -A SPLIT=([train]=train [valid]=val [test]=test_2016_flickr)
for split in train valid test; do
    helper spm-encode --model "$OUT/spm.model" \
        --inputs "$OUT/raw/${SPLIT[$split]}.$SRC.gz" "$OUT/raw/${SPLIT[$split]}.$TGT.gz" \
        --outputs "$OUT/tok/$split.$SRC" "$OUT/tok/$split.$TGT"
done

binarise_joined "$OUT/tok" "$SRC" "$TGT"

write_stamp "$OUT" "$SETTINGS"
report "$OUT"
echo "Sentencepiece model: $OUT/spm.model (decode hypotheses with it before sacreBLEU)."
echo "Train: fairseq-train $OUT --user-dir fwp_fairseq --source-lang $SRC --target-lang $TGT ... (examples/translation/)"
