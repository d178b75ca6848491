"""Pre-routed CPU op on large batches: a group of rows sharing one task set (and weights)
runs through one merged weight W + sum_j w_j U_j S_j V_j when it is large enough, instead
of its base GEMM plus its low-rank update (csrc/routed_linear_cpu.cpp, merged_groups).
This measures where that pays against the path rows with weights of their own take:
task-set groups (x W^T + b and [w h] U^T per tile, after one grouped GEMM for h), or,
under MASS_EXT_CPU_MERGE=0 (the column "low-rank"), the large tasks' GEMM updates.

Each case: T tasks, k = 1, the N rows split evenly over the tasks, `rows/task` a multiple
of the break-even d_in * d_out / (d_in + d_out). Providers, taking turns every round:
  grouped    weights 1 (the groups merge once they hold >= 1.5x the break-even rows)
  per_row    weights 1 + 1e-7 * row (no two rows share a weight: never merged, a
             task-set group per task)
  low_rank   per_row's call with MASS_EXT_CPU_MERGE=0 (no groups of either kind)
  floor      F.linear(x, W, b): the layer without any task
The same FLOPs would be spent by both routed providers without merging.

Writes benchmarks/results/merged_groups.{json,md} and refreshes the table in README.md.

    python benchmarks/bench_merged_groups.py [--quick]
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import mass_ext  # noqa: E402

# (d_in, d_out, T, r): MiniLM's attention and MLP layers at T = 5, a ViT-B-sized layer.
SHAPES = [(384, 384, 5, 76), (384, 1536, 5, 76), (768, 768, 8, 96)]
MULTIPLES = (1.0, 2.0, 2.5, 4.0, 8.0)


def without_groups(call):
    """call() with MASS_EXT_CPU_MERGE=0: no merged or task-set groups."""
    saved = os.environ.get("MASS_EXT_CPU_MERGE")
    os.environ["MASS_EXT_CPU_MERGE"] = "0"
    try:
        return call()
    finally:
        if saved is None:
            os.environ.pop("MASS_EXT_CPU_MERGE", None)
        else:
            os.environ["MASS_EXT_CPU_MERGE"] = saved


def run(rounds: int, min_run_time: float, shapes=SHAPES, multiples=MULTIPLES) -> dict:
    rows = []
    for d_in, d_out, T, r in shapes:
        layer = common.Layer.random(d_in, d_out, T, r)
        W, b, S, V = layer.weight, layer.bias, layer.S, layer.V
        U = layer.U.transpose(1, 2).contiguous().transpose(1, 2)  # RoutedLinear's layout
        break_even = d_in * d_out / (d_in + d_out)
        for multiple in multiples:
            per_task = int(round(multiple * break_even))
            N = per_task * T
            x = torch.randn(N, d_in, generator=torch.Generator().manual_seed(1))
            indices = (torch.arange(N) % T)[torch.randperm(N, generator=torch.Generator()
                                                           .manual_seed(2))][:, None]
            ones = torch.ones(N, 1)
            distinct = 1 + 1e-7 * torch.arange(N, dtype=torch.float64)[:, None].float()
            providers = {
                "grouped": lambda: mass_ext.routed_linear(x, W, b, U, S, V, indices=indices,
                                                          weights=ones),
                "per_row": lambda: mass_ext.routed_linear(x, W, b, U, S, V, indices=indices,
                                                          weights=distinct),
                "low_rank": lambda: without_groups(lambda: mass_ext.routed_linear(
                    x, W, b, U, S, V, indices=indices, weights=distinct)),
                "floor": lambda: F.linear(x, W, b),
            }
            with torch.inference_mode():
                for name, weights in (("grouped", ones), ("per_row", distinct),
                                      ("low_rank", distinct)):
                    torch.testing.assert_close(
                        providers[name](), mass_ext.reference.routed_linear(
                            x, W, b, U, S, V, indices=indices, weights=weights),
                        atol=1e-4, rtol=1e-4)
                times = common.time_interleaved(providers, rounds, min_run_time)
            row = {"d_in": d_in, "d_out": d_out, "T": T, "r": r, "N": N,
                   "rows_per_task": per_task, "break_even_multiple": multiple,
                   "rounds": rounds,
                   "median_us": {p: 1e6 * sorted(t)[len(t) // 2] for p, t in times.items()},
                   "ratios": {"grouped/per_row": common.ratio_stats(times["grouped"],
                                                                    times["per_row"]),
                              "grouped/floor": common.ratio_stats(times["grouped"], times["floor"]),
                              "per_row/floor": common.ratio_stats(times["per_row"], times["floor"]),
                              "per_row/low_rank": common.ratio_stats(times["per_row"],
                                                                     times["low_rank"])}}
            rows.append(row)
            print(f"{d_in}x{d_out} T={T} r={r} rows/task {per_task} ({multiple}x): "
                  + "  ".join(f"{k} {v['median']:.2f}" for k, v in row["ratios"].items()),
                  flush=True)
    return {"machine": common.machine_info(), "backend": mass_ext.backend(),
            "date": datetime.date.today().isoformat(), "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        f"CPU, float32, {common.provenance(result, 'bench_merged_groups.py')}. "
        "Pre-routed k = 1, rows split evenly over the tasks; medians over rounds of per-round "
        "time ratios (range in brackets).",
        "",
        "| d_in x d_out | T | r | rows / task (x break-even) | grouped / per-row weights "
        "| grouped / F.linear | per-row / F.linear | per-row: task-set / low-rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = [common.ratio_cell(s) for s in row["ratios"].values()]
        lines.append(f"| {row['d_in']} x {row['d_out']} | {row['T']} | {row['r']} | "
                     f"{row['rows_per_task']} ({row['break_even_multiple']}x) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    common.bench_main(__doc__, "merged_groups", "bench:merged", run, markdown)


if __name__ == "__main__":
    main()
