"""The CPU kernels' dense GEMMs (csrc/cpu/dense_gemm.cpp): oneDNN tiles or ATen.

By default float32 GEMMs of at least 2^22 multiply-adds go to oneDNN, so most of the
kernel-vs-reference grid (small shapes) runs ATen's; MASS_EXT_CPU_GEMM=onednn / aten
forces one backend for every size, which these tests use to run the grid through both.
"""
from __future__ import annotations

import os

import pytest
import torch

import mass_ext

from .cases import CASES, MAIN_DTYPES, PREROUTED_CASES, prerouted_indices
from .helpers import assert_output_matches, generator, make_layer, make_x, strided_like
from .test_kernel_vs_reference import _check_case, _grouped_routing, _task_set_routing

pytestmark = pytest.mark.skipif(mass_ext.backend() != "cpp", reason="C++ extension not built")

BACKENDS = ["onednn", "aten"]


def _onednn_linear():
    """PyTorch's oneDNN linear, or None where torch was built without mkldnn."""
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


@pytest.fixture(params=BACKENDS)
def gemm(request, monkeypatch):
    monkeypatch.setenv("MASS_EXT_CPU_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("dtype", MAIN_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_self_routed_matches_reference_with_each_gemm(case, dtype, gemm):
    _check_case(case, dtype)


@pytest.mark.parametrize("case", PREROUTED_CASES, ids=str)
def test_prerouted_matches_reference_with_each_gemm(case, gemm):
    lead, d_in, d_out, T, r, k, bias, layout = case
    layer = make_layer(T, r, d_in, d_out, bias=bias, seed=5)
    x = strided_like(make_x((*lead, d_in), seed=6), layout)
    g = generator(7)
    indices = prerouted_indices("random", lead, T, k, g)
    weights = torch.rand(*lead, k, generator=g)
    assert_output_matches(
        mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights),
        x, layer, indices, weights)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_prerouted_merged_groups_with_each_gemm(layout, gemm):
    """Shuffled groups large enough to merge (from 99 rows here), next to rows on the
    low-rank path: with oneDNN each group's product goes from its tiles (several, ragged)
    straight to the group's rows; every row as the reference computes it."""
    T, d_in, d_out = 5, 70, 1030
    layer = make_layer(T, 32, d_in, d_out, seed=43)
    x = strided_like(make_x((500, d_in), seed=44), layout)
    indices, weights = _grouped_routing(500, T, generator(45))
    out = mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
    assert_output_matches(out, x, layer, indices, weights)
    # Task sets with weights of their own: [x | w h] against [W | U], two GEMMs per tile.
    x = strided_like(make_x((1300, d_in), seed=44), layout)
    indices, weights = _task_set_routing(1300, T, generator(49))
    out = mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
    assert_output_matches(out, x, layer, indices, weights)


def test_merged_groups_do_not_depend_on_thread_count(monkeypatch):
    """The grouped pass hands work to whichever thread is free: a row block's tiles
    (one thread here) or single tiles (16 threads: fewer than four row blocks per
    thread). Each tile is still one call (two for task-set groups) on one thread, so the
    output is bitwise the same for any thread count, for merged groups and for task-set
    groups."""
    monkeypatch.setenv("MASS_EXT_CPU_GEMM", "onednn")
    layer = make_layer(5, 32, 70, 1030, seed=46)
    W, b, U, S, V = layer.params
    x = make_x((1300, 70), seed=47)
    threads = torch.get_num_threads()
    # U as given (row-major per task) and as RoutedLinear keeps it (column-major: the
    # expand of the rows outside the groups sums in another order, so bits may differ
    # between the layouts, not between thread counts).
    for U_layout in (U, U.transpose(1, 2).contiguous().transpose(1, 2)):
        for indices, weights in (_grouped_routing(1300, 5, generator(48)),
                                 _task_set_routing(1300, 5, generator(48))):
            try:
                outputs = []
                for count in (1, 2, 3, 16):
                    torch.set_num_threads(count)
                    outputs.append(mass_ext.routed_linear(x, W, b, U_layout, S, V,
                                                          indices=indices, weights=weights))
            finally:
                torch.set_num_threads(threads)
            assert all(torch.equal(outputs[0], out) for out in outputs[1:])


def _zero_update_layer(rows, d_in, d_out, seed):
    """A layer whose low-rank update is exactly 0 (S = 0): the op's output is then its
    dense GEMM x W^T + b, bit for bit."""
    layer = make_layer(3, 4, d_in, d_out, seed=seed)
    S = torch.zeros_like(layer.S)
    x = make_x((rows, d_in), seed=seed + 1)
    return x, (layer.weight, layer.bias, layer.U, S, layer.V)


@pytest.mark.skipif(_onednn_linear() is None, reason="torch built without mkldnn")
def test_each_backend_really_runs(monkeypatch):
    """One output tile: forced oneDNN gives exactly PyTorch's oneDNN linear, forced ATen
    exactly torch.addmm, and the two differ (so the switch is not a no-op)."""
    x, params = _zero_update_layer(7, 33, 20, seed=1)
    W, b = params[0], params[1]
    outputs = {}
    for backend in BACKENDS:
        monkeypatch.setenv("MASS_EXT_CPU_GEMM", backend)
        outputs[backend] = mass_ext.routed_linear(x, *params, top_k=1)
    assert torch.equal(outputs["onednn"], _onednn_linear()(x, W, b, "none", [], ""))
    assert torch.equal(outputs["aten"], torch.addmm(b, x, W.t()))
    assert not torch.equal(outputs["onednn"], outputs["aten"])


@pytest.mark.skipif(_onednn_linear() is None, reason="torch built without mkldnn")
def test_large_gemms_take_onednn_by_default(monkeypatch):
    """Unset, auto: a GEMM above the size floor (here 200 x 512 x 300) runs oneDNN, and a
    small one (7 x 33 x 20) ATen."""
    for rows, d_in, d_out in ((200, 512, 300), (7, 33, 20)):
        x, params = _zero_update_layer(rows, d_in, d_out, seed=2)
        outputs = {}
        for backend in ("auto", "onednn", "aten"):
            monkeypatch.setenv("MASS_EXT_CPU_GEMM", backend)
            outputs[backend] = mass_ext.routed_linear(x, *params, top_k=1)
        large = rows * d_in * d_out >= 2 ** 22
        assert torch.equal(outputs["auto"], outputs["onednn" if large else "aten"])
        assert not torch.equal(outputs["onednn"], outputs["aten"])


def test_many_tiles_with_ragged_edges(monkeypatch):
    """An output of several tiles (2 x 3) whose last row and column tiles are partial,
    in every dispatch state the model code uses (inference mode, no_grad, autograd)."""
    monkeypatch.setenv("MASS_EXT_CPU_GEMM", "onednn")
    x, params = _zero_update_layer(301, 70, 1030, seed=3)
    expected = torch.addmm(params[1].double(), x.double(), params[0].double().t())
    for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad):
        with mode():
            out = mass_ext.routed_linear(x, *params, top_k=1)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_gradients_do_not_depend_on_the_gemm(monkeypatch):
    layer = make_layer(4, 8, 96, 80, seed=4)
    x = make_x((50, 96), seed=5)
    grads = {}
    for backend in BACKENDS:
        monkeypatch.setenv("MASS_EXT_CPU_GEMM", backend)
        leaves = [t.detach().clone().requires_grad_() for t in (x, *layer.params)]
        mass_ext.routed_linear(*leaves, top_k=2, weighting="softmax").square().sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for a, b in zip(grads["onednn"], grads["aten"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bad_gemm_setting_is_named(monkeypatch):
    monkeypatch.setenv("MASS_EXT_CPU_GEMM", "mkl")
    layer = make_layer(2, 3, 8, 5, seed=6)
    with pytest.raises(ValueError, match="MASS_EXT_CPU_GEMM must be auto, onednn or aten, got 'mkl'"):
        mass_ext.routed_linear(make_x((4, 8), seed=7), *layer.params, top_k=1)


@pytest.mark.skipif(_onednn_linear() is None, reason="torch built without mkldnn")
def test_routed_linear_base_mode_runs_the_op_gemm(monkeypatch):
    """Pass 1 on the base weights (RoutedLinear's base mode) runs the op's dense GEMM, so
    it gets oneDNN too: exactly x W^T + b as the op computes it, in any dispatch state."""
    g = generator(8)
    linear = torch.nn.Linear(40, 24)
    deltas = [0.1 * torch.randn(24, 40, generator=g) for _ in range(3)]
    layer = mass_ext.RoutedLinear.from_linear(linear, deltas, rank=4, are_deltas=True)
    x = make_x((5, 6, 40), seed=9)
    monkeypatch.setenv("MASS_EXT_CPU_GEMM", "onednn")
    expected = _onednn_linear()(x, linear.weight, linear.bias, "none", [], "")
    for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad):
        with mode():
            assert torch.equal(layer._base(x), expected)
    grad_x = x.clone().requires_grad_()
    layer._base(grad_x).sum().backward()
    torch.testing.assert_close(grad_x.grad, linear.weight.sum(0).expand(5, 6, 40))
    layer = layer.double()                                   # other dtypes: F.linear
    torch.testing.assert_close(layer._base(x.double()), torch.nn.functional.linear(
        x.double(), linear.weight.double(), linear.bias.double()))


@pytest.mark.skipif(_onednn_linear() is None, reason="torch built without mkldnn")
def test_onednn_calls_take_few_row_counts(monkeypatch):
    """oneDNN compiles a kernel per new GEMM shape (0.4-0.8 ms, more than a tile's GEMM),
    and routed batches bring new group sizes every call: every oneDNN call of the op has
    a row count of at most 4 significant bits (up to 16, or a multiple of 2^(floor(log2
    count) - 3)), whatever the groups' sizes, so a few kernels serve every batch; rows
    computed past a group's last are dropped. Three routings of shuffled groups (merged,
    task sets, the large tasks' updates, the rest), each checked against the reference."""
    monkeypatch.setenv("MASS_EXT_CPU_GEMM", "onednn")
    layer = make_layer(5, 32, 70, 1030, seed=50)
    row_counts = set()
    for seed, rows in ((51, 500), (52, 517), (53, 1300)):
        x = make_x((rows, 70), seed=seed)
        route = _task_set_routing if rows > 1000 else _grouped_routing
        indices, weights = route(rows, 5, generator(seed))
        out, calls = _onednn_calls(
            lambda: mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights))
        assert_output_matches(out, x, layer, indices, weights)
        row_counts |= {shapes[0][0] for shapes in calls}
    assert len(row_counts) > 5
    assert all(n <= 16 or n % (1 << (n.bit_length() - 4)) == 0 for n in row_counts), \
        sorted(row_counts)


def _onednn_calls(call):
    """(call(), the input shapes of the oneDNN calls it made), from torch's profiler."""
    import inspect

    from torch.profiler import ProfilerActivity, profile

    # Events kept from the one cycle there is (torch 2.11 warns that they are not).
    keep = ({"acc_events": True} if "acc_events" in inspect.signature(profile).parameters
            else {})
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, **keep) as prof:
        out = call()
    return out, [event.input_shapes for event in prof.events()
                 if event.name == "mkldnn::_linear_pointwise"]


def _onednn_calls_on_one_and_two_threads(call):
    """(the two outputs of call() on 1 and 2 threads, each run's oneDNN calls' input
    shapes)."""
    threads = torch.get_num_threads()
    outputs, calls = [], []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out, shapes = _onednn_calls(call)
            outputs.append(out)
            calls.append(shapes)
    finally:
        torch.set_num_threads(threads)
    return outputs, calls


@pytest.mark.skipif(_onednn_linear() is None, reason="torch built without mkldnn")
def test_tiles_grow_once_they_outnumber_the_cpus(monkeypatch):
    """The dense GEMM's tiles come from the shape and the machine's logical CPU count
    (C++'s hardware_concurrency, taken to be os.cpu_count() here), never the thread
    setting: a split that would leave more tiles than CPUs must leave larger ones. 200 x
    384 x 384 (2^24.8 multiply-adds) is two 192-column oneDNN calls on up to 2 CPUs, four
    of 96 columns on more; the same for 1 and 2 threads, and every row as x W^T + b."""
    monkeypatch.setenv("MASS_EXT_CPU_GEMM", "onednn")
    x, params = _zero_update_layer(200, 384, 384, seed=56)
    indices, weights = torch.full((200, 1), -1), torch.zeros(200, 1)
    expected_cols = [192] * 2 if (os.cpu_count() or 1) <= 2 else [96] * 4
    outputs, runs = _onednn_calls_on_one_and_two_threads(
        lambda: mass_ext.routed_linear(x, *params, indices=indices, weights=weights))
    for calls in runs:
        assert sorted(shapes[1][0] for shapes in calls) == expected_cols
        assert all(shapes[0][0] == 208 for shapes in calls)  # 200 rows, padded
    assert torch.equal(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], torch.addmm(params[1], x, params[0].t()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(_onednn_linear() is None, reason="torch built without mkldnn")
def test_group_tiles_divide_evenly_among_the_cpus():
    """A grouped GEMM's row tiles, cut group by group, get one more in the group with the
    most rows per tile until the CPUs divide their count: 5 groups of 4 x 832 and 768
    rows (a mixed batch of 64 x 64 tokens) of 384 x 384 are 16 tiles of 208 rows and 4 of
    192 on up to 2 CPUs (19 before: 3 of 256 for the 768 rows); the same bits on 1 and 2
    threads, every row times its group's weight."""
    g = generator(57)
    x = torch.randn(4096, 384, generator=g)
    weights = [torch.randn(384, 384, generator=g) / 20 for _ in range(5)]
    bias = torch.randn(384, generator=g)
    groups = (torch.arange(64) % 5).repeat_interleave(64)   # sample i -> group i % 5
    outputs, runs = _onednn_calls_on_one_and_two_threads(
        lambda: mass_ext.ops.grouped_linear(x, weights, bias, groups))
    cpus = os.cpu_count() or 1
    for calls in runs:
        rows = sorted(shapes[0][0] for shapes in calls)
        if cpus <= 2:
            assert rows == [192] * 4 + [208] * 16
        else:
            assert len(rows) % cpus == 0 or len(rows) < 2 * cpus
    assert torch.equal(outputs[0], outputs[1])
    expected = torch.stack([x[n] @ weights[int(groups[n])].t() for n in range(0, 4096, 97)])
    torch.testing.assert_close(outputs[0][::97], expected + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first", [1, 9, 40])
def test_padded_tiles_at_the_end_of_the_input(first, gemm):
    """A merged group of consecutive rows that ends the input: its oneDNN call gets more
    rows than the input holds past the group's start (so the call's rows are copied, or
    the slice is shifted back over rows of other groups), and the rows before it take
    other tasks. Every row as the reference computes it."""
    T, rows = 3, 140
    layer = make_layer(T, 32, 70, 1030, seed=54)
    x = make_x((rows, 70), seed=55)
    indices = torch.zeros(rows, 1, dtype=torch.long)
    indices[:first, 0] = torch.arange(first) % 2 + 1
    weights = torch.ones(rows, 1)
    out = mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
    assert_output_matches(out, x, layer, indices, weights)
