#!/usr/bin/env bash
# One-shot GPU check for a fresh lent H200 (issue 4), run from the repo root with $OUT set:
#   1. installs the carried wheels in .whl/ (flash-linear-attention, fla-core) into /tmp/site,
#   2. builds the CUDA extension just in time for sm_90 (ninja),
#   3. runs tests/test_cuda_ops.py and the ops tests,
#   4. runs benchmarks/gpu_ops.py,
# and writes $OUT/results.json, $OUT/table.md and $OUT/log.txt, all inside about 8 minutes.
# Prepare here first: scripts/fetch_gpu_wheels.sh (then carry .whl).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
PY=${PYTHON:-python3}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
TOTAL_S=${GPU_CHECK_TOTAL_S:-470}   # leave headroom under the 8 minutes

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -1 || true

echo "== wheels"
export PYTHONPATH="$PWD"
# fla-core holds fla.ops (all the benchmark uses); flash-linear-attention adds fla.layers and
# fla.models, which `import fla` then loads with transformers (slow, one more way to fail), so it
# is installed only on request.
wheels=(.whl/fla_core-*.whl)
[ "${FWP_GPU_CHECK_FLA_MODELS:-0}" = 1 ] && wheels=(.whl/*.whl)
if compgen -G ".whl/fla_core-*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" && export PYTHONPATH="$PWD:/tmp/site"
else
  echo "no .whl/ carried: the fla baselines will be skipped"
fi

echo "== build (t=$(elapsed)s)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
export MAX_JOBS=${MAX_JOBS:-16}
export FWP_FAIRSEQ_VERBOSE_BUILD=1
timeout 300 "$PY" -c "
import sys, time
t = time.time()
from fwp_fairseq.ops import cuda_available
ok, why = cuda_available()
print('cuda_available:', ok, why, f'({time.time() - t:.0f} s)')
sys.exit(0 if ok else 1)"
BUILD_RC=$?
BUILD_S=$(elapsed)

echo "== tests (t=$(elapsed)s)"
TEST_RC=-1
if [ $BUILD_RC -eq 0 ]; then
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rfEs --junitxml="$OUT/pytest.xml" \
    tests/test_cuda_ops.py tests/test_ops_*.py
  TEST_RC=$?
fi
TEST_S=$(elapsed)

echo "== benchmark (t=$(elapsed)s)"
BENCH_RC=-1
if [ $BUILD_RC -eq 0 ]; then
  LEFT=$(( TOTAL_S - $(elapsed) ))
  BUDGET=$(( LEFT - 60 ))   # the budget stops new runs; the last one and the writing need time
  if [ $BUDGET -gt 20 ]; then
    timeout $(( LEFT > 30 ? LEFT : 30 )) "$PY" benchmarks/gpu_ops.py --out "$OUT" --budget-s "$BUDGET"
    BENCH_RC=$?
  else
    echo "no time left for the benchmark"
  fi
fi

echo "== summary (t=$(elapsed)s)"
BUILD_RC=$BUILD_RC TEST_RC=$TEST_RC BENCH_RC=$BENCH_RC BUILD_S=$BUILD_S TEST_S=$TEST_S \
TOTAL=$(elapsed) OUTDIR="$OUT" "$PY" - <<'EOF'
import json, os, xml.etree.ElementTree as ET
out = os.environ["OUTDIR"]
res = {k.lower(): int(os.environ[k]) for k in ("BUILD_RC", "TEST_RC", "BENCH_RC", "BUILD_S", "TEST_S", "TOTAL")}
tests = {}
try:
    suite = ET.parse(os.path.join(out, "pytest.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["failed_names"] = [c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
                             if c.find("failure") is not None or c.find("error") is not None]
except Exception as e:  # noqa: BLE001
    tests = {"unreadable": str(e)}
res["tests"] = tests
try:
    res["bench"] = json.load(open(os.path.join(out, "bench.json")))
except Exception as e:  # noqa: BLE001
    res["bench"] = {"unreadable": str(e)}
json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=1)
lines = [f"build rc {res['build_rc']} ({res['build_s']} s), tests rc {res['test_rc']}: {tests}, "
         f"bench rc {res['bench_rc']}, total {res['total']} s", ""]
if os.path.exists(os.path.join(out, "bench.md")):
    lines.append(open(os.path.join(out, "bench.md")).read())
cc = res["bench"].get("meta", {}).get("cross_check") if isinstance(res["bench"], dict) else None
if cc:
    lines.append(f"Cross-check (max rel. diff of the fp32 delta-rule output, T=512, D=64): {cc}")
open(os.path.join(out, "table.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
[ $BUILD_RC -eq 0 ] && [ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ]
