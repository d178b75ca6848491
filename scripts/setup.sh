#!/usr/bin/env bash
# Creates .venv (Python >= 3.10) with torch and the test tools, then builds mass_ext's
# C++ extension in place. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
.venv/bin/python -m pip install --quiet -r requirements.txt
# --no-build-isolation: build against the torch just installed (an isolated build would
# fetch another torch and produce an extension that does not load with this one).
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install --quiet --no-build-isolation -e .
.venv/bin/python -c "import mass_ext, torch; print('mass_ext backend:', mass_ext.backend(), '| torch', torch.__version__)"
