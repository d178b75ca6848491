"""Where the time of one mass_ext.routed_linear call goes on the GPU: the CUDA time of each
kernel it launches, per call, from torch.profiler (CUPTI), for every path the op can take
(forced as bench_gpu.py does), at decode and at large N.

A breakdown, not a benchmark: one layer, no L2 rotation (W, V and U of the target shape
are 100 MB against a 50 MB L2, so most of each call still comes from DRAM), no CUDA
graph (launch gaps are not in the kernel times). bench_gpu.py gives the timings.

    python benchmarks/profile_gpu.py --out DIR     # writes DIR/profile.md and prints it
    ncu -k regex:route python benchmarks/profile_gpu.py --ncu   # a few calls for Nsight Compute
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_gpu import PATH_ENV, with_env  # noqa: E402

import mass_ext  # noqa: E402

CALLS = 10


def kernel_times(fn):
    """{kernel name: CUDA microseconds per call of fn}, over CALLS calls after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    times = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:  # a kernel or a memcpy/set
            times[event.name] += event.time_range.end - event.time_range.start
    return {name: us / CALLS for name, us in times.items()}


def short(name, width=70):
    name = name.replace("void ", "").replace("mass_ext::cuda::(anonymous namespace)::", "")
    return name if len(name) <= width else name[: width - 3] + "..."


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or
                        os.path.join(common.ROOT, "benchmarks", "results"))
    parser.add_argument("--ncu", action="store_true",
                        help="no profiler: one call of each case whose kernels are far from "
                             "their bytes (N = 1 selected-tasks path and pre-routed top-1, "
                             "N = 4096 dense path), for Nsight Compute to profile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_gpu.py: no CUDA device")
    d, T, r, k = 4096, 8, 512, 2
    layer = common.Layer.random(d, d, T, r, dtype=torch.bfloat16)
    W, b, U, S, V = (t.to("cuda") for t in (layer.weight, layer.bias, layer.U, layer.S, layer.V))
    U = U.transpose(1, 2).contiguous().transpose(1, 2)  # column-major per task, as bench_gpu
    lines = [f"{torch.cuda.get_device_name()}, bfloat16, torch {torch.__version__}, "
             f"d={d} T={T} r={r} k={k}: CUDA time per call of each kernel (us), torch.profiler, "
             f"mean of {CALLS} calls (`python benchmarks/profile_gpu.py`).", ""]
    if args.ncu:
        with torch.inference_mode():
            for N, path in ((1, "mixed"), (4096, "default")):
                x = layer.task_inputs(N).to("cuda")
                top1 = mass_ext.route(x, V, 1)
                env = PATH_ENV.get(path, {})
                with_env(lambda: mass_ext.routed_linear(x, W, b, U, S, V, k), env)()
                mass_ext.routed_linear(x, W, b, U, S, V, indices=top1.indices,
                                       weights=top1.weights)
            torch.cuda.synchronize()
        return
    with torch.inference_mode():
        for N in (1, 16, 4096):
            x = layer.task_inputs(N).to("cuda")
            top1 = mass_ext.route(x, V, 1)
            ops = {
                "self-routed": lambda: mass_ext.routed_linear(x, W, b, U, S, V, k),
                "pre-routed k=1": lambda: mass_ext.routed_linear(
                    x, W, b, U, S, V, indices=top1.indices, weights=top1.weights),
            }
            for op_name, op in ops.items():
                for path in ("default", *PATH_ENV):
                    if N > 256 and path in ("decode", "mixed"):
                        continue
                    fn = op if path == "default" else with_env(op, PATH_ENV[path])
                    times = kernel_times(fn)
                    total = sum(times.values())
                    lines.append(f"**N={N}, {op_name}, {path} path: {total:.1f} us of kernels**")
                    lines.append("")
                    lines += [f"- {us:8.1f}  {short(name)}"
                              for name, us in sorted(times.items(), key=lambda kv: -kv[1])]
                    lines.append("")
                    print("\n".join(lines[-len(times) - 3:]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
