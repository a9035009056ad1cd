#!/usr/bin/env bash
# Small real LM runs on Tiny Shakespeare (character level): the same small
# decoder and the same budget for every variant, then valid/test perplexity
# from fairseq-eval-lm with a sliding window. Prints markdown table rows
# (and appends them to $OUT/table.md).
#
#   bash data-scripts/prepare-tinyshakespeare.sh --from ../shared/data/tinyshakespeare   # once
#   MAX_UPDATE=2000 bash examples/language_model/run_tinyshakespeare.sh [ROW...]
#
# ROWs: softmax linear deltanet dpfp_delta (default: all four). Environment:
#   DATA (data-bin/tinyshakespeare)  OUT (results/tinyshakespeare)  MAX_UPDATE (2000)
#   CONTEXT (256: tokens per training sample)  DPFP_NU (1)  SEED (1)  THREADS (2)
#   EXTRA_ARGS (appended to fairseq-train)
source "$(dirname "${BASH_SOURCE[0]}")/../run_lib.sh"

DATA=${DATA:-data-bin/tinyshakespeare}
OUT=${OUT:-results/tinyshakespeare}
MAX_UPDATE=${MAX_UPDATE:-2000}
CONTEXT=${CONTEXT:-256}
DPFP_NU=${DPFP_NU:-1}
SEED=${SEED:-1}
ROWS=("$@")
[[ ${#ROWS[@]} -gt 0 ]] || ROWS=(softmax linear deltanet dpfp_delta)
need_data "$DATA/dict.txt" "Tiny Shakespeare" prepare-tinyshakespeare.sh

row_args() {
    # fwp_lm defaults to the delta rule: spell the rule out on every row.
    case $1 in
        softmax) echo "--fwp-kernel softmax" ;;
        linear) echo "--fwp-kernel linear --fwp-update sum" ;;
        deltanet) echo "--fwp-kernel linear --fwp-update delta" ;;
        dpfp_delta) echo "--fwp-kernel dpfp --fwp-dpfp-nu $DPFP_NU --fwp-update delta" ;;
        *) echo "error: unknown row $1 (softmax linear deltanet dpfp_delta)" >&2; return 1 ;;
    esac
}

ppl() {  # ppl CKPT SUBSET LOG: sliding windows of CONTEXT tokens, each scoring its last
    # quarter, so every scored character sees >= 3/4 CONTEXT of context. (fairseq-eval-lm's
    # --tokens-per-sample is the whole window; it scores tokens-per-sample - context-window.)
    eval_lm_ppl "$3" "$DATA" --user-dir fwp_fairseq --task language_modeling --path "$1" --gen-subset "$2" \
        --tokens-per-sample "$CONTEXT" --context-window $((CONTEXT * 3 / 4)) --batch-size 16
}

mkdir -p "$OUT"
table_header "$OUT/table.md" "| model | fwp options | params | updates | train time | valid ppl | test ppl | test bits/char |"

for row in "${ROWS[@]}"; do
    args=$(row_args "$row")
    dir="$OUT/$row"
    mkdir -p "$dir"
    start=$(date +%s)
    # shellcheck disable=SC2086
    fairseq-train "$DATA" --user-dir fwp_fairseq --task language_modeling \
        --arch fwp_lm $args \
        --decoder-layers 4 --decoder-embed-dim 256 --decoder-ffn-embed-dim 1024 --decoder-attention-heads 4 \
        --decoder-input-dim 256 --decoder-output-dim 256 \
        --share-decoder-input-output-embed --dropout 0.1 \
        --tokens-per-sample "$CONTEXT" --sample-break-mode none --max-tokens $((CONTEXT * 32)) \
        --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 1.0 \
        --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 200 --warmup-init-lr 1e-07 \
        --max-update "$MAX_UPDATE" --seed "$SEED" \
        --save-dir "$dir/checkpoints" --no-epoch-checkpoints --num-workers 0 \
        --log-format simple --log-interval 50 ${EXTRA_ARGS:-} \
        2>&1 | tee "$dir/train.log"
    secs=$(( $(date +%s) - start ))
    read -r params updates < <(train_stats "$dir/train.log")
    ckpt="$dir/checkpoints/checkpoint_last.pt"
    valid=$(ppl "$ckpt" valid "$dir/eval_valid.log")
    test=$(ppl "$ckpt" test "$dir/eval_test.log")
    bpc=$(bits_of "$test")
    line="| $row | \`$args\` | $params | $updates | $((secs / 60)) min | $valid | $test | $bpc |"
    echo "$line" | tee -a "$OUT/table.md"
done
echo "Table: $OUT/table.md"
