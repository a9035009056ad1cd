#!/usr/bin/env bash
# Fast weights carried across segments on Tiny Shakespeare (character level; the paper's
# Table 4 setting in small): the same decoder and the same budget (MAX_UPDATE updates of
# BATCH x CONTEXT characters) for every row, then valid/test perplexity from fairseq-eval-lm.
# Prints markdown table rows (and appends them to $OUT/table.md).
#
#   bash data-scripts/prepare-tinyshakespeare.sh --from /path/to/tinyshakespeare   # once
#   MAX_UPDATE=2000 bash experiments/carried_state/run_carry_state.sh [ROW...]
#
# ROWs (default: deltanet deltanet_carry linear_carry):
#   deltanet        Delta Net, independent shuffled segments (task language_modeling);
#                   evaluated with a sliding window (each scored character sees >= 3/4 CONTEXT)
#   deltanet_carry  Delta Net, contiguous streams, state carried (task fwp_stream_lm
#                   --fwp-carry-state); evaluated as one stream: each character once, all context
#   linear_carry    linear transformer (sum rule + attention normaliser), carried state
#   linear          linear transformer, independent segments, sliding window
#   dpfp_delta, dpfp_delta_carry   the Delta Net with the DPFP map (nu=1), without / with carry
#   deltanet_l2, deltanet_l2_carry, ...   any of the above with _l2 before _carry: phi(k), phi(q)
#                   L2-normalised instead of sum-normalised (--fwp-l2-normalize; not in the paper)
#   identity_delta_l2, identity_delta_l2_carry   phi(x) = x, L2-normalised: the Delta Net as
#                   flash-linear-attention builds it (not in the paper)
#   ROW_carryN      (e.g. deltanet_carry256) carried, but in training each stream is reset every N
#                   segments, the streams staggered, instead of all at each pass
#                   (--fwp-carry-reset-segments N); evaluated like the other carried rows
#   ROW_stream      (e.g. dpfp_delta_l2_stream) not carried, but trained on the carried rows'
#                   batches (task fwp_stream_lm: contiguous streams, never shuffled, each segment
#                   from a fresh state); evaluated like the rows without carry. It separates
#                   what the carried state does from what the unshuffled data order does.
# All rows have no positional encoding (required with carried state; the paper's best Delta Net
# has none), so the rows differ only in the update rule and in the carry.
# Environment: DATA (data-bin/tinyshakespeare; data-bin/tinyshakespeare-words from
#   prepare-tinyshakespeare.sh --words for word level)  OUT (results/carry_state)  MAX_UPDATE (2000)
#   CONTEXT (256: tokens per segment)  BATCH (32: segments / streams per update)  SEED (1)
#   HEADS (4: attention heads of the 256-dim model; the paper's medium WikiText-103 model has
#   8 heads of 32; see experiments/carried_state/delta_state_settling.py for how the head size affects how
#   fast a carried state settles)
#   THREADS (2)  EXTRA_ARGS (appended to fairseq-train)
source "$(dirname "${BASH_SOURCE[0]}")/../../examples/run_lib.sh"

env_defaults DATA=data-bin/tinyshakespeare OUT=results/carry_state MAX_UPDATE=2000 CONTEXT=256 \
    BATCH=32 SEED=1 HEADS=4
ROWS=("$@")
[[ ${#ROWS[@]} -gt 0 ]] || ROWS=(deltanet deltanet_carry linear_carry)
need_data "$DATA/dict.txt" "Tiny Shakespeare" prepare-tinyshakespeare.sh

row_args() {  # the model flags of a row: MODEL[_l2][_carry[N]|_stream]
    local base=$1 l2=""
    base=${base%_carry*}
    base=${base%_stream}
    [[ $base == *_l2 ]] && { base=${base%_l2}; l2=" --fwp-l2-normalize"; }
    case $base in
        deltanet) echo "--fwp-kernel linear --fwp-update delta$l2" ;;
        linear) echo "--fwp-kernel linear --fwp-update sum$l2" ;;
        dpfp_delta) echo "--fwp-kernel dpfp --fwp-dpfp-nu 1 --fwp-update delta$l2" ;;
        identity_delta) echo "--fwp-kernel identity --fwp-update delta$l2" ;;
        *) echo "error: unknown row $1 (deltanet linear dpfp_delta identity_delta, each optionally + _l2, then + _carry)" >&2; return 1 ;;
    esac
}

reset_period() {  # N of a ROW_carryN row; nothing for other rows
    local row=$1
    if [[ $row == *_carry[0-9]* ]]; then echo "${row##*_carry}"; fi
}

task_args() {  # the data feeding of a row, in training
    case $1 in
        *_carry) echo "--task fwp_stream_lm --fwp-carry-state --batch-size $BATCH" ;;
        *_carry[0-9]*) echo "--task fwp_stream_lm --fwp-carry-state --batch-size $BATCH --fwp-carry-reset-segments $(reset_period "$1")" ;;
        *_stream) echo "--task fwp_stream_lm --batch-size $BATCH" ;;
        *) echo "--task language_modeling --sample-break-mode none --max-tokens $((CONTEXT * BATCH))" ;;
    esac
}

ppl() {  # ppl ROW CKPT SUBSET LOG [EXTRA EVAL ARGS]
    local eval_args
    case $1 in
        # one stream, the state carried from segment to segment: every character scored once
        # with all earlier context (the result does not depend on --tokens-per-sample)
        *_carry*) eval_args="--task fwp_stream_lm --fwp-carry-state --tokens-per-sample $CONTEXT" ;;
        # sliding windows of CONTEXT characters, each scoring its last quarter
        *) eval_args="--task language_modeling --tokens-per-sample $CONTEXT --context-window $((CONTEXT * 3 / 4)) --batch-size 16" ;;
    esac
    # shellcheck disable=SC2086
    eval_lm_ppl "$4" "$DATA" --user-dir fwp_fairseq --path "$2" --gen-subset "$3" $eval_args "${@:5}"
}

mkdir -p "$OUT"
table_header "$OUT/table.md" "| row | fwp options | heads | carried state | params | updates | train time | valid ppl | test ppl | test bits/token | valid / test ppl, eval reset every N |"

for row in "${ROWS[@]}"; do
    args=$(row_args "$row")
    targs=$(task_args "$row")
    dir="$OUT/$row"
    # shellcheck disable=SC2086
    train_small_lm "$dir" $targs $args --no-token-positional-embeddings --decoder-attention-heads "$HEADS"
    ckpt="$dir/checkpoints/checkpoint_last.pt"
    valid=$(ppl "$row" "$ckpt" valid "$dir/eval_valid.log")
    test=$(ppl "$row" "$ckpt" test "$dir/eval_test.log")
    # rows trained with resets every N segments: also scored with the state reset every N
    # segments in evaluation (--fwp-eval-reset-segments N), so that it is never older than in training
    reset="-" n=$(reset_period "$row")
    if [[ -n $n ]]; then
        reset="$(ppl "$row" "$ckpt" valid "$dir/eval_valid_reset.log" --fwp-eval-reset-segments "$n") / $(ppl "$row" "$ckpt" test "$dir/eval_test_reset.log" --fwp-eval-reset-segments "$n")"
    fi
    carry=$([[ $row == *_carry ]] && echo yes || echo no)
    [[ -n $n ]] && carry="yes, reset every $n segments (staggered)"
    [[ $row == *_stream ]] && carry="no (trained on unshuffled streams)"
    line="| $row | \`$args\` | $HEADS | $carry | $ROW_PARAMS | $ROW_UPDATES | $ROW_MINUTES min | $valid | $test | $(bits_of "$test") | $reset |"
    echo "$line" | tee -a "$OUT/table.md"
done
echo "Table: $OUT/table.md"
