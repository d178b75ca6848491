#!/usr/bin/env bash
# The main job: set up (if needed), run the CPU benchmark suite, print its table and
# write benchmarks/results/cpu.{json,md} (and the README table).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python benchmarks/bench_cpu.py "$@"
