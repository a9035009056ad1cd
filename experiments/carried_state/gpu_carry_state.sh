#!/usr/bin/env bash
# On one GPU machine without network access: the carried-state rows of experiments/carried_state/run_carry_state.sh
# for several head sizes and seeds at once (each HEADS x SEED its own scripts/gpu_recipes.sh), then
# carry_state_drift.py on every checkpoint: loss by position along the validation stream in bins
# of 40 segments, for a carried row as one stream (what fairseq-eval-lm scores), as 2 streams
# (each shorter than a training stream) and, for ROW_carryN, reset every N segments, with |S| per
# layer; for a row without carry with its sliding windows, so that a pair compares bin by bin.
# Results (two files, easy to copy back from a machine without network access):
# $OUT/summary.md (tables and drift) and $OUT/carry.tar.gz (every row's logs, tables, drift).
#
#   OUT=/tmp/out RECIPES_DEADLINE=$(( $(date +%s) + 420 )) bash experiments/carried_state/gpu_carry_state.sh
#
# Environment: CARRY_HEADS ("4")  CARRY_SEEDS ("1")  ROWS_H<HEADS> (the rows for that head
#   count; default "deltanet deltanet_carry")  plus what gpu_recipes.sh and run_carry_state.sh
#   read (RECIPES_DEADLINE, EVAL_MARGIN_S, MAX_UPDATE, ...). A seed sweep of one pair:
#   CARRY_SEEDS="2 3 4" ROWS_H4="dpfp_delta_l2 dpfp_delta_l2_carry128" bash experiments/carried_state/gpu_carry_state.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
WORK=${CARRY_WORK:-/tmp/carry_study}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK/drift"
log() { echo "[carry $(date +%H:%M:%S)] $*"; }

# Install the fairseq wheels once here: the parallel gpu_recipes.sh runs then find fairseq.
source scripts/fairseq_wheels.sh

pids=()
for h in ${CARRY_HEADS:-4}; do
  for seed in ${CARRY_SEEDS:-1}; do
    rows_var="ROWS_H$h"
    g="h${h}_s$seed"
    HEADS=$h SEED=$seed RECIPES=carry_state CARRY_STATE_ROWS="${!rows_var:-deltanet deltanet_carry}" \
      RECIPES_WORK="/tmp/recipes_$g" OUT="$WORK/$g" bash scripts/gpu_recipes.sh >"$WORK/$g.log" 2>&1 &
    pids+=($!)
    log "heads $h, seed $seed: rows ${!rows_var:-deltanet deltanet_carry}"
  done
done
wait "${pids[@]}"
log "training and evaluation done"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=2
drift() {  # drift CKPT NAME [ARGS...]
  "$PY" experiments/carried_state/carry_state_drift.py "$1" --data "${DATA:-data-bin/tinyshakespeare}" --bin-segments 40 \
    "${@:3}" >"$WORK/drift/$2.txt" 2>&1 &
}
for ckpt in /tmp/recipes_h*_s*/carry_state_*/*/checkpoints/checkpoint_last.pt; do
  [ -f "$ckpt" ] || continue
  g=$(echo "$ckpt" | grep -o 'recipes_h[0-9]*_s[0-9]*' | sed 's/^recipes_//')
  row=$(basename "$(dirname "$(dirname "$ckpt")")")
  case $row in
    *_carry*)
      drift "$ckpt" "${g}_${row}_streams1" --streams 1
      drift "$ckpt" "${g}_${row}_streams2" --streams 2
      # ROW_carryN: also reset every N segments
      [[ $row == *_carry[0-9]* ]] && drift "$ckpt" "${g}_${row}_reset" --reset-segments "${row##*_carry}" ;;
    *) drift "$ckpt" "${g}_${row}_windows" ;;
  esac
done
wait
{
  for f in "$WORK"/h*/recipes.md; do [ -f "$f" ] && { echo "# $(basename "$(dirname "$f")")"; cat "$f"; }; done
  for f in "$WORK"/drift/*.txt; do [ -f "$f" ] && { echo "== $(basename "$f")"; grep -E '^(after|segments|whole)' "$f"; }; done
} >"$OUT/summary.md"
cat "$OUT/summary.md"
tar -C "$WORK" -czf "$OUT/carry.tar.gz" . && log "packed $OUT/carry.tar.gz"
