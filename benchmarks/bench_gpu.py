"""GPU latency of mass_ext.routed_linear against its baselines, measured in one run
(the CUDA counterpart of bench_cpu.py; benchmarks/gpu_check.sh runs it on the GPU machine).

Providers (same inputs, same run):
  fused        mass_ext.routed_linear, self-routed top-k (the CUDA kernels), U stored
               column-major per task (U.transpose(1, 2) contiguous)
  fused_rowU   the same with U contiguous (T, d_out, r)
  prerouted_k1 mass_ext.routed_linear with indices/weights given, k = 1
  reference    mass_ext.reference.routed_linear (pure PyTorch, explicit residuals)
  compiled_ref torch.compile(reference.routed_linear) (first shape at N = 16 only:
               compiling takes tens of seconds per shape)
  loop         route, then one masked pass per task with index_add_ (what users write)
  floor_base   F.linear(x, W, b): the layer without any task
  floor_cat    F.linear(x, cat([W, V_stacked])): the GEMM routing cannot avoid
  {fused,prerouted_k1}_{decode,mixed,large}  each forced onto one CUDA path (the
               thresholds' environment variables; graph timing only): decode = `project`
               + selected-tasks expand, mixed = cuBLAS + selected-tasks expand, large =
               cuBLAS + dense expand GEMM. Where they cross tells where kProjectMaxRows /
               kSelectedSlotsPerTask belong

Two timings per provider, medians with the 20th-80th percentile range:
  graph  CUDA-graph replays of calls that cycle over copies of the layer (> 200 MB in all,
         so W does not sit in the 50 MB L2), per call; no launch overhead. The bandwidth
         and TFLOP/s columns use it. Providers that synchronise (loop) have none.
  eager  one call after writing 256 MB (flushes L2), CUDA events around it: what an eager
         caller sees, launch overhead included.
Also measured: device-to-device copy bandwidth (the bandwidth floor).

Bytes the op must read: x, W, b, V, S and the U_t of the distinct tasks the batch selects;
plus writing y. FLOPs: 2 N d_in (d_out + T r) + 2 N k r d_out.

Writes gpu.json and gpu.md into --out (default $OUT or benchmarks/results), row by row.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import mass_ext  # noqa: E402
from mass_ext import reference  # noqa: E402

# (d, T, r, k, N list): the targets' shape first (with the small N where the paths cross),
# then the ones the issue asks to report.
SHAPES = [
    (4096, 8, 512, 2, [1, 2, 4, 8, 16, 64, 4096]),
    (768, 8, 96, 2, [1, 16, 64, 4096]),
    (4096, 20, 204, 2, [1, 16, 64, 4096]),
]
ROTATE_BYTES = 200 * 2**20
FLUSH_BYTES = 256 * 2**20
# Each CUDA path forced through the thresholds' environment variables: `project` or cuBLAS
# for the dense part, times the selected-tasks or the dense expand.
PATH_ENV = {
    "decode": {"MASS_EXT_CUDA_PROJECT_MAX_ROWS": "1000000",
               "MASS_EXT_CUDA_SELECTED_MAX_ROWS": "1000000"},
    "mixed": {"MASS_EXT_CUDA_PROJECT_MAX_ROWS": "0", "MASS_EXT_CUDA_SELECTED_MAX_ROWS": "1000000"},
    "large": {"MASS_EXT_CUDA_PROJECT_MAX_ROWS": "0", "MASS_EXT_CUDA_SELECTED_MAX_ROWS": "0"},
}
FORCED = tuple(f"{op}_{path}" for op in ("fused", "prerouted_k1") for path in PATH_ENV)
GRAPH_PROVIDERS = ("fused", "fused_rowU", "prerouted_k1", "reference", "floor_base",
                   "floor_cat") + FORCED
GRAPH_ONLY = FORCED


def with_env(fn, env):
    """fn run with the environment variables `env` set (the CUDA op reads its path
    thresholds at each call; a captured graph keeps the path chosen at capture)."""
    def run():
        old = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for name, value in old.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return run


def quantiles(times):
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median": statistics.median(times), "p20": pick(0.2), "p80": pick(0.8)}


def time_graph(fns, reps):
    """Seconds per call: one graph calls every fn once (each on its own layer copy)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / len(fns))
    del graph
    return quantiles(times)


def time_eager(fn, reps, flush):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return quantiles(times)


def copy_bandwidth(reps=20):
    """Device-to-device copy, bytes read + written per second."""
    n = 2**30 // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    t = time_graph([lambda: b.copy_(a)], reps)
    return 2 * a.numel() * a.element_size() / t["median"]


def layer_copies(d, T, r, dtype, count):
    base = common.Layer.random(d, d, T, r, dtype=dtype)
    copies = []
    for i in range(count):
        W, b, U, S, V = (t.to("cuda") for t in (base.weight, base.bias, base.U, base.S, base.V))
        if i:  # distinct buffers with the same values: same routing, no L2 reuse
            W, b, U, S, V = (t.clone() for t in (W, b, U, S, V))
        copies.append((W, b, U, S, V))
    return base, copies


def providers_for(params, x, k, top1):
    W, b, U, S, V = params
    U_cm = U.transpose(1, 2).contiguous().transpose(1, 2)
    W_cat = torch.cat([W, V.reshape(-1, V.shape[-1])])
    fused = lambda: mass_ext.routed_linear(x, W, b, U_cm, S, V, k)  # noqa: E731
    prerouted = lambda: mass_ext.routed_linear(  # noqa: E731
        x, W, b, U_cm, S, V, indices=top1.indices, weights=top1.weights)
    forced = {f"{name}_{path}": with_env(fn, env) for name, fn in
              (("fused", fused), ("prerouted_k1", prerouted)) for path, env in PATH_ENV.items()}
    return {
        "fused": fused,
        "fused_rowU": lambda: mass_ext.routed_linear(x, W, b, U, S, V, k),
        "prerouted_k1": prerouted,
        **forced,
        "reference": lambda: reference.routed_linear(x, W, b, U, S, V, k),
        "loop": lambda: reference.per_task_loop(x, W, b, U, S, V, k),
        "floor_base": lambda: F.linear(x, W, b),
        "floor_cat": lambda: F.linear(x, W_cat),
    }


def bytes_and_flops(d, T, r, k, N, x, routing, elem):
    tasks = int(torch.unique(routing.indices[routing.indices >= 0]).numel())
    read = (N * d + d * d + d + T * r * d + T * r + tasks * d * r) * elem
    flops = 2 * N * d * (d + T * r) + 2 * N * k * r * d
    return read + N * d * elem, flops


def run(args, out_dir):
    dtype = getattr(torch, args.dtype)
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s", flush=True)
    result = {"machine": {**common.machine_info(), "gpu": torch.cuda.get_device_name(),
                          "cuda": torch.version.cuda},
              "backend": mass_ext.backend("cuda"), "dtype": args.dtype,
              "date": datetime.date.today().isoformat(), "copy_bandwidth": copy_bw, "rows": []}
    compiled_ref = torch.compile(reference.routed_linear, dynamic=False) if args.compile else None
    for shape_i, (d, T, r, k, Ns) in enumerate(SHAPES):
        per_copy = (d * d + 2 * T * r * d) * torch.finfo(dtype).bits // 8
        count = max(2, min(64, -(-ROTATE_BYTES // per_copy)))
        base, copies = layer_copies(d, T, r, dtype, count)
        for N in Ns:
            if args.max_n and N > args.max_n:
                continue
            x = base.task_inputs(N).to("cuda")
            with torch.inference_mode():
                top1 = mass_ext.route(x, copies[0][4], 1)
                routing = mass_ext.route(x, copies[0][4], k)
                per_copy_providers = [providers_for(p, x, k, top1) for p in copies]
                names = list(per_copy_providers[0])
                if N > 256:  # the decode path is CUDA-core GEMV work: minutes at large N
                    names = [name for name in names if not name.endswith(("_decode", "_mixed"))]
                if compiled_ref is not None and shape_i == 0 and N == 16:
                    W, b, U, S, V = copies[0]
                    per_copy_providers[0]["compiled_ref"] = lambda: compiled_ref(x, W, b, U, S, V, k)
                    names.append("compiled_ref")
                eager, graph = {}, {}
                for name in names:
                    if name not in GRAPH_ONLY:
                        eager[name] = time_eager(per_copy_providers[0][name], args.reps, flush)
                    if name in GRAPH_PROVIDERS:
                        try:
                            graph[name] = time_graph([p[name] for p in per_copy_providers],
                                                     args.graph_reps)
                        except RuntimeError as error:  # not capturable: eager only
                            print(f"  {name}: no graph timing ({str(error).splitlines()[0]})")
                            torch.cuda.synchronize()
            nbytes, flops = bytes_and_flops(d, T, r, k, N, x, routing, torch.finfo(dtype).bits // 8)
            row = make_row(d, T, r, k, N, nbytes, flops, eager, graph, copy_bw)
            result["rows"].append(row)
            print(format_row(row), flush=True)
            write(result, out_dir)
            del per_copy_providers
        del copies
        torch.cuda.empty_cache()
    return result


def make_row(d, T, r, k, N, nbytes, flops, eager, graph, copy_bw):
    g = {name: t["median"] for name, t in graph.items()}
    e = {name: t["median"] for name, t in eager.items()}
    row = {"d": d, "T": T, "r": r, "k": k, "N": N, "bytes": nbytes, "flops": flops,
           "graph_s": graph, "eager_s": eager, "derived": {}}
    der = row["derived"]
    if "fused" in g:
        der["fused_bandwidth_TBps"] = nbytes / g["fused"] / 1e12
        der["fused_bandwidth_vs_copy"] = nbytes / g["fused"] / copy_bw
        der["fused_TFLOPs"] = flops / g["fused"] / 1e12
    if "fused" in g and "floor_cat" in g:
        cat_flops = 2 * N * d * (d + T * r)
        der["fused_vs_cat_plus_expand"] = g["fused"] / (g["floor_cat"] * flops / cat_flops)
    if "prerouted_k1" in g and "floor_base" in g:
        der["prerouted_k1_vs_linear"] = g["prerouted_k1"] / g["floor_base"]
    if "fused_decode" in g and "fused_large" in g:
        der["decode_path_over_large_path"] = g["fused_decode"] / g["fused_large"]
    for base in ("reference", "loop", "compiled_ref"):
        if base in e and "fused" in e:
            der[f"{base}_over_fused_eager"] = e[base] / e["fused"]
    return row


def format_row(row):
    der = row["derived"]
    parts = [f"d={row['d']} T={row['T']} r={row['r']} k={row['k']} N={row['N']:>5}:"]
    if "fused" in row["graph_s"]:
        parts.append(f"fused {row['graph_s']['fused']['median'] * 1e6:8.1f} us (graph)")
    parts.append(f"{row['eager_s']['fused']['median'] * 1e6:8.1f} us (eager)")
    parts += [f"{name} {value:.3g}" for name, value in der.items()]
    return "  ".join(parts)


def markdown(result):
    m = result["machine"]
    lines = [
        f"{m['gpu']}, {result['dtype']}, torch {m['torch']} (CUDA {m['cuda']}), commit "
        f"{m['commit']}, {result['date']}; copy bandwidth {result['copy_bandwidth'] / 1e12:.2f} "
        "TB/s (`python benchmarks/bench_gpu.py`). Graph: CUDA-graph replays over rotated "
        "layer copies; eager: one call after an L2 flush. Medians.",
        "",
        "| d | T | r | k | N | fused (graph) | GB/s | % of copy | TFLOP/s | fused / (cat GEMM + "
        "expand) | pre-routed k=1 / F.linear | fused (eager) | reference / fused | loop / fused "
        "| compiled ref / fused | decode path / large path |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for row in result["rows"]:
        der, g, e = row["derived"], row["graph_s"], row["eager_s"]
        lines.append("| " + " | ".join([
            str(row["d"]), str(row["T"]), str(row["r"]), str(row["k"]), str(row["N"]),
            fmt(g.get("fused", {}).get("median", None) and g["fused"]["median"] * 1e6, "{:.1f} us"),
            fmt(der.get("fused_bandwidth_TBps") and der["fused_bandwidth_TBps"] * 1e3, "{:.0f}"),
            fmt(der.get("fused_bandwidth_vs_copy") and 100 * der["fused_bandwidth_vs_copy"], "{:.0f}%"),
            fmt(der.get("fused_TFLOPs"), "{:.1f}"),
            fmt(der.get("fused_vs_cat_plus_expand")),
            fmt(der.get("prerouted_k1_vs_linear")),
            fmt(e["fused"]["median"] * 1e6, "{:.1f} us"),
            fmt(der.get("reference_over_fused_eager")),
            fmt(der.get("loop_over_fused_eager")),
            fmt(der.get("compiled_ref_over_fused_eager")),
            fmt(der.get("decode_path_over_large_path")),
        ]) + " |")
    paths = ("fused_decode", "fused_mixed", "fused_large", "prerouted_k1", "prerouted_k1_decode",
             "prerouted_k1_mixed", "prerouted_k1_large", "floor_base", "floor_cat")
    lines += [
        "",
        "Each path forced (graph, us): decode = `project` + selected-tasks expand, mixed = "
        "cuBLAS + selected-tasks expand, large = cuBLAS + dense expand GEMM.",
        "",
        "| d | T | r | k | N | " + " | ".join(paths) + " |",
        "|" + "---|" * (5 + len(paths)),
    ]
    for row in result["rows"]:
        g = row["graph_s"]
        lines.append("| " + " | ".join(
            [str(row[key]) for key in ("d", "T", "r", "k", "N")]
            + [fmt(g[name]["median"] * 1e6 if name in g else None, "{:.1f}") for name in paths])
            + " |")
    return "\n".join(lines) + "\n"


def write(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    suffix = "" if result["dtype"] == "bfloat16" else f"_{result['dtype']}"
    with open(os.path.join(out_dir, f"gpu{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, f"gpu{suffix}.md"), "w") as f:
        f.write(markdown(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=30, help="eager timings per provider")
    parser.add_argument("--graph-reps", type=int, default=10, help="graph replays per provider")
    parser.add_argument("--max-n", type=int, default=0, help="skip batches above this N")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile'd reference")
    parser.add_argument("--out", default=os.environ.get("OUT") or
                        os.path.join(common.ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device")
    result = run(args, args.out)
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
