#!/usr/bin/env bash
# The main job: set up (if needed), then the accuracy experiment on a real model with real
# data (benchmarks/accuracy): fine-tunes all-MiniLM-L6-v2 on five text tasks (cached in
# ~/.cache/mass_ext, or $MASS_EXT_CACHE), builds MASS, compares it with the experts, static
# merges and the reference second pass, prints the table and writes
# benchmarks/results/accuracy.{json,md,png} and the README table.
# Arguments go to the experiment (e.g. --quick, --tasks bbc tweets, --cache-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m benchmarks.accuracy.run "$@"
