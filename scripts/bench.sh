#!/usr/bin/env bash
# The speed benchmarks: set up (if needed), run the CPU op suite, the merged-groups sweep
# of the pre-routed op and the model-level benchmark (MiniLM), print their tables and
# write benchmarks/results/{cpu,merged_groups,model}.{json,md} (and the README tables).
# Arguments go to every script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/bench_cpu.py "$@"
.venv/bin/python benchmarks/bench_merged_groups.py "$@"
.venv/bin/python benchmarks/bench_model.py "$@"
