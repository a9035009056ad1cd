#!/usr/bin/env bash
# Small real MT runs on Multi30k De->En: the same small Transformer and the same
# budget for every attention variant, then beam-5 sacreBLEU on test_2016_flickr.
# Prints one markdown table row per variant (and appends it to $OUT/table.md).
#
#   bash data-scripts/prepare-multi30k.sh [--from /path/to/multi30k]   # once
#   MAX_UPDATE=1800 bash examples/translation/run_multi30k.sh [ROW...]
#
# ROWs: softmax linear dpfp delta (default: these four), gated_deltanet (the Gated DeltaNet
# preset in the decoder), gated_deltanet_encconv (the same plus the centred convolution in
# encoder self-attention). Environment:
#   DATA (data-bin/multi30k)  OUT (results/multi30k)  MAX_UPDATE (1800)  FFN (512)
#   DPFP_NU (2)  SEED (1)  THREADS (2)  EXTRA_ARGS (appended to fairseq-train)
#   GEN_ARGS (appended to fairseq-generate)
source "$(dirname "${BASH_SOURCE[0]}")/../run_lib.sh"

DATA=${DATA:-data-bin/multi30k}
OUT=${OUT:-results/multi30k}
MAX_UPDATE=${MAX_UPDATE:-1800}
FFN=${FFN:-512}
DPFP_NU=${DPFP_NU:-2}
SEED=${SEED:-1}
ROWS=("$@")
[[ ${#ROWS[@]} -gt 0 ]] || ROWS=(softmax linear dpfp delta)
need_data "$DATA/dict.de.txt" Multi30k prepare-multi30k.sh

row_args() {
    case $1 in
        softmax) echo "--fwp-kernel softmax" ;;
        linear) echo "--fwp-kernel linear --fwp-update sum" ;;
        dpfp) echo "--fwp-kernel dpfp --fwp-dpfp-nu $DPFP_NU --fwp-update sum" ;;
        # the delta rule only changes causal (decoder) self-attention
        delta) echo "--fwp-kernel linear --fwp-update delta" ;;
        gated_deltanet) echo "--arch fwp_transformer_gated_deltanet" ;;
        gated_deltanet_encconv) echo "--arch fwp_transformer_gated_deltanet --fwp-short-conv-encoder" ;;
        *) echo "error: unknown row $1 (softmax linear dpfp delta gated_deltanet gated_deltanet_encconv)" >&2
           return 1 ;;
    esac
}

for row in "${ROWS[@]}"; do row_args "$row" >/dev/null || exit 2; done  # typos stop before any run
mkdir -p "$OUT"
# The reference: the raw (detokenised) English side of test_2016_flickr.
REF="$OUT/test_2016_flickr.en"
zcat "$DATA/raw/test_2016_flickr.en.gz" >"$REF"
table_header "$OUT/table.md" "| model | fwp options | params | updates | train time | test_2016_flickr sacreBLEU (beam 5) |"

for row in "${ROWS[@]}"; do
    args=$(row_args "$row")
    dir="$OUT/$row"
    # Same architecture and budget for every row; only the attention differs.
    # shellcheck disable=SC2086
    arch=(--arch fwp_transformer)  # unless the row names its own (a preset)
    [[ $args == --arch* ]] && arch=()
    train_row "$dir" "$DATA" --user-dir fwp_fairseq --task translation --source-lang de --target-lang en \
        "${arch[@]}" $args \
        --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256 \
        --encoder-ffn-embed-dim "$FFN" --decoder-ffn-embed-dim "$FFN" \
        --encoder-attention-heads 4 --decoder-attention-heads 4 --share-all-embeddings \
        --dropout 0.3 --weight-decay 0.0001 \
        --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
        --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.0 \
        --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 400 --warmup-init-lr 1e-07 \
        --max-tokens 4096 --max-update "$MAX_UPDATE" --seed "$SEED"

    fairseq-generate "$DATA" --user-dir fwp_fairseq --task translation --source-lang de --target-lang en \
        --path "$dir/checkpoints/checkpoint_last.pt" --gen-subset test \
        --beam 5 --batch-size 64 --remove-bpe sentencepiece --num-workers 0 ${GEN_ARGS:-} >"$dir/generate.out"
    # one hypothesis per reference sentence, in test order (else the script stops here)
    bash "$ROOT/examples/translation/hypotheses.sh" "$dir/generate.out" "$REF" >"$dir/hyp.en"
    if grep -q '<unk>' "$dir/hyp.en"; then echo "warning: <unk> in $row hypotheses" >&2; fi
    bleu=$(python3 -m sacrebleu "$REF" -i "$dir/hyp.en" -b)
    line="| $row | \`$args\` | $ROW_PARAMS | $ROW_UPDATES | $ROW_MINUTES min | $bleu |"
    echo "$line" | tee -a "$OUT/table.md"
done
echo "Table: $OUT/table.md"
