"""CPU latency of mass_ext.routed_linear against its baselines, measured in one run.

Providers (all on the same inputs, taking turns every round):
  fused        mass_ext.routed_linear, self-routed top-k (the C++ kernel), U stored
               column-major per task (U.transpose(1, 2) contiguous: the expand's layout)
  fused_rowU   the same with U contiguous (T, d_out, r)
  prerouted_k1 mass_ext.routed_linear with indices/weights given, k = 1
  reference    mass_ext.reference.routed_linear (pure PyTorch, explicit residuals)
  loop         route, then one masked pass per task with index_add_ (what users write)
  floor_base   F.linear(x, W, b): the layer without any task
  floor_cat    F.linear(x, cat([W, V_stacked])): the GEMM routing cannot avoid

Writes benchmarks/results/cpu.json (rows with machine, dtype, shapes, commit) and
benchmarks/results/cpu.md, and refreshes the table in README.md.

    python benchmarks/bench_cpu.py            # full suite (~3 minutes on 2 cores)
    python benchmarks/bench_cpu.py --quick    # fewer rounds, for a smoke run
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import mass_ext  # noqa: E402
from mass_ext import reference  # noqa: E402

# (d, T, r, k, N list): ViT-B-sized layers, then a 7B-sized layer at decode sizes.
SHAPES = [
    (768, 8, 96, 2, [1, 8, 64, 256, 2048]),
    (4096, 8, 512, 2, [1, 16]),
]

def providers_for(layer: common.Layer, x: torch.Tensor, k: int) -> dict:
    W, b, U, S, V = layer.weight, layer.bias, layer.U, layer.S, layer.V
    U_cm = U.transpose(1, 2).contiguous().transpose(1, 2)  # same values, expand layout
    W_cat = torch.cat([W, V.reshape(-1, V.shape[-1])])
    top1 = mass_ext.route(x, V, 1)
    return {
        "fused": lambda: mass_ext.routed_linear(x, W, b, U_cm, S, V, k),
        "fused_rowU": lambda: mass_ext.routed_linear(x, W, b, U, S, V, k),
        "prerouted_k1": lambda: mass_ext.routed_linear(x, W, b, U_cm, S, V,
                                                       indices=top1.indices, weights=top1.weights),
        "reference": lambda: reference.routed_linear(x, W, b, U, S, V, k),
        "loop": lambda: reference.per_task_loop(x, W, b, U, S, V, k),
        "floor_base": lambda: F.linear(x, W, b),
        "floor_cat": lambda: F.linear(x, W_cat),
    }


def run(rounds: int, min_run_time: float, dtype: torch.dtype) -> dict:
    rows = []
    for d, T, r, k, Ns in SHAPES:
        layer = common.Layer.random(d, d, T, r, dtype=dtype)
        for N in Ns:
            x = layer.task_inputs(N)
            with torch.inference_mode():
                times = common.time_interleaved(providers_for(layer, x, k), rounds, min_run_time)
            row = {"dtype": str(dtype).replace("torch.", ""), "d_in": d, "d_out": d, "T": T,
                   "r": r, "k": k, "N": N, "rounds": rounds,
                   "median_us": {p: 1e6 * sorted(t)[len(t) // 2] for p, t in times.items()},
                   "ratios": {
                       "fused/floor_cat": common.ratio_stats(times["fused"], times["floor_cat"]),
                       "fused_rowU/floor_cat": common.ratio_stats(times["fused_rowU"],
                                                                  times["floor_cat"]),
                       "prerouted_k1/floor_base": common.ratio_stats(times["prerouted_k1"],
                                                                     times["floor_base"]),
                       "loop/fused": common.ratio_stats(times["loop"], times["fused"]),
                       "reference/fused": common.ratio_stats(times["reference"], times["fused"]),
                   }}
            rows.append(row)
            print(format_row(row), flush=True)
    return {"machine": common.machine_info(), "backend": mass_ext.backend(),
            "date": datetime.date.today().isoformat(), "rows": rows}


def format_row(row: dict) -> str:
    ratios = row["ratios"]
    return (f"d={row['d_in']} T={row['T']} r={row['r']} k={row['k']} N={row['N']:>4}: "
            + "  ".join(f"{name} {v['median']:.2f}" for name, v in ratios.items()))


def markdown(result: dict) -> str:
    lines = [
        f"CPU, {result['rows'][0]['dtype']}, {common.provenance(result, 'bench_cpu.py')}. "
        "Ratios are medians over rounds of per-round time ratios (range in brackets); "
        "lower is better for the first two, higher for the last two.",
        "",
        "| d | T | r | k | N | fused / F.linear(x, [W; V]) | same, U row-major "
        "| pre-routed k=1 / F.linear(x, W, b) | per-task loop / fused | reference / fused "
        "| fused time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = []
        for name in ("fused/floor_cat", "fused_rowU/floor_cat", "prerouted_k1/floor_base",
                     "loop/fused", "reference/fused"):
            s = row["ratios"][name]
            cells.append(common.ratio_cell(s))
        lines.append(f"| {row['d_in']} | {row['T']} | {row['r']} | {row['k']} | {row['N']} | "
                     + " | ".join(cells) + f" | {row['median_us']['fused']:.0f} us |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 20 ms per provider")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=os.path.join(common.ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    common.retain_freed_memory()
    rounds, min_run_time = (3, 0.02) if args.quick else (7, 0.1)
    result = run(rounds, min_run_time, getattr(torch, args.dtype))
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    common.write_json(os.path.join(args.out, f"cpu{suffix}.json"), result)
    table = markdown(result)
    with open(os.path.join(args.out, f"cpu{suffix}.md"), "w") as f:
        f.write(table)
    if not args.quick and args.dtype == "float32":
        common.replace_between_markers(os.path.join(common.ROOT, "README.md"), "bench:cpu", table)
    print()
    print(table)


if __name__ == "__main__":
    main()
