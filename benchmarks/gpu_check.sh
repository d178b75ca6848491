#!/usr/bin/env bash
# The GPU machine's one script (H200, Python 3.12, torch 2.11 cu130, no network): builds
# the extension for sm_90, runs the CUDA tests, compute-sanitizer (memcheck, racecheck) on
# a small run, the GPU benchmarks and a per-kernel profile. Everything goes to $OUT as it
# happens, so a run cut short still leaves what it finished. Each stage
# has its own timeout, all within GPU_CHECK_BUDGET seconds (default 460: under 8 minutes).
# Installs nothing. It writes at most 8 files (the device tool returns no more): summary.txt
# (environment and each stage's status), build.log, tests.log, sanitizer.log (memcheck then
# racecheck), bench.log (bench_gpu.py, profile_gpu.py, then Nsight Compute when ncu is there),
# gpu.json, gpu.md, profile.md.
#
#   OUT=/tmp/out MASS_EXT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
#
# MASS_EXT_COMMIT: the commit whose tree was sent (the device tool's copy of the tree can
# carry an older .git); the result files name it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-460}
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

note() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$SUMMARY"; }

# stage NAME CAP_SECONDS LOG command...: runs within min(CAP, what the budget has left).
stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 15 ]; then
    note "$name: SKIPPED (budget spent)"
    return 1
  fi
  note "$name: start (timeout ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1
  local status=$?
  note "$name: exit $status$( [ $status -eq 124 ] && echo ' (TIMEOUT)')"
  tail -n 5 "$log" | sed 's/^/    /' | tee -a "$SUMMARY"
  return $status
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"
  echo "commit ${MASS_EXT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  git status --short 2>/dev/null | head -n 20 || true
  nvcc --version | tail -n 2 || true
  nproc
} 2>&1 | sed 's/^/env: /' | tee -a "$SUMMARY"

export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
# The scripts under benchmarks/ import the in-place build from the repository root.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! stage build 240 "$OUT/build.log" "$PY" setup.py build_ext --inplace; then
  note "build failed: see build.log"
  exit 1
fi
stage backend 60 /tmp/mass_ext_backend.log "$PY" -c \
  "import mass_ext; b = mass_ext.backend('cuda'); print('backend', b); assert b == 'cuda'"

# Eight workers when pytest-xdist is there: a test that breaks the CUDA context (an illegal
# address) then costs one worker, not every later test. pytest-timeout, if there, stops a
# hang at 120 s.
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL+=(-n 8)
"$PY" -c "import pytest_timeout" 2>/dev/null && PARALLEL+=(--timeout 120)
stage tests 210 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider -rfE --durations=15 \
  "${PARALLEL[@]}" tests/test_cuda.py tests/test_backend.py

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
stage memcheck 50 "$OUT/sanitizer.log" "$SAN" --tool memcheck --error-exitcode 3 \
  "$PY" benchmarks/cuda_smoke.py
# Rows go to gpu.json / gpu.md as they are measured: a timeout keeps the finished ones.
stage bench 200 "$OUT/bench.log" "$PY" benchmarks/bench_gpu.py --out "$OUT" --reps 15 \
  --graph-reps 5
stage profile 40 /tmp/mass_ext_profile.log "$PY" benchmarks/profile_gpu.py --out "$OUT"
cat /tmp/mass_ext_profile.log >> "$OUT/bench.log" 2>/dev/null
# Nsight Compute on the kernels far from their bytes (profile_gpu.py --ncu): throughput,
# occupancy, warp stalls and the hottest source lines (-lineinfo). Goes to bench.log.
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
if [ -x "$NCU" ]; then
  stage ncu 60 /tmp/mass_ext_ncu.log "$NCU" -k 'regex:route|expand|finalize|shrink|dense_h' -c 16 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SourceCounters "$PY" benchmarks/profile_gpu.py --ncu
  cat /tmp/mass_ext_ncu.log >> "$OUT/bench.log" 2>/dev/null
else
  note "ncu: not found; skipped"
fi
stage racecheck 45 "$OUT/racecheck.tmp" "$SAN" --tool racecheck --error-exitcode 3 \
  "$PY" benchmarks/cuda_smoke.py
cat "$OUT/racecheck.tmp" >> "$OUT/sanitizer.log" 2>/dev/null; rm -f "$OUT/racecheck.tmp"
note "done in $(( $(date +%s) - START ))s; results in $OUT"
