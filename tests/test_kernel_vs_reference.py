"""The compiled kernels (mass_ext.route / routed_linear) against mass_ext.reference.

Every test compares: routing decisions (exactly, up to documented ties / threshold
decisions, see helpers.assert_same_routing), routing weights and residuals (close), and
outputs (against a float64 oracle with the kernel's routing, see helpers). Sizes are
awkward on purpose (1, 3, 7, 133, 769; d_out != d_in; r = 1 and r not a multiple of the
kernels' tiles; k = T); memory layouts include transposed, column-sliced and stride-0 x.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mass_ext
from mass_ext import reference

from .cases import (
    CASES,
    EXTRA_DTYPES,
    GRID_SHAPE,
    MAIN_DTYPES,
    PATTERNS,
    PREROUTED_CASES,
    SMALL_CASES,
    TEMPERATURES,
    THRESHOLDS,
    WEIGHTINGS,
    Case,
    prerouted_indices,
)
from .helpers import (
    acc_dtype,
    case_inputs,
    assert_output_matches,
    assert_routing_self_consistent,
    check_route_against_reference,
    check_routing_invariants,
    generator,
    make_layer,
    make_x,
    nearly_tied_rows,
    orthonormal_rows,
    res2_tol,
    strided_like,
)

pytestmark = pytest.mark.skipif(mass_ext.backend() != "cpp", reason="C++ extension not built")


def _check_case(case: Case, dtype, seed=0):
    x, layer = case_inputs(case, dtype, seed)
    options = dict(temperature=case.temperature, threshold=case.threshold,
                   weighting=case.weighting)
    routing, _ = check_route_against_reference(x, layer.V, case.k, **options)

    out, indices, weights = torch.ops.mass_ext.routed_linear(
        x, *layer.params, case.k, case.temperature, case.threshold, case.weighting)
    # Same projections, same routing code: the fused op decides exactly like `route`.
    assert torch.equal(indices, routing.indices)
    assert torch.equal(weights, routing.weights)
    public = mass_ext.routed_linear(x, *layer.params, case.k, **options)
    assert torch.equal(public, out)
    assert out.dtype == dtype
    assert_output_matches(out, x, layer, indices, weights)


@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_self_routed_matches_reference(case, dtype):
    _check_case(case, dtype)


MANY_ROWS_CASES = [
    # hundreds of rows over few tasks, every weighting: the large tasks' updates as GEMMs
    Case((300,), 64, 65, 3, 16, 2, "softmax", 1.0, 0.0, True, "contiguous"),
    Case((4, 75), 40, 56, 2, 12, 1, "uniform", 1.0, 0.0, False, "transposed"),
    Case((300,), 48, 40, 3, 8, 3, "renormalized", 0.5, 0.2, True, "column_slice"),
]


@pytest.mark.parametrize("dtype", MAIN_DTYPES + EXTRA_DTYPES, ids=str)
@pytest.mark.parametrize("case", MANY_ROWS_CASES, ids=str)
def test_self_routed_many_rows_match_reference(case, dtype):
    _check_case(case, dtype)


@pytest.mark.parametrize("dtype", EXTRA_DTYPES, ids=str)
@pytest.mark.parametrize("case", SMALL_CASES, ids=str)
def test_self_routed_matches_reference_extra_dtypes(case, dtype):
    _check_case(case, dtype)


@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
@pytest.mark.parametrize("weighting,threshold,temperature",
                         list(itertools.product(WEIGHTINGS, THRESHOLDS, TEMPERATURES)))
def test_routing_options_grid(weighting, threshold, temperature, dtype):
    case = Case(**GRID_SHAPE, weighting=weighting, temperature=temperature,
                threshold=threshold, bias=True, layout="contiguous")
    _check_case(case, dtype, seed=3)


def test_grid_exercises_the_threshold():
    """Guards the grid above: with its shape and seed, threshold 0.3 really drops slots
    and 0.1 drops fewer, so the threshold code path is compared, not skipped."""
    case = Case(**GRID_SHAPE, weighting="uniform", temperature=1.0, threshold=0.0, bias=True,
                layout="contiguous")
    x, layer = case_inputs(case, torch.float32, seed=3)
    dropped = {thr: int((mass_ext.route(x, layer.V, 3, threshold=thr).indices == -1).sum())
               for thr in THRESHOLDS}
    assert dropped[0.0] == 0 < dropped[0.1] < dropped[0.3] < 2 * x.shape[0]


# ------------------------------------------------------------------------ pre-routed

@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
@pytest.mark.parametrize("case", PREROUTED_CASES, ids=str)
def test_prerouted_matches_reference(case, dtype, pattern):
    lead, d_in, d_out, T, r, k, bias, layout = case
    layer = make_layer(T, r, d_in, d_out, dtype=dtype, bias=bias, seed=5)
    x = strided_like(make_x((*lead, d_in), dtype, seed=6), layout)
    g = generator(7)
    indices = prerouted_indices(pattern, lead, T, k, g)
    weights = torch.rand(*lead, k, generator=g) * 2 - 0.5  # any sign; -1 slots carry junk
    out = mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
    assert out.dtype == dtype
    assert_output_matches(out, x, layer, indices, weights)
    ref = reference.routed_linear(x, *layer.params, indices=indices, weights=weights)
    assert_output_matches(ref, x, layer, indices, weights, what="reference")


def _grouped_routing(n_rows, T, g):
    """(indices, weights) (n_rows, 2) whose rows form a few large groups sharing one task
    set and weights (one task; two tasks; the same task twice; weight 0; a negative one),
    small groups, rows with nothing selected and rows with weights of their own, shuffled:
    the kernel merges the large groups' weights (groups of >= 64 rows here)."""
    sets = [((0, -1), (1.0, 0.0)), ((2, 1), (0.75, -0.5)), ((1, 1), (0.5, 0.25)),
            ((T - 1, -1), (0.0, 0.0)), ((0, T - 1), (1.0, 1.0))]
    indices, weights = [], []
    for (tasks, w), count in zip(sets, (150, 90, 70, 64, 63)):  # 63: one row short
        indices += [tasks] * count
        weights += [w] * count
    rest = n_rows - len(indices)
    indices += [(-1, -1)] * 5 + [(3, -1)] * (rest - 5)
    weights += [(1.0, 1.0)] * 5 + [(float(i) / rest + 0.1, 0.0) for i in range(rest - 5)]
    order = torch.randperm(n_rows, generator=g)
    return torch.tensor(indices)[order], torch.tensor(weights)[order]


def _check_against_low_rank_path(out, x, layer, indices, weights, dtype):
    """The same rows with MASS_EXT_CPU_MERGE=0 (no groups: the low-rank path alone): the
    reference's values, to rounding, by another path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASS_EXT_CPU_MERGE", "0")
        low_rank = mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
    assert_output_matches(low_rank, x, layer, indices, weights)
    if dtype in (torch.float32, torch.float64):   # half precision may round both alike
        assert not torch.equal(low_rank, out)       # the other path did run


def _check_nan_rows_stay_apart(x, layer, indices, weights):
    """NaN in x or weights (set by the caller) spoils only its own row's output."""
    out = mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
    bad = x.isnan().any(-1) | weights.isnan().any(-1)
    assert bool(out[bad].isnan().any(-1).all()) and bool(out[~bad].isfinite().all())
    assert_output_matches(out[~bad], x[~bad], layer, indices[~bad], weights[~bad])


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "column_slice"])
@pytest.mark.parametrize("dtype", MAIN_DTYPES + EXTRA_DTYPES, ids=str)
def test_prerouted_large_groups_match_reference(dtype, layout):
    """Groups of rows with one task set and weights, large enough for the kernel to merge
    their weight once (W + sum w U S V, then one GEMM), next to rows it serves with the
    low-rank path: every row as the reference computes it, for any layout of x and U."""
    T, d_in, d_out = 5, 48, 40     # merging from 64 rows (the floor, above 1.5 * 22), rank >= 32
    layer = make_layer(T, 32, d_in, d_out, dtype=dtype, seed=40)
    x = strided_like(make_x((500, d_in), dtype, seed=41), layout)
    indices, weights = _grouped_routing(500, T, generator(42))
    for params in (layer.params, _strided_params(layer)):
        out = mass_ext.routed_linear(x, *params, indices=indices, weights=weights)
        assert_output_matches(out, x, layer, indices, weights)
        torch.testing.assert_close(                # each row as computed alone, unmerged
            out[:3], mass_ext.routed_linear(x[:3], *params, indices=indices[:3],
                                            weights=weights[:3]))
    _check_against_low_rank_path(out, x, layer, indices, weights, dtype)
    # A NaN row in a merged group spoils only its own output; a NaN weight is not merged.
    x = x.clone()
    x[int((indices[:, 0] == 0).nonzero()[0])] = float("nan")
    weights[int((indices[:, 0] == 2).nonzero()[0]), 0] = float("nan")
    _check_nan_rows_stay_apart(x, layer, indices, weights)


def _routing_in_runs(T, g):
    """(indices, weights) (n, 2) in runs of 8-20 equal rows, as a sample's tokens take the
    sample's decision, each run's neighbours with the same tasks and other weights: a
    group's weights (0.75, -0.5) next to (0.7, -0.5) and (0.75, -0.25), weight 0 next to
    -0 (one group), a NaN weight, nothing selected; the runs of each kind shuffled."""
    kinds = [((2, 1), (0.75, -0.5)), ((2, 1), (0.7, -0.5)), ((2, 1), (0.75, -0.25)),
             ((0, -1), (1.0, 0.0)), ((0, -1), (1.0, -0.0)), ((T - 1, 0), (1.0, float("nan"))),
             ((-1, -1), (1.0, 1.0))]
    runs = [kind for kind, count in zip(kinds, (8, 6, 6, 5, 5, 8, 3)) for _ in range(count)]
    indices, weights = [], []
    for i in torch.randperm(len(runs), generator=g).tolist():
        length = int(torch.randint(8, 21, (), generator=g))
        indices += [runs[i][0]] * length
        weights += [runs[i][1]] * length
    return torch.tensor(indices), torch.tensor(weights)


@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
def test_prerouted_groups_from_runs_of_equal_rows(dtype):
    """Rows arriving in runs that share one routing (two-pass MASS's tokens): the kernel
    groups a run with the row before it only when the indices and weights are the same;
    every row as the reference computes it, rows of the same tasks with other weights
    included."""
    T, d_in, d_out = 5, 48, 40
    layer = make_layer(T, 32, d_in, d_out, dtype=dtype, seed=60)
    indices, weights = _routing_in_runs(T, generator(61))
    x = make_x((indices.shape[0], d_in), dtype, seed=62)
    out = mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
    ok = ~weights.isnan().any(-1)
    assert bool(out[~ok].isnan().all()) and bool(out[ok].isfinite().all())
    assert_output_matches(out[ok], x[ok], layer, indices[ok], weights[ok])
    _check_against_low_rank_path(out[ok], x[ok], layer, indices[ok], weights[ok], dtype)


def _task_set_routing(n_rows, T, g):
    """(indices, weights) (n_rows >= 1300, 2): rows sharing a task set with weights of their
    own (as softmax gives), so never merged: a set in both slot orders (together above the
    kernel's 256 rows, neither alone), a task twice, one task with the other slot dropped,
    a set one row short of 256, single rows, rows with nothing selected; shuffled."""
    sets = [((0, 1), 150), ((1, 0), 140), ((2, 2), 280), ((T - 1, -1), 260), ((1, 2), 255)]
    indices = []
    for tasks, count in sets:
        indices += [tasks] * count
    indices += [(-1, -1)] * 4
    indices += [(t % T, (t + 2) % T) for t in range(n_rows - len(indices))]
    weights = torch.rand(n_rows, 2, generator=g) + 0.1
    order = torch.randperm(n_rows, generator=g)
    return torch.tensor(indices)[order], weights[order]


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", MAIN_DTYPES + EXTRA_DTYPES, ids=str)
def test_prerouted_task_set_groups_match_reference(dtype, layout):
    """Rows whose slots name the same tasks, each with weights of its own: the kernel runs
    a group of 256 or more as x W^T + b plus [w h] [U]^T per tile (the slots sorted by
    task, so (0, 1) and (1, 0) share one), the rest through the low-rank path; every row
    as the reference computes it, and as the low-rank path alone does."""
    T, d_in, d_out = 4, 40, 56
    layer = make_layer(T, 12, d_in, d_out, dtype=dtype, seed=50)
    x = strided_like(make_x((1300, d_in), dtype, seed=51), layout)
    indices, weights = _task_set_routing(1300, T, generator(52))
    for params in (layer.params, _strided_params(layer)):
        out = mass_ext.routed_linear(x, *params, indices=indices, weights=weights)
        assert_output_matches(out, x, layer, indices, weights)
    _check_against_low_rank_path(out, x, layer, indices, weights, dtype)
    x, weights = x.clone(), weights.clone()
    x[int(((indices == torch.tensor([0, 1])).all(-1)).nonzero()[0])] = float("nan")
    weights[int(((indices == torch.tensor([2, 2])).all(-1)).nonzero()[0]), 1] = float("nan")
    _check_nan_rows_stay_apart(x, layer, indices, weights)


@pytest.mark.parametrize("weights_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_prerouted_weights_in_another_dtype(weights_dtype):
    layer = make_layer(8, 16, 64, 65, seed=8)
    x = make_x((133, 64), seed=9)
    g = generator(10)
    indices = prerouted_indices("random", (133,), 8, 3, g)
    weights = torch.rand(133, 3, generator=g).to(weights_dtype)
    out = mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
    assert_output_matches(out, x, layer, indices, weights.to(torch.float32))


def test_prerouted_noncontiguous_indices_and_weights():
    layer = make_layer(8, 16, 64, 65, seed=11)
    x = make_x((133, 64), seed=12)
    g = generator(13)
    indices = prerouted_indices("random", (133,), 8, 3, g).t().contiguous().t()
    weights = torch.rand(133, 6, generator=g)[:, ::2]
    assert not indices.is_contiguous() and not weights.is_contiguous()
    out = mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
    assert_output_matches(out, x, layer, indices, weights)


def _strided_params(layer):
    """The same values, none of them contiguous (transposed storage, a strided bias)."""
    def transposed(t):
        out = t.mT.contiguous().mT
        assert not out.is_contiguous() or min(t.shape[-2:]) == 1
        return out

    bias = None
    if layer.bias is not None:
        bias = torch.zeros(2 * layer.d_out, dtype=layer.bias.dtype)[::2]
        bias.copy_(layer.bias)
    return (transposed(layer.weight), bias, transposed(layer.U), transposed(layer.S),
            transposed(layer.V))


@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
def test_noncontiguous_parameters(dtype):
    layer = make_layer(8, 16, 64, 65, dtype=dtype, seed=26)
    x = make_x((133, 64), dtype, seed=27)
    params = _strided_params(layer)
    got = check_route_against_reference(x, params[-1], 3, threshold=0.1, weighting="softmax")[0]
    assert torch.equal(got.indices, mass_ext.route(x, layer.V, 3, threshold=0.1,
                                                   weighting="softmax").indices)
    out = mass_ext.routed_linear(x, *params, 3, threshold=0.1, weighting="softmax")
    assert_output_matches(out, x, layer, got.indices, got.weights, "self-routed")
    out = mass_ext.routed_linear(x, *params, indices=got.indices, weights=got.weights)
    assert_output_matches(out, x, layer, got.indices, got.weights, "pre-routed")


def test_prerouted_all_none_is_the_base_linear_exactly():
    """Nothing selected: y = x W^T + b, the same float32 GEMM as F.linear (bitwise)."""
    layer = make_layer(8, 16, 64, 65, seed=14)
    x = make_x((133, 64), seed=15)
    indices = torch.full((133, 2), -1)
    weights = torch.rand(133, 2, generator=generator(16))
    out = mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
    assert torch.equal(out, torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("dtype", MAIN_DTYPES + EXTRA_DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    CASES[5], CASES[8], CASES[16],
    Case(**GRID_SHAPE, weighting="softmax", temperature=0.5, threshold=0.1, bias=True,
         layout="contiguous"),
], ids=str)
def test_self_routed_equals_prerouted_with_its_decision(case, dtype):
    x, layer = case_inputs(case, dtype, seed=17)
    options = dict(temperature=case.temperature, threshold=case.threshold,
                   weighting=case.weighting)
    routing = mass_ext.route(x, layer.V, case.k, **options)
    self_routed = mass_ext.routed_linear(x, *layer.params, case.k, **options)
    prerouted = mass_ext.routed_linear(x, *layer.params, indices=routing.indices,
                                       weights=routing.weights)
    # Different code paths (BLAS projections vs the packed shrink): close, not bitwise.
    assert_output_matches(self_routed, x, layer, routing.indices, routing.weights, "self-routed")
    assert_output_matches(prerouted, x, layer, routing.indices, routing.weights, "pre-routed")
    # The pre-routed form ignores the routing options.
    again = mass_ext.routed_linear(x, *layer.params, 1, temperature=9.0, threshold=0.9,
                                   weighting="uniform", indices=routing.indices,
                                   weights=routing.weights)
    assert torch.equal(again, prerouted)


# ------------------------------------------------------------------------ known routing

@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
@pytest.mark.parametrize("d_in,T,r", [(769, 8, 16), (64, 8, 16), (7, 2, 3), (769, 20, 1)])
def test_input_in_one_task_subspace_selects_it(d_in, T, r, dtype):
    layer = make_layer(T, r, d_in, 65, dtype=dtype, seed=18)
    V64 = layer.V.to(torch.float64)
    g = generator(19)
    for t in range(T):
        c = torch.randn(r, dtype=torch.float64, generator=g) * 3
        x = (V64[t].T @ c).to(dtype)  # x = V_t^T c lies in task t's subspace
        got, ref = check_route_against_reference(x, layer.V, 1)
        for routing in (got, ref):
            assert routing.indices.tolist() == [t]
        # x rounded to a low precision leaves the subspace a little: bound the kernel's
        # residual by the exact one of the rounded values plus the residual tolerance.
        exact = reference.route(x.double(), layer.V.double()).residuals[t]
        x_norm = float(x.double().norm())
        assert float(exact) <= 0.01 * x_norm
        own = float(got.residuals[t])
        assert own**2 <= float(exact**2 + res2_tol(x, layer.V)[t]), (t, got.residuals)
        others = torch.cat([got.residuals[:t], got.residuals[t + 1:]])
        assert bool((others >= 0.3 * x_norm).all()), (t, got.residuals)
        out = mass_ext.routed_linear(x, *layer.params)
        assert_output_matches(out, x, layer, got.indices, got.weights)


@pytest.mark.parametrize("top_k,threshold", [(1, 0.0), (2, 0.0), (3, 0.2)])
@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
def test_mixed_batch_rows_go_to_their_task(dtype, top_k, threshold):
    """Row n lies near task t_n's subspace (norms from 1e-3 to 1e3): its first choice is
    t_n, for the kernel and the reference, and the output uses t_n's update."""
    T, r, d_in, N = 8, 16, 769, 133
    layer = make_layer(T, r, d_in, 300, dtype=dtype, seed=20)
    V64 = layer.V.to(torch.float64)
    g = generator(21)
    tasks = torch.randint(0, T, (N,), generator=g)
    tasks[:T] = torch.arange(T)  # every task at least once
    coeff = torch.randn(N, r, dtype=torch.float64, generator=g)
    x = torch.einsum("nr,nri->ni", coeff, V64[tasks])
    x = x + 0.05 * torch.randn(N, d_in, dtype=torch.float64, generator=g) / d_in**0.5
    x = (x * 10 ** (torch.rand(N, 1, generator=g, dtype=torch.float64) * 6 - 3)).to(dtype)
    got, ref = check_route_against_reference(x, layer.V, top_k, threshold=threshold,
                                             weighting="softmax")
    assert torch.equal(got.indices[:, 0], tasks)
    assert torch.equal(ref.indices[:, 0], tasks)
    out = mass_ext.routed_linear(x, *layer.params, top_k, threshold=threshold,
                                 weighting="softmax")
    assert_output_matches(out, x, layer, got.indices, got.weights)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("pair", [(0, 1), (1, 3), (2, 4)])
@pytest.mark.parametrize("dtype", MAIN_DTYPES + EXTRA_DTYPES, ids=str)
def test_exact_tie_selects_the_lower_index_first(pair, dtype, impl):
    """Tasks a < b with identical V (rows e_0..e_{r-1}: every projection is exact, so the
    residuals tie bitwise): a comes first, then b; the kernel and the reference agree."""
    a, b = pair
    T, r, d_in = 5, 4, 64
    g = generator(22)
    V = orthonormal_rows(T, r, d_in, seed=22)
    V[a] = V[b] = torch.eye(r, d_in, dtype=torch.float64)
    layer = make_layer(T, r, d_in, 65, dtype=dtype, seed=23, V=V)
    x = torch.randn(6, d_in, dtype=torch.float64, generator=g) * 0.01
    x[:, :r] = torch.randn(6, r, dtype=torch.float64, generator=g) * 3
    x = x.to(dtype)
    route = mass_ext.route if impl == "kernel" else reference.route
    for top_k in (1, 2, 3):
        routing = route(x, layer.V, top_k, weighting="softmax")
        assert torch.equal(routing.residuals[:, a], routing.residuals[:, b])
        assert routing.indices[:, 0].tolist() == [a] * 6
        if top_k >= 2:
            assert routing.indices[:, 1].tolist() == [b] * 6
            assert torch.equal(routing.weights[:, 0], routing.weights[:, 1])


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("T", [2, 5, 8])
def test_nearly_tied_large_residuals_weigh_as_in_float64(T, impl):
    """Residuals ~26 that differ by 1e-4..1e-6 of their size: the float32 softmax weights
    are those float64 gives for the same residuals, to 1e-5 relative (a plain float32
    variance was off by up to 40% on such rows; found on the GPU, 2026-11-30)."""
    x, V = nearly_tied_rows(T, 256, seed=80)
    route = mass_ext.route if impl == "kernel" else reference.route
    for top_k in (1, 2):
        routing = route(x, V, top_k, weighting="softmax")
        assert_routing_self_consistent(routing, top_k, weighting="softmax")


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype", MAIN_DTYPES + EXTRA_DTYPES, ids=str)
def test_zero_rows_tie_every_task(dtype, weighting):
    """x = 0: every residual is 0, p is uniform, the tasks come in index order."""
    T, k = 8, 3
    layer = make_layer(T, 16, 64, 65, dtype=dtype, seed=24)
    x = torch.zeros(4, 64, dtype=dtype)
    for route in (mass_ext.route, reference.route):
        routing = route(x, layer.V, k, threshold=0.1, weighting=weighting)
        assert routing.indices.tolist() == [[0, 1, 2]] * 4
        assert bool((routing.residuals == 0).all())
        expected = {"uniform": 1.0, "softmax": 1.0 / T, "renormalized": 1.0 / k}[weighting]
        torch.testing.assert_close(routing.weights, torch.full((4, k), expected,
                                   dtype=acc_dtype(dtype)))
    out = mass_ext.routed_linear(x, *layer.params, k, threshold=0.1, weighting=weighting)
    expected_out = torch.zeros(4, 65, dtype=dtype) + layer.bias
    assert torch.equal(out, expected_out)


def test_non_finite_row_leaves_other_rows_alone():
    layer = make_layer(8, 16, 64, 65, seed=25)
    x = make_x((6, 64), seed=26)
    x[1, 3] = float("inf")
    x[4, 0] = float("nan")
    finite = torch.tensor([0, 2, 3, 5])
    got = mass_ext.route(x, layer.V, 3, threshold=0.1)
    check_routing_invariants(got.indices, got.weights, 8, 3, "uniform")
    check_route_against_reference(x[finite], layer.V, 3, threshold=0.1)
    ref = reference.route(x[finite], layer.V, 3, threshold=0.1)
    assert torch.equal(got.indices[finite], ref.indices)
    out = mass_ext.routed_linear(x, *layer.params, 3, threshold=0.1)
    assert bool(out[finite].isfinite().all())
    assert_output_matches(out[finite], x[finite], layer, got.indices[finite], got.weights[finite])


def test_non_finite_row_matches_reference():
    # Defined behaviour: a row holding inf/nan gets NaN residuals, ranks its tasks by id
    # (ties) and keeps only the first slot (p is NaN, and a slot is kept iff p > threshold).
    layer = make_layer(8, 16, 64, 65, seed=25)
    x = make_x((2, 64), seed=26)
    x[0, 3] = float("inf")
    x[1, 0] = float("nan")
    got = mass_ext.route(x, layer.V, 3, threshold=0.1)
    ref = reference.route(x, layer.V, 3, threshold=0.1)
    assert torch.equal(got.residuals.isnan(), ref.residuals.isnan())
    assert torch.equal(got.indices, ref.indices)
    assert torch.equal(got.weights, ref.weights)


# ------------------------------------------------------------------------ property test

@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n=st.integers(0, 20), d_in=st.integers(1, 40), d_out=st.integers(1, 40),
    T=st.integers(1, 6), r_frac=st.floats(0.0, 1.0), k_frac=st.floats(0.0, 1.0),
    weighting=st.sampled_from(WEIGHTINGS), temperature=st.sampled_from([0.25, 1.0, 4.0]),
    threshold=st.sampled_from([-1.0, 0.0, 0.15, 0.5]), seed=st.integers(0, 2**16),
)
def test_random_small_shapes_match_reference(n, d_in, d_out, T, r_frac, k_frac, weighting,
                                             temperature, threshold, seed):
    # r < d_in (or d_in = 1): at r = d_in every residual is 0 up to rounding, the
    # standardised logits are pure noise and p is not reproducible by design.
    r = 1 + int(r_frac * max(d_in - 2, 0))
    k = 1 + int(k_frac * (T - 1))
    case = Case((n,), d_in, d_out, T, r, k, weighting, temperature, threshold, True,
                "contiguous")
    _check_case(case, torch.float32, seed=seed)


# ------------------------------------------------- column-major U (the expand's fast layout)

@pytest.mark.parametrize("dtype", MAIN_DTYPES + EXTRA_DTYPES, ids=str)
@pytest.mark.parametrize("n, d_out, T, r, k", [
    (1, 1, 2, 3, 1), (7, 15, 3, 5, 2), (7, 16, 3, 5, 3), (133, 17, 8, 16, 2),
    (133, 300, 20, 7, 4), (40, 48, 1, 1, 1),
])
def test_column_major_U_matches_reference(n, d_out, T, r, k, dtype):
    """U given as U.transpose(1, 2) contiguous takes the outer-product expand: full
    16-column tiles, a column tail, 1..6-row tiles, every dtype."""
    layer = make_layer(T, r, 33, d_out, dtype=dtype, seed=40 + n)
    x = make_x((n, 33), dtype, seed=41)
    U_column_major = layer.U.transpose(1, 2).contiguous().transpose(1, 2)
    params = list(layer.params)
    params[2] = U_column_major
    routing = mass_ext.route(x, layer.V, k, weighting="softmax")
    out = mass_ext.routed_linear(x, *params, k, weighting="softmax")
    assert_output_matches(out, x, layer, routing.indices, routing.weights, "self-routed")
    indices = torch.randint(-1, T, (n, k), generator=generator(42))
    weights = torch.rand(n, k, generator=generator(43))
    out = mass_ext.routed_linear(x, *params, indices=indices, weights=weights)
    assert_output_matches(out, x, layer, indices, weights, "pre-routed")
