"""The CUDA kernels against the reference (on the CPU, float64 oracle), as
test_kernel_vs_reference.py does for the CPU kernel, plus what only CUDA has: both kernel
paths on the same shapes, CUDA-graph capture and replay with routing that changes, the
current stream, a non-default device, opcheck and torch.compile on CUDA tensors.

Skipped without a GPU. Needs torch and pytest only (the GPU machine has no hypothesis).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

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
    Case,
    prerouted_indices,
)
from .helpers import (
    case_inputs,
    Layer,
    assert_output_matches,
    assert_routing_self_consistent,
    check_route_against_reference,
    check_routing_invariants,
    generator,
    make_layer,
    make_x,
    nearly_tied_rows,
    strided_like,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

OPS = torch.ops.mass_ext
DEV = "cuda"

# The CUDA paths (csrc/cuda/routed_linear_cuda.cu), forced through the thresholds, so
# that every shape runs through each: "decode" = the selected-tasks path with `project`
# for the dense part (project, route or shrink, the per-slot expand), "tiled" = cuBLAS
# and the selected-tasks expand by blocks of rows, "large" = cuBLAS GEMMs and the dense
# expand. "default" takes the thresholds of launchers.h.
PATHS = {
    "default": {},
    "decode": {"MASS_EXT_CUDA_PROJECT_MAX_ROWS": "1000000",
               "MASS_EXT_CUDA_SELECTED_MAX_ROWS": "1000000",
               "MASS_EXT_CUDA_SLOT_EXPAND_MAX_ROWS": "1000000"},
    "tiled": {"MASS_EXT_CUDA_PROJECT_MAX_ROWS": "0", "MASS_EXT_CUDA_SELECTED_MAX_ROWS": "1000000",
              "MASS_EXT_CUDA_SLOT_EXPAND_MAX_ROWS": "0"},
    "large": {"MASS_EXT_CUDA_PROJECT_MAX_ROWS": "0", "MASS_EXT_CUDA_SELECTED_MAX_ROWS": "0"},
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    for name, value in PATHS[request.param].items():
        monkeypatch.setenv(name, value)
    return request.param


def to_cuda(t, device=DEV):
    """Same values, strides and storage offset on the GPU (strided_like layouts survive)."""
    if t is None:
        return None
    if t.numel() == 0:
        return t.to(device)
    # The whole storage, copied as one flat tensor, then viewed like t.
    flat = torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    return flat.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


def cuda_params(layer: Layer, device=DEV):
    return [to_cuda(t, device) for t in layer.params]


def test_cuda_kernels_are_compiled():
    """With a GPU, the CUDA kernels must be the compiled ones, not the Python reference
    that mass_ext/ops.py registers for CUDA when the build has none."""
    assert mass_ext.backend("cuda") == "cuda", "mass_ext._C was built without CUDA kernels"


def test_to_cuda_keeps_layout():
    x = strided_like(make_x((3, 7)), "column_slice")
    y = to_cuda(x)
    assert y.stride() == x.stride() and torch.equal(y.cpu(), x)
    x = strided_like(make_x((4, 7)), "expand")
    y = to_cuda(x)
    assert y.stride() == x.stride() and torch.equal(y.cpu(), x)


# ------------------------------------------------------------------------ vs reference

def _check_case(case: Case, dtype, seed=0):
    x, layer = case_inputs(case, dtype, seed)
    xc, params = to_cuda(x), cuda_params(layer)
    options = dict(temperature=case.temperature, threshold=case.threshold,
                   weighting=case.weighting)
    got = mass_ext.route(xc, params[-1], case.k, **options)
    assert got.indices.is_cuda and got.residuals.is_cuda
    got = type(got)(*(t.cpu() for t in got))
    routing, _ = check_route_against_reference(x, layer.V, case.k, got=got, **options)

    out, indices, weights = OPS.routed_linear(
        xc, *params, case.k, case.temperature, case.threshold, case.weighting)
    assert out.is_cuda and out.dtype == dtype
    # Same projections, same routing kernel: the fused op decides exactly like `route`.
    assert torch.equal(indices.cpu(), routing.indices)
    assert torch.equal(weights.cpu(), routing.weights)
    again = mass_ext.routed_linear(xc, *params, case.k, **options)
    assert torch.equal(again, out), "repeated calls must be bitwise identical"
    assert_output_matches(out.cpu(), x, layer, routing.indices, routing.weights)

    # The pre-routed form with that decision.
    pre = mass_ext.routed_linear(xc, *params, indices=indices, weights=weights)
    assert_output_matches(pre.cpu(), x, layer, routing.indices, routing.weights, "pre-routed")
    if os.environ.get("MASS_EXT_CUDA_SELECTED_MAX_ROWS") == "0":
        # Dense path: `route` writes H for the self-routed op, `dense_h` for the pre-routed
        # one, from the same z and decision: the same bits.
        assert torch.equal(pre, out)


@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_self_routed_matches_reference(case, dtype, path):
    _check_case(case, dtype)


@pytest.mark.parametrize("dtype", EXTRA_DTYPES, ids=str)
@pytest.mark.parametrize("case", SMALL_CASES, ids=str)
def test_self_routed_matches_reference_extra_dtypes(case, dtype, path):
    _check_case(case, dtype)


@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
@pytest.mark.parametrize("weighting,threshold,temperature", [
    ("uniform", 0.0, 1.0), ("softmax", 0.1, 0.5), ("renormalized", 0.3, 3.0),
    ("renormalized", 0.1, 1.0), ("softmax", 0.3, 3.0),
])
def test_routing_options(weighting, threshold, temperature, dtype, path):
    case = Case(**GRID_SHAPE, weighting=weighting, temperature=temperature,
                threshold=threshold, bias=True, layout="contiguous")
    _check_case(case, dtype, seed=3)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
@pytest.mark.parametrize("case", PREROUTED_CASES, ids=str)
def test_prerouted_matches_reference(case, dtype, pattern, path):
    lead, d_in, d_out, T, r, k, bias, layout = case
    layer = make_layer(T, r, d_in, d_out, dtype=dtype, bias=bias, seed=5)
    x = strided_like(make_x((*lead, d_in), dtype, seed=6), layout)
    g = generator(7)
    indices = prerouted_indices(pattern, lead, T, k, g)
    weights = torch.rand(*lead, k, generator=g) * 2 - 0.5  # any sign; -1 slots carry junk
    out = mass_ext.routed_linear(to_cuda(x), *cuda_params(layer), indices=indices.to(DEV),
                                 weights=weights.to(DEV))
    assert out.is_cuda and out.dtype == dtype
    assert_output_matches(out.cpu(), x, layer, indices, weights)


@pytest.mark.parametrize("weights_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_prerouted_weights_in_another_dtype(weights_dtype, path):
    layer = make_layer(8, 16, 64, 65, seed=8)
    x = make_x((133, 64), seed=9)
    g = generator(10)
    indices = prerouted_indices("random", (133,), 8, 3, g)
    weights = torch.rand(133, 3, generator=g).to(weights_dtype)
    out = mass_ext.routed_linear(to_cuda(x), *cuda_params(layer), indices=indices.to(DEV),
                                 weights=weights.to(DEV))
    assert_output_matches(out.cpu(), x, layer, indices, weights.to(torch.float32))


def _strided(t):
    return None if t is None else t.mT.contiguous().mT if t.dim() >= 2 else t


@pytest.mark.parametrize("d_out", [65, 72])
@pytest.mark.parametrize("U_layout", ["row_major", "column_major", "strided"])
@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
def test_parameter_layouts(dtype, U_layout, d_out, path):
    """W, S, V transposed in memory, a strided bias, and U row-major, column-major per
    task (U.transpose(1, 2) contiguous) or neither (a slice of a wider tensor). d_out = 72:
    rows of whole 16-byte vectors (the vector kernels for either U layout)."""
    layer = make_layer(8, 16, 64, d_out, dtype=dtype, seed=26)
    x = make_x((133, 64), dtype, seed=27)
    W, bias, U, S, V = cuda_params(layer)
    W, S, V = _strided(W), _strided(S), _strided(V)
    strided_bias = torch.zeros(2 * layer.d_out, dtype=dtype, device=DEV)[::2]
    strided_bias.copy_(bias)
    if U_layout == "column_major":
        U = U.transpose(1, 2).contiguous().transpose(1, 2)
    elif U_layout == "strided":
        U = torch.stack([U, U], dim=3).reshape(*U.shape[:2], -1)[:, :, ::2]
        assert U.stride(1) != 1 and U.stride(2) != 1
    params = (W, strided_bias, U, S, V)
    for n in (1, 2, 5, 133):
        got = mass_ext.route(to_cuda(x[:n]), V, 3, threshold=0.1, weighting="softmax")
        got = type(got)(*(t.cpu() for t in got))
        check_route_against_reference(x[:n], layer.V, 3, threshold=0.1, weighting="softmax",
                                      got=got)
        out = mass_ext.routed_linear(to_cuda(x[:n]), *params, 3, threshold=0.1,
                                     weighting="softmax")
        assert_output_matches(out.cpu(), x[:n], layer, got.indices, got.weights, "self-routed")
        out = mass_ext.routed_linear(to_cuda(x[:n]), *params, indices=got.indices.to(DEV),
                                     weights=got.weights.to(DEV))
        assert_output_matches(out.cpu(), x[:n], layer, got.indices, got.weights, "pre-routed")


@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
def test_single_rows_whose_row_stride_is_below_d_in(dtype, path):
    """A size-1 dimension's stride is arbitrary (torch calls such a tensor contiguous
    whatever it is), but cuBLAS checks leading dimensions: one row x of stride (1, 1)
    from unfold, and T * r = 1 (one task of rank 1, V of stride (1, 1, 1))."""
    for T, r in ((3, 4), (1, 1)):
        layer = make_layer(T, r, 64, 24, dtype=dtype, seed=40)
        x = make_x((64,), dtype, seed=41).to(DEV).unfold(0, 64, 1)
        assert x.shape == (1, 64) and x.stride() == (1, 1)
        W, bias, U, S, V = cuda_params(layer)
        if T * r == 1:
            V = V.reshape(-1).as_strided((1, 1, 64), (1, 1, 1))
        got = mass_ext.route(x, V, 1)
        got = type(got)(*(t.cpu() for t in got))
        check_route_against_reference(x.cpu(), layer.V, 1, got=got)
        out = mass_ext.routed_linear(x, W, bias, U, S, V, 1)
        assert_output_matches(out.cpu(), x.cpu(), layer, got.indices, got.weights)


@pytest.mark.parametrize("dtype", MAIN_DTYPES + EXTRA_DTYPES, ids=str)
def test_exact_tie_and_zero_rows(dtype, path):
    """Identical V for tasks 1 and 3: the residuals tie bitwise and 1 comes first; a zero
    row ties every task: tasks in id order, p uniform, output = bias."""
    T, r, d_in = 5, 4, 64
    V = make_layer(T, r, d_in, 65, dtype=torch.float64, seed=22).V
    V[1] = V[3] = torch.eye(r, d_in, dtype=torch.float64)
    layer = make_layer(T, r, d_in, 65, dtype=dtype, seed=23, V=V)
    g = generator(22)
    x = torch.randn(6, d_in, dtype=torch.float64, generator=g) * 0.01
    x[:, :r] = torch.randn(6, r, dtype=torch.float64, generator=g) * 3
    x[5] = 0
    x = x.to(dtype)
    routing = mass_ext.route(to_cuda(x), to_cuda(layer.V), 3, weighting="softmax")
    idx, res = routing.indices.cpu(), routing.residuals.cpu()
    assert torch.equal(res[:5, 1], res[:5, 3])
    assert idx[:5, :2].tolist() == [[1, 3]] * 5
    assert idx[5].tolist() == [0, 1, 2] and bool((res[5] == 0).all())
    torch.testing.assert_close(routing.weights[5].cpu(),
                               torch.full((3,), 1 / T, dtype=routing.weights.dtype))
    out = mass_ext.routed_linear(to_cuda(x[5:]), *cuda_params(layer), 3)
    assert torch.equal(out.cpu(), torch.zeros(1, 65, dtype=dtype) + layer.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_rows_leave_other_rows_alone(dtype, path):
    """A row holding NaN / inf (or finite past the largest norm) changes no other row, bit
    for bit; its own routing is the reference's (NaN residuals, tasks by id, one slot)."""
    layer = make_layer(8, 16, 64, 65, dtype=dtype, seed=25)
    params = cuda_params(layer)
    clean = make_x((7, 64), dtype, seed=26)
    dirty = clean.clone()
    dirty[1, 3] = float("inf")
    dirty[3, 0] = float("nan")
    dirty[5].fill_(torch.finfo(dtype).max / 2)
    others = torch.tensor([0, 2, 4, 6])
    results = []
    for x in (clean, dirty):
        xc = to_cuda(x)
        routing = mass_ext.route(xc, params[-1], 3, threshold=0.1, weighting="softmax")
        out = mass_ext.routed_linear(xc, *params, 3, threshold=0.1, weighting="softmax")
        pre = mass_ext.routed_linear(xc, *params, indices=routing.indices,
                                     weights=routing.weights)
        results.append([t.cpu() for t in (*routing, out, pre)])
    for name, a, b in zip(("indices", "weights", "residuals", "out", "pre-routed"), *results):
        assert torch.equal(a[others], b[others]), name
    idx, w, res = results[1][:3]
    check_routing_invariants(idx[others], w[others], 8, 3, "softmax")
    ref = reference.route(dirty[[1, 3]], layer.V, 3, threshold=0.1, weighting="softmax")
    assert torch.equal(idx[[1, 3]], ref.indices)
    assert bool(res[[1, 3]].isnan().all())
    # README ("Non-finite values"): one slot, task 0, weight NaN (softmax); row 5's norm
    # overflows even rescaled, so it is routed as a non-finite row too.
    bad = torch.tensor([1, 3, 5])
    assert idx[bad].tolist() == [[0, -1, -1]] * 3
    assert bool(w[bad, 0].isnan().all()) and bool((w[bad, 1:] == 0).all())
    assert not bool(results[1][3][[1, 3]].isfinite().any())


@pytest.mark.parametrize("T", [2, 5, 8])
def test_nearly_tied_large_residuals_weigh_as_in_float64(T, path):
    """Residuals ~26 that differ by 1e-4..1e-6 of their size: the float32 softmax weights
    are those float64 gives for the kernel's own residuals, to 1e-5 relative (the plain
    float32 variance failed this on the GPU, 2026-11-30)."""
    x, V = nearly_tied_rows(T, 256, seed=80)
    for top_k in (1, 2):
        got = mass_ext.route(to_cuda(x), to_cuda(V), top_k, weighting="softmax")
        got = type(got)(*(t.cpu() for t in got))
        assert_routing_self_consistent(got, top_k, weighting="softmax")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_many_tasks_select_in_global_scratch(dtype, path):
    """T = 6000: the selection's 2 T values exceed the routing kernel's shared-memory budget
    (routing.cu, kRouteSharedBytes), so it runs in global scratch; same routing rules."""
    T, r, d_in = 6000, 1, 8
    layer = make_layer(T, r, d_in, 5, dtype=dtype, seed=90)
    x = make_x((3, d_in), dtype, seed=91)
    got = mass_ext.route(to_cuda(x), to_cuda(layer.V), 3, threshold=1e-5, weighting="softmax")
    got = type(got)(*(t.cpu() for t in got))
    check_route_against_reference(x, layer.V, 3, threshold=1e-5, weighting="softmax", got=got)
    out = mass_ext.routed_linear(to_cuda(x), *cuda_params(layer), 3, threshold=1e-5,
                                 weighting="softmax")
    assert_output_matches(out.cpu(), x, layer, got.indices, got.weights)


@pytest.mark.parametrize("scale", [2.0**70, 2.0**-70])
def test_scaled_rows_route_like_unscaled(scale, path):
    """Rows whose squares overflow or underflow float32 are redone divided by a power of
    two: routed like the unscaled rows (README, "Magnitudes")."""
    layer = make_layer(8, 16, 64, 65, seed=30)
    x = make_x((5, 64), seed=31)
    V = to_cuda(layer.V)
    plain = mass_ext.route(to_cuda(x), V, 3, weighting="softmax")
    scaled = mass_ext.route(to_cuda(x * scale), V, 3, weighting="softmax")
    assert torch.equal(plain.indices, scaled.indices)
    # Exactly: a power of two scales every product and sum exactly, and the kernel sums a
    # rescaled row in the order of a plain one (routing.cu, sum_squares).
    assert torch.equal(scaled.residuals, plain.residuals * scale)


def test_float16_update_beyond_float16_range_stays_finite(path):
    """w * S * z above float16's 65504 for a finite row whose output fits float16: every
    path keeps that product in float32 (the large-N path once rounded it to float16: inf)."""
    N, d, r = 70, 8, 2
    x = torch.zeros(N, d, dtype=torch.float16)
    x[:, 0] = 60000.0
    W = torch.zeros(d, d, dtype=torch.float16)
    V = torch.eye(d, dtype=torch.float16)[:r].unsqueeze(0)        # (1, r, d): orthonormal rows
    S = torch.tensor([[2.0, 1.0]], dtype=torch.float16)           # w * S * z = 120000
    U = 0.5 * torch.eye(d, dtype=torch.float16)[:, :r].unsqueeze(0)
    want = mass_ext.routed_linear(x, W, None, U, S, V)             # CPU: float32 accumulation
    assert torch.equal(want[:, 0], x[:, 0])
    got = mass_ext.routed_linear(*(to_cuda(t) for t in (x, W)), None,
                                 *(to_cuda(t) for t in (U, S, V)))
    assert torch.equal(got.cpu(), want)
    indices = torch.zeros(N, 1, dtype=torch.long)
    got = mass_ext.routed_linear(*(to_cuda(t) for t in (x, W)), None,
                                 *(to_cuda(t) for t in (U, S, V)),
                                 indices=to_cuda(indices), weights=to_cuda(torch.ones(N, 1)))
    assert torch.equal(got.cpu(), want)


def test_routing_ignores_tf32(path):
    """With TF32 matmuls allowed (a common global setting), float32 projections stay
    strict float32: rows whose two best tasks are 1e-4 apart route as on the CPU (TF32's
    ~5e-4 input rounding would flip some of them)."""
    N, d, r = 256, 64, 4
    g = generator(60)
    V = torch.eye(d)[: 2 * r].reshape(2, r, d)                     # task 0: e0..e3, task 1: e4..e7
    a = 0.5 + torch.rand(N, generator=g)
    x = torch.randn(N, d, generator=g) * 0.05
    x[:, : 2 * r] = 0
    x[:, 0] = a
    x[:, r] = a * (1 + 1e-4 * torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0))
    want = mass_ext.route(x, V)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got = mass_ext.route(to_cuda(x), to_cuda(V))
        out, indices, _ = OPS.routed_linear(to_cuda(x), torch.zeros(3, d, device=DEV), None,
                                            torch.zeros(2, 3, r, device=DEV),
                                            torch.ones(2, r, device=DEV), to_cuda(V), 1, 1.0,
                                            0.0, "uniform")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert torch.equal(got.indices.cpu(), want.indices)
    assert torch.equal(indices.cpu(), want.indices)


# ------------------------------------------------------------------------ autograd

def test_gradients_match_reference(path):
    """Autograd (csrc/autograd.cpp) on CUDA tensors: float64 gradients of both forms
    against the reference's, computed on the CPU with the same routing. Uniform weights:
    the reference would differentiate through softmax weights, the op treats the routing
    as a constant (DESIGN.md)."""
    layer = make_layer(4, 3, 9, 7, dtype=torch.float64, seed=40)
    x = make_x((5, 9), torch.float64, seed=41)
    g = generator(42)
    indices = torch.randint(-1, 4, (5, 2), generator=g)
    weights = torch.rand(5, 2, generator=g, dtype=torch.float64)

    def grads(device, op):
        leaves = [t.detach().to(device).requires_grad_(True) for t in (x, *layer.params, weights)]
        xx, W, b, U, S, V, w = leaves
        self_routed = op.routed_linear(xx, W, b, U, S, V, 2, weighting="uniform")
        prerouted = op.routed_linear(xx, W, b, U, S, V, indices=indices.to(device), weights=w)
        (self_routed.pow(2).sum() + (prerouted * 0.5).sum()).backward()
        return [t.grad.cpu() for t in leaves]

    for got, want in zip(grads(DEV, mass_ext), grads("cpu", reference)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------ CUDA graphs

def _task_rows(layer: Layer, tasks, seed):
    """Rows lying near the subspaces of `tasks` (one per row): a clear routing."""
    g = generator(seed)
    V64 = layer.V.to(torch.float64)
    coeff = torch.randn(len(tasks), layer.r, dtype=torch.float64, generator=g)
    x = torch.einsum("nr,nri->ni", coeff, V64[torch.as_tensor(tasks)])
    x = x + 0.01 * torch.randn(x.shape, dtype=torch.float64, generator=g)
    return x.to(layer.V.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 4, 133])
def test_graph_capture_replays_with_new_routing(n, dtype, path):
    """Capture all three ops in one CUDA graph, then replay it with inputs whose rows go
    to other tasks: the outputs and routing match eager calls on the new inputs (no grid
    or allocation sized from the first routing)."""
    T, k = 8, 2
    layer = make_layer(T, 16, 64, 65, dtype=dtype, seed=50)
    params = cuda_params(layer)
    inputs = [_task_rows(layer, [(i + shift) % T for i in range(n)], seed=51 + shift)
              for shift in (0, 3, 5)]
    static_x = to_cuda(inputs[0])

    def run(x):
        routing = mass_ext.route(x, params[-1], k, threshold=0.05, weighting="renormalized")
        out = mass_ext.routed_linear(x, *params, k, threshold=0.05, weighting="renormalized")
        pre = mass_ext.routed_linear(x, *params, indices=routing.indices,
                                     weights=routing.weights)
        return routing.indices, routing.weights, out, pre

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS handles, allocator)
        run(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(static_x)
    for x in inputs[1:] + inputs[:1]:
        static_x.copy_(to_cuda(x))
        graph.replay()
        torch.cuda.synchronize()
        eager = run(to_cuda(x))
        assert torch.equal(static_out[0], eager[0]), "routing differs on replay"
        torch.testing.assert_close(static_out[1], eager[1], rtol=1e-5, atol=1e-7)
        indices, weights = eager[0].cpu(), eager[1].cpu()
        assert_output_matches(static_out[2].cpu(), x, layer, indices, weights, "self-routed")
        assert_output_matches(static_out[3].cpu(), x, layer, indices, weights, "pre-routed")
    # The inputs really changed the routing between replays.
    firsts = {tuple(mass_ext.route(to_cuda(x), params[-1], k).indices[:, 0].tolist())
              for x in inputs}
    assert len(firsts) == len(inputs)


# ------------------------------------------------------------------------ streams, devices

def test_runs_on_the_current_stream(path):
    """The ops launch on the current stream: x is written on a side stream after a long
    sleep there; an op on the default stream would read it before it is ready."""
    layer = make_layer(8, 16, 64, 65, seed=60)
    params = cuda_params(layer)
    x = make_x((5, 64), seed=61)
    expected = mass_ext.routed_linear(to_cuda(x), *params, 2, weighting="softmax").cpu()
    routing = mass_ext.route(to_cuda(x), params[-1], 2, weighting="softmax")
    side = torch.cuda.Stream()
    xs = torch.zeros(5, 64, device=DEV)
    staged = to_cuda(x)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~0.1 s of GPU time
        xs.copy_(staged)
        out = mass_ext.routed_linear(xs, *params, 2, weighting="softmax")
        got_routing = mass_ext.route(xs, params[-1], 2, weighting="softmax")
        pre = mass_ext.routed_linear(xs, *params, indices=routing.indices,
                                     weights=routing.weights)
    side.synchronize()
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(got_routing.indices, routing.indices)
    assert_output_matches(pre.cpu(), x, layer, routing.indices.cpu(), routing.weights.cpu())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensors_on_another_device_than_the_current_one(path):
    layer = make_layer(8, 16, 64, 65, seed=70)
    x = make_x((5, 64), seed=71)
    expected = mass_ext.routed_linear(to_cuda(x), *cuda_params(layer), 2).cpu()
    with torch.cuda.device(0):
        params = cuda_params(layer, "cuda:1")
        out = mass_ext.routed_linear(to_cuda(x, "cuda:1"), *params, 2)
        routing = mass_ext.route(to_cuda(x, "cuda:1"), params[-1], 2)
        pre = mass_ext.routed_linear(to_cuda(x, "cuda:1"), *params, indices=routing.indices,
                                     weights=routing.weights)
    assert out.device == torch.device("cuda:1")
    assert torch.equal(out.cpu(), expected)
    assert_output_matches(pre.cpu(), x, layer, routing.indices.cpu(), routing.weights.cpu())


def test_mixed_devices_name_the_argument():
    layer = make_layer(8, 16, 64, 65, seed=72)
    x = to_cuda(make_x((5, 64), seed=73))
    params = cuda_params(layer)
    params[3] = params[3].cpu()  # S
    with pytest.raises(ValueError, match=r"S must be on the device of x \(cuda:0\), got cpu"):
        mass_ext.routed_linear(x, *params, 2)
    with pytest.raises(ValueError, match=r"indices must be on the device of x"):
        mass_ext.routed_linear(x, *cuda_params(layer), indices=torch.zeros(5, 1, dtype=torch.long),
                               weights=torch.ones(5, 1, device=DEV))


BAD_INDEX_SCRIPT = r"""
import torch, mass_ext
T, r, d = 4, 3, 16
x = torch.randn(6, d, device="cuda")
W, b = torch.randn(5, d, device="cuda"), torch.randn(5, device="cuda")
U, S, V = torch.randn(T, 5, r, device="cuda"), torch.rand(T, r, device="cuda"), torch.randn(T, r, d, device="cuda")
indices = torch.zeros(6, 2, dtype=torch.long, device="cuda")
indices[2, 1] = T
mass_ext.routed_linear(x, W, b, U, S, V, indices=indices, weights=torch.ones(6, 2, device="cuda"))
torch.cuda.synchronize()
print("no error")
"""


@pytest.mark.parametrize("path_name", ["decode", "large"])
def test_prerouted_index_out_of_range_is_a_device_assert(path_name):
    """Index values are checked on the device (a host check would need a sync): an index
    out of [-1, T) is a device-side assert, as for torch's own indexing on CUDA. It ends
    the CUDA context, hence the subprocess."""
    import os

    env = dict(os.environ, **PATHS[path_name])
    done = subprocess.run([sys.executable, "-c", BAD_INDEX_SCRIPT], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode != 0 and "no error" not in done.stdout, done.stdout
    assert "device-side assert" in done.stderr, done.stderr[-2000:]


# ------------------------------------------------------------------------ torch integration

OPCHECK_CASES = [
    # (lead, d_in, d_out, T, r, k, dtype, bias, layout)
    ((5,), 64, 65, 8, 16, 2, torch.float32, True, "contiguous"),
    ((2, 3), 7, 9, 3, 2, 3, torch.float32, False, "transposed"),
    ((4,), 33, 17, 4, 5, 2, torch.bfloat16, True, "column_slice"),
    ((70,), 16, 8, 2, 3, 1, torch.float16, True, "contiguous"),
]


def _opcheck(op, args):
    try:
        result = torch.library.opcheck(op, args)
    except ModuleNotFoundError as error:  # opcheck's helpers may import test-only modules
        pytest.skip(f"torch.library.opcheck unavailable: {error}")
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck(case, requires_grad):
    lead, d_in, d_out, T, r, k, dtype, bias, layout = case
    layer = make_layer(T, r, d_in, d_out, dtype=dtype, bias=bias, seed=0)
    x = to_cuda(strided_like(make_x((*lead, d_in), dtype, seed=1), layout))
    params = cuda_params(layer)
    if requires_grad:
        x = x.detach().requires_grad_(True)
        params = [None if t is None else t.detach().requires_grad_(True) for t in params]
    g = generator(2)
    indices = torch.randint(-1, T, (*lead, k + 1), generator=g).to(DEV)
    weights = torch.rand(*lead, k + 1, generator=g).to(DEV).requires_grad_(requires_grad)
    _opcheck(OPS.route.default, (x.detach(), params[-1].detach(), k, 0.5, 0.1, "renormalized"))
    _opcheck(OPS.routed_linear.default, (x, *params, k, 1.0, 0.0, "softmax"))
    _opcheck(OPS.routed_linear_prerouted.default, (x, *params, indices, weights))


def test_compile_fullgraph_matches_eager():
    from .test_torch_integration import TwoLayer

    torch._dynamo.reset()
    model = TwoLayer().to(DEV)
    compiled = torch.compile(model, fullgraph=True)
    for batch in ((2, 11), (3,)):
        x = to_cuda(make_x((*batch, 64), seed=5))
        for got, want in zip(compiled(x), model(x)):
            assert got.shape == want.shape and got.dtype == want.dtype
            # The custom ops see the same inputs compiled or not; relu * 0.5 is exact.
            assert torch.equal(got, want)


class _TokenModel(torch.nn.Module):
    """Token features (B, L, 24) through two Linear layers; takes an attention_mask (which
    the layers ignore, as an encoder's MLP does) so that MASS pools with it."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(24, 40), torch.nn.Linear(40, 24)

    def forward(self, x, attention_mask=None):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("mode, pooling", [("two_pass", "mean"), ("two_pass", "tokens"),
                                           ("per_layer", "tokens")])
def test_mass_model_moved_to_cuda_routes_and_computes_as_on_the_cpu(mode, pooling):
    """The model level on the GPU: MASS built on the CPU, moved with .to("cuda"), routes
    every sample as on the CPU and gives the same outputs (float64: no near-ties).
    Built with RoutedLinear.from_linear (MASS.from_finetuned needs tqdm, which the GPU
    machine lacks)."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _TokenModel().double()
    for name in ("up", "down"):
        linear = getattr(model, name)
        deltas = [0.1 * torch.randn(linear.out_features, 4, generator=g, dtype=torch.float64)
                  @ torch.randn(4, linear.in_features, generator=g, dtype=torch.float64)
                  for _ in range(3)]
        setattr(model, name, mass_ext.RoutedLinear.from_linear(linear, deltas, are_deltas=True))
    mm = mass_ext.MASS(model, ["a", "b", "c"], router_layer=["up", "down"], pooling=pooling,
                       mode=mode)
    x = torch.randn(6, 5, 24, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[::2, 3:] = 0
    with torch.no_grad():
        expected = mm(x, attention_mask=mask)
        routing = mm.routing
        mm.to(DEV)
        out = mm(x.to(DEV), attention_mask=mask.to(DEV))
    assert out.device.type == mm.routing.indices.device.type == torch.device(DEV).type
    assert torch.equal(mm.routing.indices.cpu(), routing.indices)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-10, rtol=1e-10)
