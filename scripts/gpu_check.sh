#!/usr/bin/env bash
# One-shot check of a fresh GPU machine without network access, run from the repo root with $OUT set:
#   1. installs the carried wheels in .whl/ (flash-linear-attention, fla-core) into /tmp/site,
#   2. builds the CUDA extension just in time (ninja) for TORCH_CUDA_ARCH_LIST (default 9.0),
#   3. runs benchmarks/gpu_ops.py --suite chunk (the chunk kernels, chunk.md; about half the
#      benchmark budget, GPU_CHECK_CHUNK_S), then benchmarks/gpu_ops.py (bench.md),
#   4. runs tests/test_cuda_ops.py, the ops tests and tests/test_cuda_chunk_gpu.py (last: a
#      faulting new kernel cannot take the others' CUDA context down with it),
# and writes $OUT/results.json, $OUT/table.md and $OUT/log.txt, all inside about 8 minutes.
# GPU_CHECK_ALONGSIDE="command" (e.g. "bash scripts/gpu_recipes.sh") runs next to steps 2 and 4
# in a session of its own, is paused (SIGSTOP) while the benchmark runs so that the timings are
# the GPU's alone, and is waited for (at most until GPU_CHECK_TOTAL_S) at the end.
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

ALONG_SID=""
if [ -n "${GPU_CHECK_ALONGSIDE:-}" ]; then
  echo "== alongside: $GPU_CHECK_ALONGSIDE (t=$(elapsed)s)"
  rm -f /tmp/alongside.sid
  # the session's id is its first process's pid, which that bash writes down itself
  RECIPES_DEADLINE=$(( T0 + TOTAL_S - 25 )) OUT="$OUT" setsid bash -c \
    "echo \$\$ >/tmp/alongside.sid; exec bash -c \"\$0\"" "$GPU_CHECK_ALONGSIDE" >/tmp/alongside.log 2>&1 &
  for _ in $(seq 50); do [ -s /tmp/alongside.sid ] && break; sleep 0.1; done
  ALONG_SID=$(cat /tmp/alongside.sid 2>/dev/null)
fi
along() {  # along STOP|CONT|TERM: signal every process of the alongside session
  [ -n "$ALONG_SID" ] || return 0
  local f s
  for f in /proc/[0-9]*/stat; do   # field 6 of stat is the session id (after "pid (comm) ")
    s=$(sed 's/.*) //' "$f" 2>/dev/null | cut -d' ' -f4)
    [ "$s" = "$ALONG_SID" ] && kill "-$1" "$(basename "$(dirname "$f")")" 2>/dev/null
  done
  return 0
}

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
if [ $BUILD_RC -ne 0 ] && [ -n "$ALONG_SID" ]; then
  # without the extension this check has failed: end now, leaving the device time for a rerun
  echo "build failed: stopping the alongside job"; along TERM; ALONG_SID=""
fi

echo "== benchmark (t=$(elapsed)s)"
BENCH_RC=-1
if [ $BUILD_RC -eq 0 ]; then
  # the budget stops new runs; the last one and the writing need time (tests need ~150 s after)
  BUDGET=${GPU_CHECK_BENCH_S:-$(( TOTAL_S - $(elapsed) - 220 ))}
  if [ "$BUDGET" -gt 20 ]; then
    along STOP
    CHUNK_S=${GPU_CHECK_CHUNK_S:-$(( BUDGET / 2 ))}
    timeout $(( CHUNK_S + 60 )) "$PY" benchmarks/gpu_ops.py --suite chunk --out "$OUT" --budget-s "$CHUNK_S"
    CHUNK_RC=$?
    BUDGET=$(( TOTAL_S - $(elapsed) - 220 ))
    if [ "$BUDGET" -gt 20 ]; then
      timeout $(( BUDGET + 60 )) "$PY" benchmarks/gpu_ops.py --out "$OUT" --budget-s "$BUDGET"
      BENCH_RC=$?
    fi
    [ $BENCH_RC -eq 0 ] && BENCH_RC=$CHUNK_RC
    along CONT
  else
    echo "no time left for the benchmark"
  fi
fi

echo "== tests (t=$(elapsed)s)"
TEST_RC=-1
if [ $BUILD_RC -eq 0 ]; then
  # a hung test fails alone (pytest-timeout, where installed) instead of losing the report
  PER_TEST=(); "$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 60)
  LEFT=$(( TOTAL_S - $(elapsed) - 15 ))
  timeout $(( LEFT < 150 ? (LEFT > 30 ? LEFT : 30) : 150 )) "$PY" -m pytest -q -p no:cacheprovider -rfEs \
    "${PER_TEST[@]}" --junitxml="$OUT/pytest.xml" tests/test_cuda_ops.py tests/test_ops_*.py tests/test_cuda_chunk_gpu.py
  TEST_RC=$?
fi
TEST_S=$(elapsed)

if [ -n "$ALONG_SID" ]; then
  echo "== waiting for the alongside job (t=$(elapsed)s)"
  while kill -0 "$ALONG_SID" 2>/dev/null && [ "$(elapsed)" -lt $(( TOTAL_S - 5 )) ]; do sleep 2; done
  kill -0 "$ALONG_SID" 2>/dev/null && { echo "alongside job still running: stopped"; along TERM; }
  cat /tmp/alongside.log
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
    res["chunk"] = json.load(open(os.path.join(out, "chunk.json")))
except Exception as e:  # noqa: BLE001
    res["chunk"] = {"unreadable": str(e)}
try:
    res["bench"] = json.load(open(os.path.join(out, "bench.json")))
except Exception as e:  # noqa: BLE001
    res["bench"] = {"unreadable": str(e)}
json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=1)
lines = [f"build rc {res['build_rc']} ({res['build_s']} s), tests rc {res['test_rc']}: {tests}, "
         f"bench rc {res['bench_rc']}, total {res['total']} s", ""]
for name in ("chunk.md", "bench.md"):
    if os.path.exists(os.path.join(out, name)):
        lines.append(open(os.path.join(out, name)).read())
cc = res["bench"].get("meta", {}).get("cross_check") if isinstance(res["bench"], dict) else None
if cc:
    lines.append(f"Cross-check (max rel. diff of the fp32 delta-rule output, T=512, D=64): {cc}")
open(os.path.join(out, "table.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
[ $BUILD_RC -eq 0 ] && [ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ]
