"""The test grid shared by the kernel tests of every device (test_kernel_vs_reference.py on
the CPU, test_cuda.py on CUDA): curated awkward shapes, routing options and pre-routed
index patterns. No test-only dependencies (the GPU machine has pytest and torch only)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Case(NamedTuple):
    lead: tuple  # leading dims of x
    d_in: int
    d_out: int
    T: int
    r: int
    k: int
    weighting: str
    temperature: float
    threshold: float
    bias: bool
    layout: str  # see helpers.strided_like

    def __str__(self):
        return (f"lead{list(self.lead)}-din{self.d_in}-dout{self.d_out}-T{self.T}-r{self.r}"
                f"-k{self.k}-{self.weighting}-temp{self.temperature}-thr{self.threshold}"
                f"-{'bias' if self.bias else 'nobias'}-{self.layout}")


# Curated, not a Cartesian product: each line covers several awkward values at once.
CASES = [
    Case((0,), 64, 65, 8, 16, 3, "softmax", 1.0, 0.1, True, "contiguous"),
    Case((2, 0), 7, 300, 2, 3, 2, "uniform", 1.0, 0.0, False, "contiguous"),
    Case((1,), 769, 300, 20, 96, 20, "renormalized", 0.5, 0.0, True, "contiguous"),
    Case((1,), 64, 65, 2, 3, 1, "softmax", 3.0, 0.3, False, "expand"),
    Case((3,), 7, 65, 2, 3, 2, "uniform", 3.0, 0.3, False, "transposed"),
    Case((3,), 769, 65, 20, 96, 20, "renormalized", 0.5, 0.3, True, "column_slice"),
    Case((3,), 64, 300, 8, 16, 8, "softmax", 1.0, 0.1, True, "contiguous"),
    Case((133,), 769, 65, 8, 96, 1, "uniform", 1.0, 0.0, True, "column_slice"),
    Case((133,), 64, 300, 20, 16, 5, "softmax", 0.5, 0.1, True, "expand"),
    Case((133,), 64, 65, 1, 16, 1, "softmax", 1.0, 0.3, True, "contiguous"),
    Case((3,), 7, 300, 1, 1, 1, "renormalized", 3.0, 0.1, False, "transposed"),
    Case((133,), 769, 65, 20, 1, 20, "softmax", 3.0, 0.0, True, "contiguous"),
    Case((133,), 7, 300, 8, 3, 8, "uniform", 1.0, 0.1, True, "contiguous"),
    Case((133,), 64, 65, 2, 16, 2, "renormalized", 3.0, 0.3, True, "transposed"),
    Case((133,), 769, 300, 2, 96, 2, "softmax", 1.0, 0.0, False, "transposed"),
    Case((133,), 7, 65, 20, 3, 4, "renormalized", 1.0, 0.1, True, "column_slice"),
    Case((2, 3), 64, 65, 8, 16, 3, "renormalized", 1.0, 0.1, True, "contiguous"),
    Case((2, 3), 769, 300, 2, 96, 1, "uniform", 1.0, 0.0, False, "transposed"),
    Case((2, 3), 7, 65, 8, 3, 2, "softmax", 0.5, 0.3, True, "column_slice"),
    Case((2, 3), 64, 300, 20, 16, 7, "uniform", 0.5, 0.1, True, "expand"),
    Case((), 64, 65, 8, 16, 2, "softmax", 1.0, 0.1, True, "contiguous"),
    Case((), 769, 300, 20, 96, 20, "uniform", 3.0, 0.0, False, "contiguous"),
    Case((7, 19), 64, 65, 8, 16, 3, "softmax", 1.0, 0.0, True, "transposed"),
    Case((133,), 769, 1, 3, 20, 2, "softmax", 1.0, 0.1, True, "contiguous"),
    Case((3,), 7, 5, 8, 3, 3, "renormalized", 0.5, 0.1, False, "column_slice"),
    # d_out and r whole 16-byte vectors of every dtype: the CUDA kernels' vector branches.
    Case((133,), 64, 72, 8, 16, 2, "softmax", 1.0, 0.1, True, "contiguous"),
]

# float64 and float16 on a smaller grid.
SMALL_CASES = [
    Case((3,), 7, 65, 2, 3, 2, "uniform", 3.0, 0.3, False, "transposed"),
    Case((133,), 769, 65, 8, 96, 3, "softmax", 1.0, 0.1, True, "column_slice"),
    Case((133,), 64, 300, 20, 16, 20, "renormalized", 0.5, 0.0, True, "expand"),
    Case((2, 3), 64, 65, 8, 16, 3, "renormalized", 1.0, 0.1, True, "contiguous"),
    Case((0,), 64, 65, 8, 16, 3, "softmax", 1.0, 0.1, True, "contiguous"),
]

MAIN_DTYPES = [torch.float32, torch.bfloat16]
EXTRA_DTYPES = [torch.float64, torch.float16]

# The full grid of routing options on one mid-size shape.
GRID_SHAPE = dict(lead=(133,), d_in=64, d_out=65, T=8, r=16, k=3)
WEIGHTINGS = ["uniform", "softmax", "renormalized"]
THRESHOLDS = [0.0, 0.1, 0.3]
TEMPERATURES = [0.5, 1.0, 3.0]



# ------------------------------------------------------------------------ pre-routed

PREROUTED_CASES = [
    # (lead, d_in, d_out, T, r, k, bias, layout)
    ((1,), 769, 300, 20, 96, 2, True, "contiguous"),
    ((3,), 7, 65, 2, 3, 3, False, "transposed"),
    ((133,), 64, 65, 8, 16, 3, True, "column_slice"),
    ((133,), 769, 300, 2, 96, 4, True, "contiguous"),
    ((2, 3), 64, 300, 20, 1, 2, True, "expand"),
    ((0,), 64, 65, 8, 16, 2, True, "contiguous"),
    ((), 64, 65, 8, 16, 3, False, "contiguous"),
    ((133,), 769, 1, 3, 20, 3, True, "transposed"),
    ((3,), 7, 5, 8, 3, 2, False, "column_slice"),
    ((133,), 64, 72, 8, 16, 2, True, "contiguous"),
]
PATTERNS = ["random", "all_none_rows", "duplicates", "one_task", "skewed"]


def prerouted_indices(pattern, lead, T, k, g):
    """(lead..., k) int64 task ids (-1 = none) following one routing pattern."""
    n = 1
    for s in lead:
        n *= s
    if pattern == "random":  # -1 in any slot, slot 0 included, about 1 in 4
        idx = torch.randint(0, T, (n, k), generator=g)
        idx[torch.rand(n, k, generator=g) < 0.25] = -1
    elif pattern == "all_none_rows":  # every other row selects nothing
        idx = torch.randint(0, T, (n, k), generator=g)
        idx[::2] = -1
    elif pattern == "duplicates":  # the same task twice in one row
        idx = torch.randint(0, T, (n, k), generator=g)
        idx[:, -1] = idx[:, 0]
    elif pattern == "one_task":  # every row the same task: one long group
        idx = torch.full((n, k), T - 1)
        idx[:, 1:] = -1
    elif pattern == "skewed":  # most rows task 0, a few others
        idx = torch.where(torch.rand(n, k, generator=g) < 0.8, 0,
                          torch.randint(0, T, (n, k), generator=g))
    else:
        raise ValueError(pattern)
    return idx.reshape(*lead, k)
