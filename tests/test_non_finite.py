"""Non-finite rows: a NaN or inf in one row of x never changes any other row's routing or
output, in all three ops; the bad row itself behaves as the README documents ("Details
that matter"): NaN residuals, the tasks ranked by id (all tied), only the first slot kept,
weight 1 (uniform) or NaN (softmax, renormalized; 1 when T = 1), and an output with no
finite element (all NaN for a NaN row). The same holds for a finite row whose norm is
past the largest float ("beyond": its own routing is only promised to be valid), and for
NaN / inf routing weights in the pre-routed form.

"Unchanged" is bitwise: the batch with the bad row is compared with the same batch where
that row is clean (same shapes, so the same BLAS kernels; BLAS rounds by shape, so a batch
without the row can differ in the last bits, see the README). Against the batch without
the row, the other rows are checked against the reference and the float64 oracle.
"""
from __future__ import annotations

import pytest
import torch

import mass_ext
from mass_ext import reference

from .helpers import (
    assert_output_matches,
    check_route_against_reference,
    check_routing_invariants,
    generator,
    make_layer,
    make_x,
)

pytestmark = pytest.mark.skipif(mass_ext.backend() != "cpp", reason="C++ extension not built")

N, D_IN, D_OUT, T, R, K = 7, 64, 65, 8, 16, 3
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
WEIGHTINGS = ["uniform", "softmax", "renormalized"]
NAN, INF = float("nan"), float("inf")


def corrupt(row: torch.Tensor, kind: str) -> None:
    """Makes one row of x non-finite (or finite past the largest norm), in place."""
    if kind == "nan":
        row[3] = NAN
    elif kind == "inf":
        row[3] = INF
    elif kind == "-inf":
        row[0] = -INF
    elif kind == "mixed":  # inf - inf inside every dot product
        row[0], row[5], row[9] = INF, -INF, NAN
    elif kind == "all_nan":
        row.fill_(NAN)
    elif kind == "all_inf":
        row.fill_(INF)
    elif kind == "beyond":  # finite, but ||x||^2 and the dot products overflow
        row.fill_(torch.finfo(row.dtype).max / 2)
    else:
        raise ValueError(kind)


BAD_KINDS = ["nan", "inf", "-inf", "mixed", "all_nan", "all_inf", "beyond"]
NON_FINITE = BAD_KINDS[:-1]
POSITIONS = [0, 3, N - 1]


def batches(dtype, kind, bad, seed=0):
    """(clean x, x with row `bad` corrupted), float rows of unit scale, shape (N, D_IN)."""
    clean = make_x((N, D_IN), dtype, seed=seed + 1)
    dirty = clean.clone()
    corrupt(dirty[bad], kind)
    return clean, dirty


def same_bits(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def assert_other_rows_bitwise(clean_outputs, dirty_outputs, bad, names):
    others = torch.tensor([i for i in range(N) if i != bad])
    for name, a, b in zip(names, clean_outputs, dirty_outputs):
        assert a.shape == b.shape, name
        assert torch.equal(a[others], b[others]), f"{name}: a bad row {bad} changed other rows"


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("bad", POSITIONS)
@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bad_row_leaves_other_rows_bitwise_unchanged(dtype, kind, bad, weighting):
    layer = make_layer(T, R, D_IN, D_OUT, dtype=dtype, seed=2)
    clean, dirty = batches(dtype, kind, bad)
    options = dict(temperature=0.5, threshold=0.05, weighting=weighting)
    names = ("indices", "weights", "residuals")
    assert_other_rows_bitwise(mass_ext.route(clean, layer.V, K, **options),
                              mass_ext.route(dirty, layer.V, K, **options), bad, names)
    op = torch.ops.mass_ext.routed_linear
    fused = [op(x, *layer.params, K, 0.5, 0.05, weighting) for x in (clean, dirty)]
    assert_other_rows_bitwise(fused[0], fused[1], bad, ("out",) + names[:2])
    g = generator(3)
    indices = torch.randint(-1, T, (N, K), generator=g)
    weights = torch.rand(N, K, generator=g)
    pre = [mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
           for x in (clean, dirty)]
    assert_other_rows_bitwise([pre[0]], [pre[1]], bad, ("pre-routed out",))


@pytest.mark.parametrize("bad", POSITIONS)
@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_other_rows_match_the_batch_without_the_bad_row(dtype, kind, bad):
    """The other rows against the reference run without the bad row, and their outputs
    against the float64 oracle: right, not merely unchanged."""
    layer = make_layer(T, R, D_IN, D_OUT, dtype=dtype, seed=4)
    _, dirty = batches(dtype, kind, bad, seed=4)
    others = torch.tensor([i for i in range(N) if i != bad])
    options = dict(temperature=0.5, threshold=0.05, weighting="softmax")
    got = mass_ext.route(dirty, layer.V, K, **options)
    check_route_against_reference(dirty[others], layer.V, K, **options,
                                  got=type(got)(*(t[others] for t in got)))
    out = mass_ext.routed_linear(dirty, *layer.params, K, **options)
    assert bool(out[others].isfinite().all())
    assert_output_matches(out[others], dirty[others], layer, got.indices[others],
                          got.weights[others])
    g = generator(5)
    indices = torch.randint(-1, T, (N, K), generator=g)
    weights = torch.rand(N, K, generator=g)
    out = mass_ext.routed_linear(dirty, *layer.params, indices=indices, weights=weights)
    assert_output_matches(out[others], dirty[others], layer, indices[others], weights[others])


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.3])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("kind", NON_FINITE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_row_defined_behaviour(dtype, kind, weighting, threshold, impl):
    layer = make_layer(T, R, D_IN, D_OUT, dtype=dtype, seed=6)
    _, dirty = batches(dtype, kind, 2, seed=6)
    module = mass_ext if impl == "kernel" else reference
    got = module.route(dirty, layer.V, K, threshold=threshold, weighting=weighting)
    check_routing_invariants(got.indices[:2], got.weights[:2], T, K, weighting)
    assert bool(got.residuals[2].isnan().all()), got.residuals[2]
    # All tied: task 0 first; p is NaN, and a slot is kept only if p > threshold.
    assert got.indices[2].tolist() == [0] + [-1] * (K - 1)
    first = got.weights[2, 0]
    assert bool(first == 1) if weighting == "uniform" else bool(first.isnan()), got.weights[2]
    assert bool((got.weights[2, 1:] == 0).all())

    out = module.routed_linear(dirty, *layer.params, K, threshold=threshold,
                               weighting=weighting)
    assert not bool(out[2].isfinite().any()), out[2]
    if kind in ("nan", "mixed", "all_nan"):
        assert bool(out[2].isnan().all()), out[2]
    if impl == "kernel":
        assert same_bits(torch.ops.mass_ext.routed_linear(
            dirty, *layer.params, K, 1.0, threshold, weighting)[1][2], got.indices[2])


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_non_finite_row_with_one_task(weighting, impl):
    """T = 1: p = [1] by definition, so even a NaN row keeps weight 1."""
    layer = make_layer(1, R, D_IN, D_OUT, seed=7)
    _, dirty = batches(torch.float32, "nan", 1, seed=7)
    got = (mass_ext if impl == "kernel" else reference).route(dirty, layer.V, 1,
                                                              weighting=weighting)
    assert bool(got.residuals[1].isnan().all())
    assert got.indices[:, 0].tolist() == [0] * N
    assert bool((got.weights == 1).all()), got.weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_beyond_the_largest_norm_gets_a_valid_routing(dtype):
    layer = make_layer(T, R, D_IN, D_OUT, dtype=dtype, seed=8)
    _, dirty = batches(dtype, "beyond", 4, seed=8)
    for module in (mass_ext, reference):
        got = module.route(dirty, layer.V, K, threshold=0.05, weighting="uniform")
        check_routing_invariants(got.indices, got.weights, T, K, "uniform")


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_prerouted_bad_weight_stays_in_its_row(dtype, value):
    """A NaN / inf routing weight spoils its own row only; on a dropped slot (index -1)
    it is ignored: that row's output is bitwise the one with weight 0 there."""
    layer = make_layer(T, R, D_IN, D_OUT, dtype=dtype, seed=9)
    x = make_x((N, D_IN), dtype, seed=10)
    g = generator(11)
    indices = torch.randint(0, T, (N, K), generator=g)
    indices[5, 1] = -1
    weights = torch.rand(N, K, generator=g)
    for module in (mass_ext, reference):
        base = module.routed_linear(x, *layer.params, indices=indices, weights=weights)
        bad = weights.clone()
        bad[2, 0] = value  # a kept slot: row 2 only
        bad[5, 1] = value  # a dropped slot: ignored
        out = module.routed_linear(x, *layer.params, indices=indices, weights=bad)
        others = torch.tensor([0, 1, 3, 4, 5, 6])
        assert torch.equal(out[others], base[others])
        assert not bool(out[2].isfinite().any()), out[2]
