"""The CPU op's dense GEMMs: oneDNN tiles or ATen (csrc/cpu/dense_gemm.cpp).

The op is timed end to end (self-routed top-2 and pre-routed top-1, float32) with each
backend forced through MASS_EXT_CPU_GEMM, and with the default choice (auto: oneDNN from
2^22 multiply-adds). Beside it, the two libraries' plain linear layers on the same x and W:
F.linear (ATen: MKL on x86) and torch.ops.mkldnn._linear_pointwise (oneDNN, its own
threading), and the op's dense part alone (pre-routed with no task selected: x W^T + b
as the op's oneDNN tiles compute it, one thread per tile) against that oneDNN call: what
the tiles that keep results independent of the thread count cost. Providers take turns
every round; ratios are medians of per-round ratios.

Writes benchmarks/results/cpu_gemm.{json,md} and refreshes the table in README.md.

    python benchmarks/bench_cpu_gemm.py [--quick]
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

# (N, d_in, d_out, T, r): decode and batch sizes of MiniLM's layers (T = 5), a ViT-B-sized
# layer, a 7B-sized one; the first two sit on either side of the oneDNN size floor; 820
# rows: one task's group in bench_model.py's top-1 batch.
SHAPES = [(8, 384, 384, 5, 76), (16, 768, 768, 8, 96), (1, 4096, 4096, 8, 512),
          (64, 384, 1536, 5, 76), (820, 384, 384, 5, 76), (820, 384, 1536, 5, 76),
          (2048, 384, 384, 5, 76), (2048, 384, 1536, 5, 76),
          (2048, 1536, 384, 5, 76), (256, 4096, 4096, 8, 512)]


def with_gemm(backend: str, fn):
    def call():
        os.environ["MASS_EXT_CPU_GEMM"] = backend
        return fn()
    return call


def run(rounds: int, min_run_time: float, shapes=SHAPES) -> dict:
    onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    saved = os.environ.get("MASS_EXT_CPU_GEMM")
    rows = []
    try:
        for N, d_in, d_out, T, r in shapes:
            layer = common.Layer.random(d_in, d_out, T, r)
            W, b, S, V = layer.weight, layer.bias, layer.S, layer.V
            U = layer.U.transpose(1, 2).contiguous().transpose(1, 2)  # RoutedLinear's layout
            x = layer.task_inputs(N)
            indices = torch.randint(0, T, (N, 1), generator=torch.Generator().manual_seed(3))
            ones = torch.ones(N, 1)
            no_task = torch.full((N, 1), -1)
            ops = {"self-routed": lambda: mass_ext.routed_linear(x, W, b, U, S, V, top_k=2),
                   "pre-routed": lambda: mass_ext.routed_linear(x, W, b, U, S, V,
                                                                indices=indices, weights=ones)}
            providers = {f"{op} {backend}": with_gemm(backend, fn)
                         for op, fn in ops.items() for backend in ("aten", "onednn", "auto")}
            providers["F.linear"] = lambda: F.linear(x, W, b)
            if onednn_linear is not None:
                providers["oneDNN linear"] = lambda: onednn_linear(x, W, b, "none", [], "")
                providers["dense tiles"] = with_gemm("onednn", lambda: mass_ext.routed_linear(
                    x, W, b, U, S, V, indices=no_task, weights=ones))
            with torch.inference_mode():
                for op, fn in ops.items():
                    outputs = [with_gemm(g, fn)() for g in ("aten", "onednn")]
                    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)
                times = common.time_interleaved(providers, rounds, min_run_time)
            ratios = {}
            for op in ops:
                ratios[f"{op}: aten / onednn"] = common.ratio_stats(times[f"{op} aten"],
                                                                    times[f"{op} onednn"])
                ratios[f"{op}: aten / auto"] = common.ratio_stats(times[f"{op} aten"],
                                                                  times[f"{op} auto"])
            if onednn_linear is not None:
                ratios["F.linear / oneDNN linear"] = common.ratio_stats(times["F.linear"],
                                                                        times["oneDNN linear"])
                ratios["dense tiles / oneDNN linear"] = common.ratio_stats(
                    times["dense tiles"], times["oneDNN linear"])
            row = {"N": N, "d_in": d_in, "d_out": d_out, "T": T, "r": r, "rounds": rounds,
                   "median_us": {p: 1e6 * sorted(t)[len(t) // 2] for p, t in times.items()},
                   "ratios": ratios}
            rows.append(row)
            print(f"N={N} {d_in}x{d_out} T={T} r={r}: "
                  + "  ".join(f"{k} {v['median']:.2f}" for k, v in ratios.items()), flush=True)
    finally:
        if saved is None:
            os.environ.pop("MASS_EXT_CPU_GEMM", None)
        else:
            os.environ["MASS_EXT_CPU_GEMM"] = saved
    return {"machine": common.machine_info(), "backend": mass_ext.backend(),
            "date": datetime.date.today().isoformat(), "rows": rows}


def markdown(result: dict) -> str:
    names = list(result["rows"][0]["ratios"])
    lines = [
        f"CPU, float32, {common.provenance(result, 'bench_cpu_gemm.py')}. Speed-ups "
        "(time of the left over the right): medians over rounds of per-round ratios (range "
        "in brackets). Self-routed top-2, pre-routed top-1.",
        "",
        "| N | d_in x d_out | T | r | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for row in result["rows"]:
        cells = [common.ratio_cell(s) for s in row["ratios"].values()]
        lines.append(f"| {row['N']} | {row['d_in']} x {row['d_out']} | {row['T']} | {row['r']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    common.bench_main(__doc__, "cpu_gemm", "bench:gemm", run, markdown)


if __name__ == "__main__":
    main()
