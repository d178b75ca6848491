#!/usr/bin/env bash
# The speed benchmarks: set up (if needed), run the CPU op suite and the model-level
# benchmark (MiniLM), print their tables and write benchmarks/results/{cpu,model}.{json,md}
# (and the README tables). Arguments go to both scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/bench_cpu.py "$@"
.venv/bin/python benchmarks/bench_model.py "$@"
