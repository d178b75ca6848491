"""More than 2^31 output elements: every offset past int32 is computed in 64 bits.

Slow (about 2 minutes and 10 GB of memory on 2 cores: 111 s, peak RSS 9.8 GB, measured):
skipped unless MASS_EXT_SLOW_TESTS=1.

The layer is chosen so that every product and sum is exact in float32 (dyadic weights,
small-integer x, V the unit vectors): the whole output, all 2^31+ elements, is then
compared bitwise with the expected values, built per block of rows from the few distinct
rows of x. A wrapped 32-bit offset would write a row into the wrong place (or out of
bounds) and show up as a mismatch (or a crash).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import mass_ext

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MASS_EXT_SLOW_TESTS") != "1",
                       reason="slow (~2 min, 10 GB): set MASS_EXT_SLOW_TESTS=1"),
    pytest.mark.skipif(mass_ext.backend() != "cpp", reason="C++ extension not built"),
]

T, R, K = 4, 2, 2
D_IN = T * R
D_OUT = 257  # not a multiple of any tile width
N = 2**23 + 3  # N * D_OUT = 2_155_873_027 > 2^31 = 2_147_483_648
BLOCK = 1 << 16  # rows compared at a time


def layer():
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-8, 9, (D_OUT, D_IN), generator=g).float() / 8
    bias = torch.randint(-8, 9, (D_OUT,), generator=g).float() / 8
    U = torch.randint(-8, 9, (T, D_OUT, R), generator=g).float() / 8
    S = torch.randint(1, 5, (T, R), generator=g).float() / 2
    # V_t = (e_{2t}, e_{2t+1}): z_t = x[2t:2t+2], res_t^2 = ||x||^2 - ||x[2t:2t+2]||^2.
    V = torch.eye(D_IN).reshape(T, R, D_IN)
    return weight, bias, U, S, V


def patterns():
    """Rows (a_0, b_0, a_1, b_1, ...), a = a signed permutation of (1, 2, 3, 4) and
    b = +-1/2: task t's projection is (a_t, b_t), so the two tasks with the largest |a_t|
    (the smallest residuals) are known exactly and never tie."""
    rows = []
    for i, (perm, signs) in enumerate(itertools.product(itertools.permutations((1, 2, 3, 4)),
                                                        itertools.product((1, -1), repeat=4))):
        a = torch.tensor(perm, dtype=torch.float32) * torch.tensor(signs, dtype=torch.float32)
        b = torch.tensor([(-1) ** (i >> j) / 2 for j in range(T)], dtype=torch.float32)
        rows.append(torch.stack([a, b], dim=1).reshape(D_IN))
    return torch.stack(rows)  # (384, D_IN)


def test_more_than_2_31_output_elements():
    weight, bias, U, S, V = layer()
    P = patterns()
    x = P.repeat((N + len(P) - 1) // len(P), 1)[:N]  # row n is pattern n % 384
    assert N * D_OUT > 2**31

    # Expected, per pattern: top-2 tasks by |x_t| (uniform weights, both slots kept).
    z = P.reshape(-1, T, R)                                         # (384, T, R)
    top = z.square().sum(-1).argsort(dim=1, descending=True, stable=True)[:, :K]
    expected = P @ weight.T + bias
    for j in range(K):
        t = top[:, j]
        h = S[t] * z[torch.arange(len(P)), t]                       # (384, R)
        expected += torch.einsum("pr,por->po", h, U[t])

    def check(out, what):
        assert out.shape == (N, D_OUT) and out.dtype == torch.float32
        for start in range(0, N, BLOCK):
            rows = torch.arange(start, min(start + BLOCK, N)) % len(P)
            assert torch.equal(out[start:start + BLOCK], expected[rows]), (
                f"{what}: rows {start}..{start + BLOCK} differ from the exact values")

    out, indices, weights = torch.ops.mass_ext.routed_linear(
        x, weight, bias, U, S, V, K, 1.0, 0.0, "uniform")
    assert torch.equal(indices[: len(P)], top) and bool((weights == 1).all())
    for start in range(0, N, BLOCK):
        rows = torch.arange(start, min(start + BLOCK, N)) % len(P)
        assert torch.equal(indices[start:start + BLOCK], top[rows])
    check(out, "self-routed")
    del out
    # (Rank R * K = 4: below the CPU op's merged groups, every row takes the low-rank path.)
    out = mass_ext.routed_linear(x, weight, bias, U, S, V, indices=indices, weights=weights)
    check(out, "pre-routed")
    del out
    # The expand's other layout: each U_t stored column-major.
    U_column_major = U.transpose(1, 2).contiguous().transpose(1, 2)
    out = mass_ext.routed_linear(x, weight, bias, U_column_major, S, V, indices=indices,
                                 weights=weights)
    check(out, "pre-routed, column-major U")
