# Sourced by the examples' run scripts (run_multi30k.sh, run_tinyshakespeare.sh,
# run_carry_state.sh): the repository root as working directory, the project's virtualenv first
# on PATH, THREADS (default 2) as torch's thread count, and the steps every table row repeats.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x .venv/bin/python ]] && export PATH="$ROOT/.venv/bin:$PATH"
export OMP_NUM_THREADS=${THREADS:-2}

need_data() {  # need_data FILE WHAT PREPARE_SCRIPT: stop with a hint where the data is missing
    [[ -f "$1" ]] || { echo "error: no $2 data in $(dirname "$1"); run data-scripts/$3 first" >&2; exit 1; }
}

table_header() {  # table_header TABLE "| a | b |": start the markdown table unless it exists
    [[ -f "$1" ]] && return 0
    local cols
    cols=$(( $(tr -cd '|' <<<"$2" | wc -c) - 1 ))
    { echo "$2"; printf '|'; for _ in $(seq "$cols"); do printf -- '---|'; done; echo; } >"$1"
}

train_stats() {  # train_stats TRAIN_LOG: "PARAMS UPDATES" of a fairseq-train log ("?" if absent)
    local params updates
    params=$(grep -o 'num. shared model params: [0-9,]*' "$1" | head -1 | grep -o '[0-9,]*$' || echo "?")
    updates=$(grep -o 'num_updates [0-9]*' "$1" | tail -1 | grep -o '[0-9]*$' || echo "?")
    echo "$params $updates"
}

eval_lm_ppl() {  # eval_lm_ppl LOG FAIRSEQ_EVAL_LM_ARGS...: keep the log, print the perplexity
    local log=$1
    shift
    fairseq-eval-lm "$@" --num-workers 0 2>&1 | tee "$log" | grep -o 'Perplexity: [0-9.]*' | tail -1 | grep -o '[0-9.]*$'
}

bits_of() {  # bits_of PERPLEXITY: log2, 3 decimals ("?" for no number)
    python3 -c "import math; print(f'{math.log2(float(\"$1\")):.3f}')" 2>/dev/null || echo "?"
}
