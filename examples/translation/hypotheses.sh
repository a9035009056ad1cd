#!/usr/bin/env bash
# The hypotheses of a fairseq-generate output in corpus order, one per line, as sacreBLEU reads
# them (the H-<id> lines; with --remove-bpe sentencepiece already plain text). Stops with an
# error unless there is exactly one hypothesis for every reference sentence: a score over fewer
# sentences is not the test set's score (fairseq alone leaves out the last batch of a test set
# whose size is not a multiple of --required-batch-size-multiple; the plugin keeps it).
#
#   bash examples/translation/hypotheses.sh GENERATE_OUTPUT REFERENCE > HYPOTHESES
set -euo pipefail
if [[ $# -ne 2 ]]; then
    echo "usage: $0 GENERATE_OUTPUT REFERENCE > HYPOTHESES" >&2
    exit 2
fi
gen=$1 ref=$2
for f in "$gen" "$ref"; do
    [[ -f "$f" ]] || { echo "error: no file $f" >&2; exit 1; }
done
# hypotheses, distinct sentence ids (one H- line per sentence unless --nbest > 1)
read -r hyps ids < <(awk -F'\t' '/^H-/ { n++; if (!($1 in seen)) { seen[$1]; d++ } }
                                 END { print n + 0, d + 0 }' "$gen")
refs=$(awk 'END { print NR }' "$ref")
if [[ $hyps -ne $refs || $ids -ne $refs ]]; then
    echo "error: $gen has $hyps hypotheses for $ids sentences, $ref has $refs reference sentences;" \
         "no score over part of a test set (was fairseq-generate run with --user-dir fwp_fairseq," \
         "--nbest 1, on this test set?)" >&2
    exit 1
fi
grep '^H-' "$gen" | sed 's/^H-//' | sort -n -k1,1 | cut -f3
