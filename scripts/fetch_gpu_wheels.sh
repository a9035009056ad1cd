#!/usr/bin/env bash
# Download to .whl/ the wheels a GPU machine without network access lacks (cp312, manylinux x86_64):
# flash-linear-attention and fla-core for the GPU benchmark's baselines, and fairseq (ve-fairseq
# with hydra-core, omegaconf, antlr4-python3-runtime, bitarray) for scripts/gpu_recipes.sh.
# torch, triton, einops, numpy, sacrebleu, sentencepiece and pytest are already on that machine;
# the GPU tests import only fwp_fairseq.ops. Run here, from the repo root; .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
FLA_VERSION=${FLA_VERSION:-}   # empty: the newest release
mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 any; do plat+=(--platform "$p"); done
get() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$@"
}
if [ -n "$FLA_VERSION" ]; then
  get "flash-linear-attention==$FLA_VERSION" "fla-core==$FLA_VERSION"
else
  get flash-linear-attention fla-core
fi
# fairseq for the recipe runs; antlr4-python3-runtime 4.9.3 (omegaconf 2.x) is an sdist only, so
# it is built into a pure-Python wheel here.
get ve-fairseq==0.12.3 hydra-core==1.3.8 omegaconf==2.3.1 bitarray==3.12.3
"$PY" -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl
# Print what the wheels require, so a missing dependency is visible here rather than there.
for w in .whl/*.whl; do
  echo "$(basename "$w"):"
  unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/  /' || true
done
