#!/usr/bin/env bash
# The small real recipe runs on one GPU machine without network access, every row at once, each row its
# own fairseq process (they are launch-bound, so a single small model leaves the GPU mostly idle):
#   Multi30k De->En      examples/translation/run_multi30k.sh        softmax linear dpfp delta
#   carried fast weights experiments/carried_state/run_carry_state.sh  deltanet deltanet_carry linear_carry
# Each row keeps its script's own budget (MAX_UPDATE); --stop-time-hours stops a row that would
# miss RECIPES_DEADLINE (epoch seconds) early enough to still be evaluated, and the table says how
# many updates it ran. Everything but the checkpoints ends in $OUT/recipes.tar.gz, the tables also
# in $OUT/recipes.md.
#
#   RECIPES_DEADLINE=$(( $(date +%s) + 400 )) OUT=/tmp/out bash scripts/gpu_recipes.sh
#
# Needs fairseq: the carried wheels in .whl/ (ve-fairseq, hydra-core, omegaconf,
# antlr4-python3-runtime, bitarray) are installed into /tmp/fsite when fairseq is missing.
# Environment: RECIPES ("multi30k carry_state")  EVAL_MARGIN_S (90: kept for evaluation after
#   training)  RECIPE_IMPL (chunked: the recurrence the rows train with)  RECIPE_EXTRA_ARGS
#   MULTI30K_ROWS, CARRY_STATE_ROWS (the rows of each recipe; default: the tables' rows)
#   MAX_UPDATE, GEN_ARGS (passed on to the run scripts; their defaults otherwise)
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
WORK=${RECIPES_WORK:-/tmp/recipes}
DEADLINE=${RECIPES_DEADLINE:-$(( $(date +%s) + 600 ))}
EVAL_MARGIN_S=${EVAL_MARGIN_S:-90}
RECIPES=${RECIPES:-"multi30k carry_state"}
mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python3}
log() { echo "[recipes $(date +%H:%M:%S)] $*"; }

source scripts/fairseq_wheels.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import fairseq, fwp_fairseq" 2>"$WORK/import.err"; then
  log "fairseq is not importable, no recipe runs: $(tail -1 "$WORK/import.err")"
  exit 1
fi

# Data and scripts read relative paths; each row writes under its own OUT so rows never share a table.
rows=()
for r in $RECIPES; do
  case $r in
    multi30k) for m in ${MULTI30K_ROWS:-softmax linear dpfp delta}; do rows+=("examples/translation/run_multi30k.sh:$m"); done ;;
    carry_state) for m in ${CARRY_STATE_ROWS:-deltanet deltanet_carry linear_carry}; do
                   rows+=("experiments/carried_state/run_carry_state.sh:$m"); done ;;
    *) log "unknown recipe $r"; exit 2 ;;
  esac
done

stop_h=$("$PY" -c "print(max(0.005, ($DEADLINE - $(date +%s) - $EVAL_MARGIN_S) / 3600))")
log "${#rows[@]} rows, training stops at the latest after $stop_h h, deadline $(date -d "@$DEADLINE" +%H:%M:%S)"
set -m   # each row its own process group, so one row can be stopped without the others
pids=()
for entry in "${rows[@]}"; do
  script=${entry%%:*}; row=${entry##*:}
  recipe=$(basename "$script" .sh); recipe=${recipe#run_}
  dir="$WORK/${recipe}_$row"
  mkdir -p "$dir"
  OUT="$dir" THREADS=1 EXTRA_ARGS="--fwp-impl ${RECIPE_IMPL:-chunked} --stop-time-hours $stop_h ${RECIPE_EXTRA_ARGS:-}" \
    bash "$script" "$row" >"$dir/run.log" 2>&1 &
  pids+=($!)
done
set +m

running() { local n=0 p; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo $n; }
last=0
while [ "$(running)" -gt 0 ] && [ "$(date +%s)" -lt "$DEADLINE" ]; do
  sleep 2
  if [ $(( $(date +%s) - last )) -ge 30 ]; then   # progress: each row's latest update count
    last=$(date +%s)
    prog=""
    for d in "$WORK"/*/; do
      u=$(grep -ho 'num_updates [0-9]*' "$d"*/train.log 2>/dev/null | tail -1 | grep -o '[0-9]*$')
      prog+="$(basename "$d")=${u:-0} "
    done
    log "$(running) running: $prog"
  fi
done
for p in "${pids[@]}"; do
  if kill -0 "$p" 2>/dev/null; then log "deadline: stopping process group $p"; kill -TERM -- "-$p" 2>/dev/null; fi
done
wait 2>/dev/null

{
  for d in "$WORK"/*/; do
    [ -f "$d/table.md" ] || { echo "$(basename "$d"): no result (see its run.log)"; continue; }
    echo "$(basename "$d"):"; cat "$d/table.md"; echo
  done
} >"$OUT/recipes.md"
cat "$OUT/recipes.md"
tar -C "$WORK" --exclude='checkpoints' -czf "$OUT/recipes.tar.gz" . && log "packed $OUT/recipes.tar.gz"
