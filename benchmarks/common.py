"""Shared benchmark plumbing: inputs, interleaved timing, result rows, tables."""
from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass

import torch
import torch.utils.benchmark as tbench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "malloc": _MALLOC_SETTING,
    }


# glibc's default: blocks above an adaptive threshold (128 KiB at start) are mmapped, and a
# free heap top above twice it is given back to the system. A forward pass's activations
# (25 MB for MiniLM's batch of 64 x 64 tokens) then often come back from the system as
# fresh pages and fault in again on every call: 2-3 million page faults in 15 forwards and
# 15-25% of a forward's time on this machine (2026-12-01, base and MASS alike), and the
# cost depends on what the process allocated earlier. Keeping blocks up to 32 MiB (glibc's
# largest threshold) in the heap is what a serving process would set; the benchmarks and
# the main job set it for every method alike.
_MALLOC_SETTING = "glibc default"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30


def retain_freed_memory() -> str:
    """Set glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB for this
    process (as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.
    trim_threshold=1073741824 would at start-up). Returns the setting, which
    machine_info reports; "not glibc" where there is no mallopt, and says so where the
    allocator in use refuses it (e.g. AddressSanitizer's)."""
    global _MALLOC_SETTING
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        _MALLOC_SETTING = "not glibc"
        return _MALLOC_SETTING
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        _MALLOC_SETTING = f"glibc, mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
    else:  # another allocator answers mallopt (AddressSanitizer's does, refusing)
        _MALLOC_SETTING = "mallopt refused (not glibc's allocator)"
    return _MALLOC_SETTING


def git_commit() -> str:
    # The GPU machine's copy of the tree carries the .git of the session's start, not the
    # commit that was sent: the caller names that one (gpu_check.sh's MASS_EXT_COMMIT).
    if os.environ.get("MASS_EXT_COMMIT"):
        return os.environ["MASS_EXT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        # Dirty means changed code: the benchmarks' own outputs (results, README tables) do
        # not count, or a run right after another would always say dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!benchmarks/results", ":!README.md"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class Layer:
    """One routed layer: base weight, bias and T orthonormal rank-r task factors."""

    weight: torch.Tensor
    bias: torch.Tensor
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @classmethod
    def random(cls, d_in, d_out, T, r, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        bias = torch.randn(d_out, generator=g)
        U = torch.linalg.qr(torch.randn(T, d_out, r, generator=g)).Q
        S = torch.rand(T, r, generator=g) + 0.1
        V = torch.linalg.qr(torch.randn(T, d_in, r, generator=g)).Q.transpose(1, 2)
        return cls(*(t.to(dtype).contiguous() for t in (weight, bias, U, S, V)))

    def task_inputs(self, N, seed=1):
        """Rows that each lie mostly in one task's subspace (a realistic routing mix)."""
        g = torch.Generator().manual_seed(seed)
        T, r, d_in = self.V.shape
        tasks = torch.randint(0, T, (N,), generator=g)
        coeffs = torch.randn(N, r, generator=g)
        x = torch.einsum("nr,nri->ni", coeffs, self.V.float()[tasks])
        x = x + 0.3 * torch.randn(N, d_in, generator=g) * coeffs.norm(dim=1, keepdim=True) / d_in**0.5
        return x.to(self.V.dtype)


def time_interleaved(providers: dict, rounds: int, min_run_time: float) -> dict:
    """Median-of-blocks time (seconds) of every provider in every round; the providers
    take turns within a round (rotating the order), so drift hits them all alike. They
    run with the process's threads (torch.utils.benchmark.Timer's default is one)."""
    names = list(providers)
    times = {name: [] for name in names}
    for name in names:  # warm up (first-call allocations, thread pool start)
        providers[name]()
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            timer = tbench.Timer(stmt="f()", globals={"f": providers[name]},
                                 num_threads=torch.get_num_threads())
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return times


def ratio_stats(num: list, den: list) -> dict:
    """Per-round ratios, then their median and range."""
    ratios = sorted(a / b for a, b in zip(num, den))
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}


def provenance(result: dict, script: str) -> str:
    """Where and when a result was measured: machine, torch, commit, date, command."""
    m = result["machine"]
    return (f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
            f"malloc: {m.get('malloc', 'glibc default')}, commit {m['commit']}, "
            f"{result['date']} (`python benchmarks/{script}`)")


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def replace_between_markers(path: str, marker: str, text: str) -> None:
    """Replace the text between <!-- marker:start --> and <!-- marker:end --> in a file."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    with open(path) as f:
        content = f.read()
    if start not in content or end not in content:
        return
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + start + "\n" + text.rstrip() + "\n" + end + tail)


class OneDnnLinear(torch.nn.Linear):
    """nn.Linear whose float32 CPU inference runs oneDNN's GEMM
    (torch.ops.mkldnn._linear_pointwise), the library mass_ext's CPU op uses for its
    dense part (csrc/cpu/dense_gemm.cpp); PyTorch's own nn.Linear runs MKL on x86,
    2.1-2.3x slower on AMD EPYC from 64 rows on (benchmarks/bench_cpu_gemm.py). Plain
    models in the benchmarks use it, so a comparison with mass_ext measures the method,
    not the GEMM library.
    Anything else (gradients, other dtypes or devices) runs F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return torch.nn.functional.linear(x, self.weight, self.bias)


def onednn_linears(module: torch.nn.Module) -> torch.nn.Module:
    """Every plain nn.Linear of `module` (in place) an OneDnnLinear, where torch has
    oneDNN; parameters, hooks and state dict keys stay as they are. Returns `module`."""
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return module
    for layer in module.modules():
        if type(layer) is torch.nn.Linear:
            layer.__class__ = OneDnnLinear
    return module


def ratio_cell(stats: dict) -> str:
    """A ratio_stats result as a table cell: median [min-max]."""
    return f"{stats['median']:.2f} [{stats['min']:.2f}-{stats['max']:.2f}]"


def bench_main(doc: str, name: str, readme_marker: str, run, markdown,
               quick=(3, 0.02), full=(7, 0.1)) -> None:
    """A benchmark script's command line: run(rounds, min_run_time) with the `quick` or
    `full` settings, then `name`.json (the raw rows) and `name`.md (markdown(result))
    under --out and, unless --quick, the table in README.md between readme_marker's
    markers."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{quick[0]} rounds of {quick[1] * 1e3:.0f} ms per provider")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    retain_freed_memory()
    result = run(*(quick if args.quick else full))
    table = markdown(result)
    write_json(os.path.join(args.out, f"{name}.json"), result)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table)
    if not args.quick:
        replace_between_markers(os.path.join(ROOT, "README.md"), readme_marker, table)
    print()
    print(table)
