#!/usr/bin/env bash
# WMT14 English->German -> joint sentencepiece BPE 32K -> fairseq binary data (paper's Table 1).
usage() {
    cat <<USAGE
Usage: $(basename "$0") [options]

Prepares WMT14 En-De as used for the paper's Table 1 (the usual set of
fairseq's WMT14 en-de recipe, ~4.5M sentence pairs):
  train: Europarl v7, Common Crawl, News Commentary v9   (statmt.org)
  valid: newstest2013 (3,000)       from statmt.org/wmt13/test.tgz
  test:  newstest2014 full (3,003)  from statmt.org/wmt14/test-full.tgz
A joint En+De sentencepiece BPE model (32K, byte fallback) is learned on the
training text; training pairs with an empty side, more than 250 pieces or a
piece-length ratio above 1.5 are dropped; then fairseq-preprocess --joined-dictionary.

Archives are checked by size + sha256 (values published in TensorFlow
Datasets' wmt14 checksums) or md5 (the values sacreBLEU uses for the test sets).

Options:
  --from DIR          read the five archives from DIR instead of downloading:
                      training-parallel-europarl-v7.tgz training-parallel-commoncrawl.tgz
                      training-parallel-nc-v9.tgz test.tgz test-full.tgz
  --out DIR           output directory (default: data-bin/wmt14_en_de in the repo)
  --vocab-size N      sentencepiece vocabulary (default: 32000)
  --spm-sentences N   sentences sampled to train sentencepiece (default: 4000000)
  --workers N         threads / fairseq-preprocess workers (default: number of CPUs)
  --force             rebuild even if DIR was already prepared (keeps downloads)
  --no-verify         skip the archive checks
  -h, --help          this help

Needs ~2 GB download, ~8 GB disk, ~16 GB RAM for sentencepiece, 1-2 hours on
8 cores. Uses \$PYTHON, else the repository's .venv/bin/python, else python3.
A second run with the same settings does nothing.
USAGE
}
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# name -> "urls|algo|checksum|size"
declare -A ARCHIVES=(
    [training-parallel-europarl-v7.tgz]="https://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz|sha256|0224c7c710c8a063dfd893b0cc0830202d61f4c75c17eb8e31836103d27d96e7|657632379"
    [training-parallel-commoncrawl.tgz]="https://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz|sha256|c7a74e2ea01ac6c920123108627e35278d4ccb5701e15428ffa34de86fa3a9e5|918311367"
    [training-parallel-nc-v9.tgz]="https://www.statmt.org/wmt14/training-parallel-nc-v9.tgz|sha256|cb8953f292298e6877ae433c98912b927cb0766b303f4540512ddd286c748485|80418416"
    [test.tgz]="https://statmt.org/wmt13/test.tgz|md5|48eca5d02f637af44e85186847141f67|"
    [test-full.tgz]="https://statmt.org/wmt14/test-full.tgz|md5|a8cd784e006feb32ac6f3d9ec7eb389a|"
)
# corpus file prefix inside its archive (followed by .en / .de)
declare -A TRAIN_MEMBERS=(
    [training-parallel-europarl-v7.tgz]=training/europarl-v7.de-en
    [training-parallel-commoncrawl.tgz]=commoncrawl.de-en
    [training-parallel-nc-v9.tgz]=training/news-commentary-v9.de-en
)

FROM="" OUT="$REPO_ROOT/data-bin/wmt14_en_de" VOCAB=32000 SPM_SENTENCES=4000000
WORKERS=$(nproc 2>/dev/null || echo 1) FORCE=0 NO_VERIFY=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --vocab-size) VOCAB=$2; shift 2 ;;
        --spm-sentences) SPM_SENTENCES=$2; shift 2 ;;
        *) common_option "$@"; shift "$SHIFT_BY" ;;
    esac
done
SETTINGS="wmt14 en-de vocab=$VOCAB spm_sentences=$SPM_SENTENCES"
finish_options "WMT14 en-de" "$SETTINGS"
find_python
need_python_module sentencepiece sentencepiece
need_python_module fairseq_cli "ve-fairseq (or fairseq)"

RAW="$OUT/raw" TXT="$OUT/text" TOK="$OUT/tok"
mkdir -p "$RAW" "$TXT" "$TOK"
rm -f "$OUT/$STAMP_NAME"
for name in "${!ARCHIVES[@]}"; do
    IFS='|' read -r url algo sum size <<<"${ARCHIVES[$name]}"
    fetch "$url" "$RAW/$name" "$FROM"
    verify "$RAW/$name" "$algo" "$sum" "$size"
done
log "archives verified"

# Plain text: train corpora concatenated in a fixed order; test sets from sgm.
for lang in en de; do
    : >"$TXT/train.$lang.part"
    for name in training-parallel-europarl-v7.tgz training-parallel-commoncrawl.tgz training-parallel-nc-v9.tgz; do
        member="${TRAIN_MEMBERS[$name]}.$lang"
        tar -xzOf "$RAW/$name" "$member" >>"$TXT/train.$lang.part" || die "$name lacks $member"
    done
    mv "$TXT/train.$lang.part" "$TXT/train.$lang"
done
[[ $(wc -l <"$TXT/train.en") == $(wc -l <"$TXT/train.de") ]] || die "train.en and train.de differ in line count"
tar -xzf "$RAW/test.tgz" -C "$RAW" test/newstest2013-src.en.sgm test/newstest2013-src.de.sgm || die "test.tgz lacks newstest2013"
tar -xzf "$RAW/test-full.tgz" -C "$RAW" test-full/newstest2014-deen-src.en.sgm test-full/newstest2014-deen-ref.de.sgm || die "test-full.tgz lacks newstest2014"
helper sgm-to-text --input "$RAW/test/newstest2013-src.en.sgm" --output "$TXT/valid.en"
helper sgm-to-text --input "$RAW/test/newstest2013-src.de.sgm" --output "$TXT/valid.de"
helper sgm-to-text --input "$RAW/test-full/newstest2014-deen-src.en.sgm" --output "$TXT/test.en"
helper sgm-to-text --input "$RAW/test-full/newstest2014-deen-ref.de.sgm" --output "$TXT/test.de"
log "train: $(wc -l <"$TXT/train.en") pairs, valid: $(wc -l <"$TXT/valid.en"), test: $(wc -l <"$TXT/test.en")"

log "training sentencepiece BPE ($VOCAB pieces, $SPM_SENTENCES sampled sentences)"
helper spm-train --input "$TXT/train.en" "$TXT/train.de" --prefix "$OUT/spm" --vocab-size "$VOCAB" \
    --model-type bpe --character-coverage 0.9999 --byte-fallback \
    --input-sentence-size "$SPM_SENTENCES" --threads "$WORKERS"

helper spm-encode --model "$OUT/spm.model" --threads "$WORKERS" --filter --max-len 250 --ratio 1.5 \
    --inputs "$TXT/train.en" "$TXT/train.de" --outputs "$TOK/train.en" "$TOK/train.de"
for split in valid test; do
    # valid/test are never filtered: scores must cover every sentence.
    helper spm-encode --model "$OUT/spm.model" --threads "$WORKERS" \
        --inputs "$TXT/$split.en" "$TXT/$split.de" --outputs "$TOK/$split.en" "$TOK/$split.de"
done

binarise_joined "$TOK" en de "$WORKERS workers"

write_stamp "$OUT" "$SETTINGS"
report "$OUT"
echo "Sentencepiece model: $OUT/spm.model; references: $TXT/{valid,test}.de (or sacrebleu -t wmt14/full -l en-de)."
