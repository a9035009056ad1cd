# Shared helpers for the prepare-*.sh scripts. Sourced, not run.
# Conventions: every script writes a stamp file (.prepared) into its output
# directory when it finishes; a later run with the same settings does nothing.

set -euo pipefail

DATA_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$DATA_SCRIPTS_DIR/.." && pwd)"

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(basename "$0")] $*" >&2; }

# Prefer an explicit $PYTHON, then the repository's .venv, then python3, so the
# scripts work whether or not the venv is activated.
find_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        :
    elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
        PYTHON="$REPO_ROOT/.venv/bin/python"
    else
        PYTHON=python3
    fi
    command -v "$PYTHON" >/dev/null 2>&1 || die "python not found ($PYTHON); activate the venv or set PYTHON"
    export PYTHON
}

need_python_module() {
    "$PYTHON" -c "import $1" 2>/dev/null \
        || die "python module '$1' missing for $PYTHON (activate .venv, or: pip install $2)"
}

# fairseq-preprocess through the same interpreter, so a stale fairseq on PATH
# is never picked up.
fairseq_preprocess() {
    "$PYTHON" -m fairseq_cli.preprocess "$@"
}

helper() { "$PYTHON" "$DATA_SCRIPTS_DIR/fwp_data.py" "$@"; }

# verify FILE ALGO EXPECTED [SIZE]: ALGO is sha256 or md5; SIZE (bytes) is
# checked first because it is cheap and gives the clearer message.
verify() {
    local file=$1 algo=$2 expected=$3 size=${4:-}
    [[ -f "$file" ]] || die "missing file $file"
    if [[ "${NO_VERIFY:-0}" == 1 ]]; then
        log "not verifying $file (--no-verify)"; return 0
    fi
    if [[ -n "$size" ]]; then
        local got_size
        got_size=$(wc -c <"$file" | tr -d ' ')
        [[ "$got_size" == "$size" ]] || die "size mismatch for $file: expected $size bytes, got $got_size (truncated or wrong download? delete it and rerun; --no-verify skips the check)"
    fi
    local got
    got=$("${algo}sum" "$file" | cut -d' ' -f1)
    [[ "$got" == "$expected" ]] || die "checksum mismatch for $file: expected $algo $expected, got $got (corrupt or changed upstream? delete it and rerun; --no-verify skips the check)"
}

# fetch "URL [URL...]" DEST FROM_DIR: copy from the local mirror when given,
# else download from the first URL that answers. An existing DEST is kept
# (verification then decides whether it is good).
fetch() {
    local urls=$1 dest=$2 from=${3:-}
    local name url
    name=$(basename "$dest")
    if [[ -s "$dest" ]]; then
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    if [[ -n "$from" ]]; then
        [[ -f "$from/$name" ]] || die "--from $from has no $name (put a copy of ${urls%% *} there)"
        cp "$from/$name" "$dest.part"
    else
        local ok=0
        for url in $urls; do
            log "downloading $url"
            if command -v curl >/dev/null 2>&1; then
                curl -fL --retry 3 -o "$dest.part" "$url" && { ok=1; break; }
            elif command -v wget >/dev/null 2>&1; then
                wget -q -O "$dest.part" "$url" && { ok=1; break; }
            else
                die "neither curl nor wget found; use --from DIR with a local copy of $name"
            fi
            log "failed: $url"
        done
        [[ $ok == 1 ]] || die "download of $name failed from: $urls (use --from DIR with a local copy)"
    fi
    mv "$dest.part" "$dest"
}

check_from_dir() {
    local from=$1
    [[ -z "$from" ]] && return 0
    [[ -d "$from" ]] || die "--from $from: not a directory"
}

# The options every prepare script takes: call it from the `*)` branch of the script's own
# option loop, then `shift "$SHIFT_BY"`. Sets FROM, OUT, WORKERS, FORCE, NO_VERIFY.
common_option() {
    case $1 in
        --from) FROM=${2:?--from needs a directory}; SHIFT_BY=2 ;;
        --out) OUT=${2:?--out needs a directory}; SHIFT_BY=2 ;;
        --workers) WORKERS=$2; SHIFT_BY=2 ;;
        --force) FORCE=1; SHIFT_BY=1 ;;
        --no-verify) NO_VERIFY=1; SHIFT_BY=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
}

# After the option loop: make --from absolute, and stop (successfully) when OUT already holds
# a build with the same SETTINGS. Usage: finish_options "Data set name" "$SETTINGS"
finish_options() {
    check_from_dir "$FROM"
    [[ -n "$FROM" ]] && FROM=$(cd "$FROM" && pwd)
    if [[ $FORCE == 0 ]] && already_done "$OUT" "$2"; then
        echo "$1 already prepared in $OUT ($2); nothing to do (--force rebuilds)."
        exit 0
    fi
}

# binarise_joined TOK SRC TGT [NOTE]: the translation pairs TOK/{train,valid,test}.{SRC,TGT}
# (encoded with OUT/spm.model) -> one joined dictionary from the training text (see fwp_data.py
# make-dict), refused where valid/test have tokens outside it, then fairseq-preprocess into OUT
# with WORKERS workers. NOTE, if given, goes in parentheses into the progress line.
binarise_joined() {
    local tok=$1 src=$2 tgt=$3 note=${4:-}
    helper make-dict --model "$OUT/spm.model" --out "$tok/dict.txt" "$tok/train.$src" "$tok/train.$tgt"
    helper check-unk --dict "$tok/dict.txt" "$tok"/{valid,test}.{"$src","$tgt"} \
        || die "tokens of valid/test missing from the dictionary (they would become <unk>)"
    log "binarising with fairseq-preprocess${note:+ ($note)}"
    fairseq_preprocess --source-lang "$src" --target-lang "$tgt" \
        --trainpref "$tok/train" --validpref "$tok/valid" --testpref "$tok/test" \
        --srcdict "$tok/dict.txt" --joined-dictionary --destdir "$OUT" --workers "$WORKERS" \
        >"$OUT/preprocess.stdout" 2>&1 || { tail -20 "$OUT/preprocess.stdout" >&2; die "fairseq-preprocess failed (log: $OUT/preprocess.stdout)"; }
}

# Stamp handling: the stamp records the settings, so a rerun with other
# settings is refused rather than silently mixing outputs.
STAMP_NAME=.prepared
already_done() {
    local out=$1 settings=$2
    local stamp="$out/$STAMP_NAME"
    [[ -f "$stamp" ]] || return 1
    if [[ "$(cat "$stamp")" == "$settings" ]]; then
        return 0
    fi
    die "$out was prepared with other settings ($(tr '\n' ' ' <"$stamp")); pass --force to rebuild, or choose another --out"
}

write_stamp() { printf '%s' "$2" >"$1/$STAMP_NAME"; }

# List what was produced, with sizes.
report() {
    local out=$1
    echo "Produced in $out:"
    (cd "$out" && find . -maxdepth 1 -type f ! -name "$STAMP_NAME" -printf '  %-40f %12s bytes\n' | sort)
}
