#!/usr/bin/env bash
# Builds the CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer and runs the
# test suite against it. The build happens in a copy of the tree (build/sanitize/: the
# regular in-place build is untouched) and is incremental. Any finding aborts with a report
# (and a nonzero exit status).
#
#   bash scripts/sanitize.sh                       # the whole suite
#   bash scripts/sanitize.sh tests/test_fuzz.py -x # arguments go to pytest
#
# Python and torch are not instrumented, so libasan is preloaded (it must come first), and
# libstdc++ with it: Python is not a C++ program, and without libstdc++ loaded at start-up
# ASan cannot find the real __cxa_throw (its CHECK fails at torch's first exception).
# Leak detection is off: CPython and torch keep allocations alive until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || { bash scripts/setup.sh; PY=$ROOT/.venv/bin/python; }
COPY=$ROOT/build/sanitize
mkdir -p "$COPY"
# Tracked files and untracked ones git does not ignore, mtimes kept (incremental build).
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$COPY"
cd "$COPY"
echo "sanitize: building with -fsanitize=address,undefined in $COPY ..."
if ! MASS_EXT_SANITIZE=1 MASS_EXT_FORCE_CPU=1 MAX_JOBS=${MAX_JOBS:-2} \
    "$PY" setup.py build_ext --inplace > build_ext.log 2>&1; then
  tail -n 40 build_ext.log
  exit 1
fi
CXX=${CXX:-g++}
export LD_PRELOAD="$("$CXX" -print-file-name=libasan.so):$("$CXX" -print-file-name=libstdc++.so.6)${LD_PRELOAD:+:$LD_PRELOAD}"
# Reports go to files: pytest captures stderr, and a sanitizer abort would lose it.
REPORTS=$COPY/reports
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:log_path=$REPORTS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$REPORTS/ubsan"
echo "sanitize: running the tests (LD_PRELOAD=$LD_PRELOAD)"
status=0
"$PY" -m pytest -q -p no:cacheprovider "$@" || status=$?
if compgen -G "$REPORTS/*" > /dev/null; then
  echo "sanitize: FINDINGS (reports in $REPORTS):"
  cat "$REPORTS"/*
  exit 1
fi
[ "$status" -eq 0 ] && echo "sanitize: no findings, tests passed"
exit "$status"
