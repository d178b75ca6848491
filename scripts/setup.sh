#!/usr/bin/env bash
# Creates .venv (Python >= 3.10) with torch and the test tools, then builds mass_ext's
# C++ extension in place. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's own checks take seconds even when all is installed: skipped while the venv was
# set up from this requirements.txt (a stamp holds its hash).
stamp=.venv/.mass_ext_requirements
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
  .venv/bin/python -m pip install --quiet -r requirements.txt
  echo "$wanted" > "$stamp"
fi
# Rebuild only when needed (a full build takes over a minute): no extension, one that no
# longer loads (e.g. another torch), or a source newer than it. MASS_EXT_REBUILD=1 forces it.
built=$(ls mass_ext/_C*.so 2>/dev/null | head -n 1 || true)
report="import mass_ext, torch; print('mass_ext backend:', mass_ext.backend(), '| torch', torch.__version__)"
if [ -z "${MASS_EXT_REBUILD:-}" ] && [ -n "$built" ] \
   && [ -z "$(find csrc setup.py -newer "$built" -print -quit)" ] \
   && .venv/bin/python -m pip show --quiet mass_ext >/dev/null 2>&1 \
   && loaded=$(.venv/bin/python -c "import mass_ext._C; $report" 2>/dev/null); then
  echo "mass_ext: extension up to date ($built)"
  echo "$loaded"
else
  # --no-build-isolation: build against the torch just installed (an isolated build would
  # fetch another torch and produce an extension that does not load with this one).
  MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install --quiet --no-build-isolation -e .
  .venv/bin/python -c "$report"
fi
