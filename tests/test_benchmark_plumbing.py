"""The benchmarks' shared plumbing (benchmarks/common.py): what every CPU figure in the
README rests on, so a wrong setting here would skew them all."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]


def test_timing_runs_with_the_process_threads():
    """torch.utils.benchmark.Timer runs a statement on one thread unless told otherwise:
    the providers must see the thread count the results report (machine_info)."""
    seen = []
    common.time_interleaved({"a": lambda: seen.append(torch.get_num_threads()),
                             "b": lambda: seen.append(torch.get_num_threads())},
                            rounds=2, min_run_time=0.001)
    assert set(seen) == {common.machine_info()["threads"]} == {torch.get_num_threads()}


def test_benchmarks_report_the_allocator_setting_they_run_with():
    """retain_freed_memory (set by every benchmark's and the main job's command line):
    glibc accepts it, and the results' machine info says which setting the times were
    measured under. In a child process: it changes the whole process."""
    script = ("from benchmarks import common\n"
              "print(common.machine_info()['malloc'])\n"
              "print(common.retain_freed_memory())\n"
              "print(common.machine_info()['malloc'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    before, returned, after = done.stdout.splitlines()
    assert before == "glibc default"
    # Under scripts/sanitize.sh AddressSanitizer's allocator (LD_PRELOAD) refuses mallopt.
    expected = ("mallopt refused (not glibc's allocator)" if "asan" in os.environ.get("LD_PRELOAD", "")
                else "glibc, mmap threshold 32 MiB, trim threshold 1024 MiB")
    assert returned == after == expected
