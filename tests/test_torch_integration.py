"""The ops as PyTorch sees them: opcheck (schema, fake kernels, autograd registration,
AOT dispatch), torch.compile(fullgraph=True), meta / FakeTensor shape propagation and
bitwise determinism (repeated calls, thread counts)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mass_ext

from .helpers import generator, make_layer, make_x, strided_like

pytestmark = pytest.mark.skipif(mass_ext.backend() != "cpp", reason="C++ extension not built")

OPS = torch.ops.mass_ext

OPCHECK_CASES = [
    # (lead, d_in, d_out, T, r, k, dtype, bias, layout)
    ((5,), 64, 65, 8, 16, 2, torch.float32, True, "contiguous"),
    ((2, 3), 7, 9, 3, 2, 3, torch.float32, False, "transposed"),
    ((4,), 33, 17, 4, 5, 2, torch.bfloat16, True, "column_slice"),
    ((3,), 16, 8, 2, 3, 1, torch.float64, True, "contiguous"),
]


def _opcheck_inputs(case, requires_grad):
    lead, d_in, d_out, T, r, k, dtype, bias, layout = case
    layer = make_layer(T, r, d_in, d_out, dtype=dtype, bias=bias, seed=0)
    x = strided_like(make_x((*lead, d_in), dtype, seed=1), layout)
    if requires_grad:
        layer = layer.detach_requires_grad()
        x = x.detach().requires_grad_(True)  # a leaf with x's strides
    return x, layer


def _assert_opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_route(case):
    x, layer = _opcheck_inputs(case, requires_grad=False)
    _assert_opcheck(OPS.route.default, (x, layer.V, case[5], 0.5, 0.1, "renormalized"))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_routed_linear(case, requires_grad):
    x, layer = _opcheck_inputs(case, requires_grad)
    _assert_opcheck(OPS.routed_linear.default, (x, *layer.params, case[5], 1.0, 0.0, "softmax"))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_routed_linear_prerouted(case, requires_grad):
    x, layer = _opcheck_inputs(case, requires_grad)
    lead, T, k = case[0], case[3], case[5]
    g = generator(2)
    indices = torch.randint(-1, T, (*lead, k + 1), generator=g)
    weights = torch.rand(*lead, k + 1, generator=g, requires_grad=requires_grad)
    _assert_opcheck(OPS.routed_linear_prerouted.default, (x, *layer.params, indices, weights))


def test_opcheck_route_with_requires_grad():
    x, layer = _opcheck_inputs(OPCHECK_CASES[0], requires_grad=True)
    _assert_opcheck(OPS.route.default, (x, layer.V, 2, 1.0, 0.0, "softmax"))


def test_route_outputs_are_not_differentiable():
    x, layer = _opcheck_inputs(OPCHECK_CASES[0], requires_grad=True)
    routing = mass_ext.route(x, layer.V, 2, weighting="softmax")
    assert not routing.weights.requires_grad
    assert not routing.residuals.requires_grad


# ------------------------------------------------------------------------ torch.compile

class TwoLayer(torch.nn.Module):
    """Routes once on the input, runs a self-routed layer, then a pre-routed one with the
    routing of the first: the shape of MASS's two-pass inference, in one graph."""

    def __init__(self, d_in=64, d_hidden=65, d_out=48, T=8, r=16, top_k=2):
        super().__init__()
        self.top_k = top_k
        first = make_layer(T, r, d_in, d_hidden, seed=3)
        second = make_layer(T, r, d_hidden, d_out, seed=4)
        for prefix, layer in (("a", first), ("b", second)):
            for name, t in zip(("weight", "bias", "U", "S", "V"), layer.params):
                self.register_buffer(f"{prefix}_{name}", t)

    def params(self, prefix):
        return [getattr(self, f"{prefix}_{n}") for n in ("weight", "bias", "U", "S", "V")]

    def forward(self, x):
        routing = mass_ext.route(x, self.a_V, self.top_k, temperature=0.5, threshold=0.1,
                                 weighting="softmax")
        h = mass_ext.routed_linear(x, *self.params("a"), self.top_k, temperature=0.5,
                                   threshold=0.1, weighting="softmax")
        h = torch.relu(h) * 0.5
        y = mass_ext.routed_linear(h, *self.params("b"), indices=routing.indices,
                                   weights=routing.weights)
        return y, routing.indices, routing.residuals


def _assert_same_outputs(got, expected):
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        # Opaque custom ops see the same inputs compiled or not: same bits. The only
        # compiled arithmetic (relu * 0.5) is exact.
        assert torch.equal(g, e)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = TwoLayer()
    compiled = torch.compile(model, fullgraph=True)
    x = make_x((2, 11, 64), seed=5)
    _assert_same_outputs(compiled(x), model(x))


def test_compile_dynamic_batch_sizes_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = TwoLayer()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for batch in (3, 7, 133):
        x = make_x((batch, 64), seed=batch)
        _assert_same_outputs(compiled(x), model(x))
    assert counter.frame_count == 1, "dynamic shapes should not recompile per batch size"


def test_compile_backward_matches_eager():
    """AOT autograd traces the registered backward formulas: with the aot_eager backend
    (no codegen) the compiled gradients are the eager ones, bit for bit."""
    torch._dynamo.reset()
    layer = make_layer(8, 16, 64, 65, seed=9).detach_requires_grad()
    x = make_x((7, 64), seed=10).requires_grad_(True)
    g = generator(11)
    indices = torch.randint(-1, 8, (7, 3), generator=g)
    weights = torch.rand(7, 3, generator=g, requires_grad=True)

    def loss(x, weight, bias, U, S, V, weights):
        self_routed = mass_ext.routed_linear(x, weight, bias, U, S, V, 2, weighting="softmax")
        prerouted = mass_ext.routed_linear(x, weight, bias, U, S, V, indices=indices,
                                           weights=weights)
        return (self_routed * prerouted).sum()

    inputs = (x, *layer.params, weights)
    eager = torch.autograd.grad(loss(*inputs), inputs)
    compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled = torch.autograd.grad(compiled_loss(*inputs), inputs)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ shapes

SHAPE_CASES = [
    # (lead, dtype, expected routing dtype)
    ((5,), torch.float32, torch.float32),
    ((2, 3), torch.bfloat16, torch.float32),
    ((0,), torch.float16, torch.float32),
    ((), torch.float64, torch.float64),
]


def _check_shapes(x, layer, k, indices, weights, lead, dtype, acc):
    T, d_out = layer.T, layer.d_out
    idx, w, res = OPS.route(x, layer.V, k, 1.0, 0.0, "uniform")
    assert (idx.shape, w.shape, res.shape) == ((*lead, k), (*lead, k), (*lead, T))
    assert (idx.dtype, w.dtype, res.dtype) == (torch.int64, acc, acc)
    out, idx, w = OPS.routed_linear(x, *layer.params, k, 1.0, 0.0, "softmax")
    assert (out.shape, idx.shape, w.shape) == ((*lead, d_out), (*lead, k), (*lead, k))
    assert (out.dtype, idx.dtype, w.dtype) == (dtype, torch.int64, acc)
    out = OPS.routed_linear_prerouted(x, *layer.params, indices, weights)
    assert out.shape == (*lead, d_out) and out.dtype == dtype


@pytest.mark.parametrize("lead,dtype,acc", SHAPE_CASES, ids=str)
def test_meta_shapes(lead, dtype, acc):
    layer = make_layer(8, 16, 64, 65, dtype=dtype).to(dtype)
    layer = type(layer)(*(None if t is None else t.to("meta") for t in layer.params))
    x = torch.empty(*lead, 64, dtype=dtype, device="meta")
    indices = torch.empty(*lead, 4, dtype=torch.int64, device="meta")
    weights = torch.empty(*lead, 4, device="meta")
    _check_shapes(x, layer, 3, indices, weights, lead, dtype, acc)


@pytest.mark.parametrize("lead,dtype,acc", SHAPE_CASES, ids=str)
def test_fake_tensor_shapes(lead, dtype, acc):
    real = make_layer(8, 16, 64, 65, dtype=dtype)
    with FakeTensorMode() as mode:
        layer = type(real)(*(None if t is None else mode.from_tensor(t) for t in real.params))
        x = mode.from_tensor(make_x((*lead, 64), dtype))
        indices = torch.zeros(*lead, 4, dtype=torch.int64)
        weights = torch.ones(*lead, 4)
        _check_shapes(x, layer, 3, indices, weights, lead, dtype, acc)


# ------------------------------------------------------------------------ determinism

def _all_outputs(x, layer, indices, weights):
    return (
        *OPS.route(x, layer.V, 3, 0.5, 0.1, "renormalized"),
        *OPS.routed_linear(x, *layer.params, 3, 0.5, 0.1, "renormalized"),
        OPS.routed_linear_prerouted(x, *layer.params, indices, weights),
    )


DETERMINISM_CASES = [
    # (lead, d_in, d_out, T, r, dtype): big enough that every kernel runs in parallel
    ((133,), 769, 300, 20, 96, torch.float32),
    ((1,), 769, 300, 20, 96, torch.float32),  # decode: the shrink splits rank runs
    ((2, 67), 64, 65, 8, 16, torch.bfloat16),
    # a long reduction: oneDNN's own threading splits K here, so the sums by thread count
    ((8,), 20000, 64, 4, 4, torch.float32),
    # hundreds of slots per task: their updates run as GEMMs over the gathered slots
    ((600,), 64, 65, 4, 16, torch.float32),
]


def _determinism_inputs(case):
    lead, d_in, d_out, T, r, dtype = case
    layer = make_layer(T, r, d_in, d_out, dtype=dtype, seed=6)
    x = make_x((*lead, d_in), dtype, seed=7)
    g = generator(8)
    indices = torch.randint(-1, T, (*lead, 4), generator=g)
    weights = torch.rand(*lead, 4, generator=g)
    return x, layer, indices, weights


@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=str)
def test_repeated_calls_are_bitwise_identical(case):
    args = _determinism_inputs(case)
    first = _all_outputs(*args)
    for _ in range(3):
        for a, b in zip(first, _all_outputs(*args)):
            assert torch.equal(a, b)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=str)
def test_thread_count_does_not_change_results(case, threads, restore_threads):
    args = _determinism_inputs(case)
    torch.set_num_threads(1)
    one = _all_outputs(*args)
    torch.set_num_threads(threads)
    two = _all_outputs(*args)
    for name, a, b in zip(("indices", "weights", "residuals", "out", "indices", "weights",
                           "prerouted out"), one, two):
        assert torch.equal(a, b), name
