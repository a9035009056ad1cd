#!/usr/bin/env bash
# Small real LM runs on Tiny Shakespeare (character level): the same small
# decoder and the same budget for every variant, then valid/test perplexity
# from fairseq-eval-lm with a sliding window. Prints markdown table rows
# (and appends them to $OUT/table.md).
#
#   bash data-scripts/prepare-tinyshakespeare.sh --from /path/to/tinyshakespeare   # once
#   MAX_UPDATE=2000 bash examples/language_model/run_tinyshakespeare.sh [ROW...]
#
# ROWs: softmax linear deltanet dpfp_delta (default: these four), and the Delta Net's extensions
#   (not in the paper): deltanet_gated (--fwp-gate scalar), deltanet_beta2 (--fwp-beta-range
#   double), deltanet_hybrid (softmax attention in the last of the 4 layers), deltanet_gated_hybrid
#   (both); today's DeltaNet layer: gated_deltanet (the fwp_lm_gated_deltanet preset's flags),
#   shortconv (--fwp-short-conv 4), outnorm (--fwp-output-norm rms-gated), deltaproduct2
#   (--fwp-householder 2: two delta-rule writes per token); rows with new projections give their
#   parameters back in the FFN (the output norm's W_g, 4 x 256^2: FFN 896; DeltaProduct's second
#   key and value projections, 4 x 2 x 256^2: FFN 768), so that every row has the deltanet row's
#   parameter count within 1%. Validation is logged every VALID_EVERY updates (fairseq reseeds
#   every update from SEED, so this leaves training as it is), and the end draws
#   $OUT/valid_ppl.png (plot_valid_ppl.py) over every row trained into $OUT. Environment:
#   DATA (data-bin/tinyshakespeare)  OUT (results/tinyshakespeare)  MAX_UPDATE (2000)
#   CONTEXT (256: tokens per training sample)  DPFP_NU (1)  SEED (1)  THREADS (2)  VALID_EVERY (25)
#   EXTRA_ARGS (appended to fairseq-train)
source "$(dirname "${BASH_SOURCE[0]}")/../run_lib.sh"

env_defaults DATA=data-bin/tinyshakespeare OUT=results/tinyshakespeare MAX_UPDATE=2000 CONTEXT=256 \
    DPFP_NU=1 SEED=1 VALID_EVERY=25
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
        # the extensions: the deltanet row plus their flags
        deltanet_gated) echo "$(row_args deltanet) --fwp-gate scalar" ;;
        deltanet_beta2) echo "$(row_args deltanet) --fwp-beta-range double" ;;
        # one softmax layer in four, the last of the block (as 3:1 hybrids such as Qwen3-Next place it)
        deltanet_hybrid) echo "$(row_args deltanet) --fwp-softmax-layers 3" ;;
        deltanet_gated_hybrid) echo "$(row_args deltanet_gated) --fwp-softmax-layers 3" ;;
        # Gated DeltaNet as published (models/presets.py), and two of its parts alone
        gated_deltanet) echo "--fwp-kernel identity --fwp-l2-normalize --fwp-update delta --fwp-short-conv 4" \
            "--fwp-gate scalar --fwp-beta-range double --fwp-output-norm rms-gated" ;;
        shortconv) echo "$(row_args deltanet) --fwp-short-conv 4" ;;
        outnorm) echo "$(row_args deltanet) --fwp-output-norm rms-gated" ;;
        # DeltaProduct (Siems et al. 2025); the delta rule has no normaliser z, as it needs
        deltaproduct2) echo "$(row_args deltanet) --fwp-householder 2" ;;
        *) echo "error: unknown row $1 (softmax linear deltanet dpfp_delta deltanet_gated deltanet_beta2 deltanet_hybrid deltanet_gated_hybrid gated_deltanet shortconv outnorm deltaproduct2)" >&2; return 1 ;;
    esac
}

row_ffn() {  # the FFN width: smaller where a row's new projections take the difference
    case $1 in
        gated_deltanet | outnorm) echo 896 ;;
        deltaproduct2) echo 768 ;;
        *) echo 1024 ;;
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
    # shellcheck disable=SC2086
    ROW_FFN=$(row_ffn "$row") train_small_lm "$dir" --task language_modeling $args --decoder-attention-heads 4 \
        --sample-break-mode none --max-tokens $((CONTEXT * 32)) --validate-interval-updates "$VALID_EVERY"
    ckpt="$dir/checkpoints/checkpoint_last.pt"
    valid=$(ppl "$ckpt" valid "$dir/eval_valid.log")
    test=$(ppl "$ckpt" test "$dir/eval_test.log")
    line="| $row | \`$args\` | $ROW_PARAMS | $ROW_UPDATES | $ROW_MINUTES min | $valid | $test | $(bits_of "$test") |"
    echo "$line" | tee -a "$OUT/table.md"
done
echo "Table: $OUT/table.md"
python3 examples/language_model/plot_valid_ppl.py "$OUT/valid_ppl.png" "$OUT"
