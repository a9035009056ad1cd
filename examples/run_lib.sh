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

env_defaults() {  # env_defaults NAME=VALUE...: NAME keeps its value from the environment unless
    # that is empty or unset, then it is VALUE (the run scripts' settings, one line for all)
    local pair name
    for pair in "$@"; do
        name=${pair%%=*}
        declare -g "$name=${!name:-${pair#*=}}"
    done
}

train_row() {  # train_row DIR FAIRSEQ_TRAIN_ARGS...: train one table row, checkpoints in
    # DIR/checkpoints, the log in DIR/train.log, EXTRA_ARGS last (so that they override);
    # sets ROW_MINUTES, ROW_PARAMS and ROW_UPDATES for the row's table line
    local dir=$1 start
    shift
    mkdir -p "$dir"
    start=$(date +%s)
    # shellcheck disable=SC2086
    fairseq-train "$@" --save-dir "$dir/checkpoints" --no-epoch-checkpoints --num-workers 0 \
        --log-format simple --log-interval 50 ${EXTRA_ARGS:-} \
        2>&1 | tee "$dir/train.log"
    ROW_MINUTES=$(( ($(date +%s) - start) / 60 ))
    read -r ROW_PARAMS ROW_UPDATES < <(train_stats "$dir/train.log")
}

train_small_lm() {  # train_small_lm DIR ARGS...: train_row for the Tiny Shakespeare tables: an
    # fwp_lm of 4 layers of 256 (FFN ROW_FFN, default 1024; tied embeddings), segments of CONTEXT tokens, the same
    # optimiser and budget (MAX_UPDATE, SEED) for every row; ARGS: the row's task, fwp and head flags
    local dir=$1
    shift
    train_row "$dir" "$DATA" --user-dir fwp_fairseq --arch fwp_lm "$@" \
        --decoder-layers 4 --decoder-embed-dim 256 --decoder-ffn-embed-dim "${ROW_FFN:-1024}" \
        --decoder-input-dim 256 --decoder-output-dim 256 \
        --share-decoder-input-output-embed --dropout 0.1 --tokens-per-sample "$CONTEXT" \
        --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 1.0 \
        --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 200 --warmup-init-lr 1e-07 \
        --max-update "$MAX_UPDATE" --seed "$SEED"
}
