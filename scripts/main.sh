#!/usr/bin/env bash
# The main job: set up (if needed), run the CPU op benchmark suite and the model-level
# benchmark (MiniLM), print their tables and write benchmarks/results/*.{json,md} (and
# the README tables).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/bench_cpu.py "$@"
.venv/bin/python benchmarks/bench_model.py "$@"
