"""Gradients of mass_ext.routed_linear (self-routed and pre-routed).

The routing decision is a constant of the backward (DESIGN.md): gradients flow to x,
weight, bias, U, S, V (and `weights` in the pre-routed form) through the selected tasks
only. gradcheck therefore uses uniform weights and inputs whose routing has a clear margin,
so that finite differences never flip it (checked before each gradcheck).
"""
from __future__ import annotations

import pytest
import torch

import mass_ext
from mass_ext import reference

from .helpers import (
    assert_close_to_oracle,
    generator,
    make_layer,
    make_x,
    strided_like,
)

pytestmark = pytest.mark.skipif(mass_ext.backend() != "cpp", reason="C++ extension not built")

PARAM_NAMES = ("x", "weight", "bias", "U", "S", "V")


def _clear_margin_inputs(lead, d_in, d_out, T, r, *, bias=True, seed=0):
    """float64 layer and x whose rows lean on the tasks with weights 3, 1.5, 1, ... in a
    random order per row, so that every row has a clear ranking."""
    layer = make_layer(T, r, d_in, d_out, dtype=torch.float64, bias=bias, seed=seed)
    g = generator(seed + 1)
    n = 1
    for s in lead:
        n *= s
    rows = []
    for i in range(n):
        order = torch.randperm(T, generator=g)
        # Component 3, 2, 1, 0.5, ... along the tasks in `order`: a clear ranking.
        row = 0.05 * torch.randn(d_in, dtype=torch.float64, generator=g)
        for rank, t in enumerate(order.tolist()):
            c = torch.randn(r, dtype=torch.float64, generator=g)
            row = row + (3.0 / (rank + 1)) * layer.V[t].T @ (c / c.norm())
        rows.append(row)
    x = torch.stack(rows).reshape(*lead, d_in)
    return x, layer


def _assert_clear_margin(x, V, top_k, margin=1e-2):
    """gradcheck moves one entry by eps = 1e-6, which moves a residual by ~1e-5 at most:
    a margin of 1e-2 between consecutive ranks (up to rank top_k) cannot flip."""
    residuals = reference.route(x, V, V.shape[0]).residuals.reshape(-1, V.shape[0])
    ranked = residuals.sort(-1).values
    gaps = ranked[:, 1:] - ranked[:, :-1]
    assert float(gaps[:, : top_k].min()) > margin, "test inputs: routing margin too small"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(4,), (2, 2), ()], ids=str)
def test_gradcheck_self_routed(lead, bias):
    T, r, d_in, d_out, top_k = 3, 2, 7, 5, 2
    x, layer = _clear_margin_inputs(lead, d_in, d_out, T, r, bias=bias, seed=0)
    _assert_clear_margin(x, layer.V, top_k)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, *layer.params) if t is not None)

    def f(x, weight, *rest):
        b, (U, S, V) = (rest[0], rest[1:]) if bias else (None, rest)
        return mass_ext.routed_linear(x, weight, b, U, S, V, top_k)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(4,), (2, 2)], ids=str)
def test_gradcheck_prerouted(lead, bias):
    T, r, d_in, d_out, k = 3, 2, 7, 5, 3
    layer = make_layer(T, r, d_in, d_out, dtype=torch.float64, bias=bias, seed=2)
    x = make_x((*lead, d_in), torch.float64, seed=3)
    # -1 slots (slot 0 too), a row selecting nothing, a duplicate task in one row.
    indices = torch.tensor([[0, 2, -1], [1, 1, 0], [-1, -1, -1], [-1, 2, 1]]).reshape(*lead, k)
    weights = torch.rand(*lead, k, dtype=torch.float64, generator=generator(4)) + 0.5
    inputs = [x, *layer.params[:2], *layer.params[2:], weights]
    inputs = tuple(t.clone().requires_grad_(True) for t in inputs if t is not None)

    def f(x, weight, *rest):
        b, (U, S, V, w) = (rest[0], rest[1:]) if bias else (None, rest)
        return mass_ext.routed_linear(x, weight, b, U, S, V, indices=indices, weights=w)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _grads(fn, tensors, grad_out):
    tensors = [t.detach().clone().requires_grad_(True) if t is not None else None
               for t in tensors]
    out = fn(*tensors)
    out.backward(grad_out)
    return out, [None if t is None else t.grad for t in tensors]


def _check_grads_against_reference(x, layer, indices, weights, fn, grad_out, dtype,
                                   weights_grad=False):
    """Kernel grads vs autograd through reference.apply_experts with the routing fixed:
    a float64 oracle and a baseline in `dtype` (see helpers.assert_close_to_oracle)."""
    def ref_fn(*ts):
        return reference.apply_experts(*ts[:6], indices, ts[6])

    tensors = [x, *layer.params, weights]
    _, got = _grads(fn, tensors, grad_out)
    _, oracle = _grads(ref_fn, [None if t is None else t.to(torch.float64) for t in tensors],
                       grad_out.to(torch.float64))
    _, baseline = _grads(ref_fn, tensors, grad_out)
    names = [*PARAM_NAMES, "weights"]
    for name, g, o, b, t in zip(names, got, oracle, baseline, tensors):
        if t is None:
            assert g is None
            continue
        if name == "weights" and not weights_grad:
            continue
        assert g is not None, name
        assert g.dtype == t.dtype, (name, g.dtype, t.dtype)
        assert_close_to_oracle(g, o, b, t.dtype, what=f"grad of {name}")


GRAD_CASES = [
    # (lead, d_in, d_out, T, r, k, layout)
    ((133,), 64, 65, 8, 16, 3, "contiguous"),
    ((2, 3), 769, 300, 20, 96, 2, "transposed"),
    ((3,), 7, 65, 2, 3, 2, "column_slice"),
    ((1,), 64, 300, 8, 1, 8, "contiguous"),
    ((0,), 64, 65, 8, 16, 3, "contiguous"),
]


@pytest.mark.parametrize("weighting", ["uniform", "softmax", "renormalized"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_self_routed_grads_match_reference_with_fixed_routing(case, weighting):
    lead, d_in, d_out, T, r, k, layout = case
    dtype = torch.float32
    layer = make_layer(T, r, d_in, d_out, dtype=dtype, seed=5)
    x = strided_like(make_x((*lead, d_in), dtype, seed=6), layout)
    options = dict(temperature=0.5, threshold=0.1, weighting=weighting)
    routing = mass_ext.route(x, layer.V, k, **options)
    grad_out = make_x((*lead, d_out), dtype, seed=7)

    def fn(x, weight, bias, U, S, V, _weights):
        return mass_ext.routed_linear(x, weight, bias, U, S, V, k, **options)

    _check_grads_against_reference(x, layer, routing.indices, routing.weights, fn, grad_out,
                                   dtype)


PREROUTED_GRAD_DTYPES = [
    # (x dtype, weights dtype)
    (torch.float32, torch.float32),
    (torch.float32, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
]


@pytest.mark.parametrize("dtypes", PREROUTED_GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES[:3], ids=str)
def test_prerouted_grads_match_reference(case, dtypes):
    lead, d_in, d_out, T, r, k, layout = case
    dtype, weights_dtype = dtypes
    layer = make_layer(T, r, d_in, d_out, dtype=dtype, seed=8)
    x = strided_like(make_x((*lead, d_in), dtype, seed=9), layout)
    g = generator(10)
    indices = torch.randint(-1, T, (*lead, k), generator=g)
    indices.reshape(-1, k)[0] = -1  # a row selecting nothing
    indices.reshape(-1, k)[-1, -1] = indices.reshape(-1, k)[-1, 0]  # a duplicate
    weights = torch.rand(*lead, k, generator=g).to(weights_dtype)
    grad_out = make_x((*lead, d_out), dtype, seed=11)

    def fn(x, weight, bias, U, S, V, w):
        return mass_ext.routed_linear(x, weight, bias, U, S, V, indices=indices, weights=w)

    _check_grads_against_reference(x, layer, indices, weights, fn, grad_out, dtype,
                                   weights_grad=True)


def test_prerouted_weights_grad_is_zero_on_dropped_slots():
    layer = make_layer(4, 3, 7, 5, seed=12)
    x = make_x((3, 7), seed=13)
    indices = torch.tensor([[0, -1], [-1, -1], [2, 2]])
    weights = torch.rand(3, 2, generator=generator(14)).requires_grad_(True)
    mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights).sum().backward()
    assert weights.grad[0, 1] == 0 and bool((weights.grad[1] == 0).all())
    assert weights.grad[0, 0] != 0
    assert weights.grad[2, 0] == weights.grad[2, 1]  # duplicate slots: same dy/dw


@pytest.mark.parametrize("which", ["x", "weight", "bias", "U", "S", "V"])
def test_single_input_requires_grad(which):
    """Backward with only one differentiable input: that gradient, nothing else."""
    layer = make_layer(4, 3, 7, 5, seed=15)
    x = make_x((6, 7), seed=16)
    tensors = dict(zip(PARAM_NAMES, (x, *layer.params)))
    tensors[which] = tensors[which].clone().requires_grad_(True)
    out = mass_ext.routed_linear(*tensors.values(), 2)
    assert out.requires_grad
    (grad,) = torch.autograd.grad(out.sum(), tensors[which])
    assert grad.shape == tensors[which].shape and bool(grad.isfinite().all())
    assert float(grad.abs().max()) > 0


def test_routing_outputs_are_not_differentiable():
    layer = make_layer(4, 3, 7, 5, seed=17).detach_requires_grad()
    x = make_x((6, 7), seed=18).requires_grad_(True)
    out, indices, weights = torch.ops.mass_ext.routed_linear(
        x, *layer.params, 2, 1.0, 0.0, "softmax")
    assert out.requires_grad
    assert not indices.requires_grad and not weights.requires_grad


@pytest.mark.parametrize("form", ["self_routed", "prerouted"])
def test_bfloat16_backward(form):
    dtype = torch.bfloat16
    T, r, d_in, d_out, k = 8, 16, 64, 65, 3
    layer = make_layer(T, r, d_in, d_out, dtype=dtype, seed=19)
    x = make_x((2, 5, d_in), dtype, seed=20)
    routing = mass_ext.route(x, layer.V, k, weighting="renormalized")
    grad_out = make_x((2, 5, d_out), dtype, seed=21)
    weights = routing.weights  # float32: routing weights keep float32 for bf16 x

    def fn(x, weight, bias, U, S, V, w):
        if form == "self_routed":
            return mass_ext.routed_linear(x, weight, bias, U, S, V, k, weighting="renormalized")
        return mass_ext.routed_linear(x, weight, bias, U, S, V, indices=routing.indices,
                                      weights=w)

    out, grads = _grads(fn, [x, *layer.params, weights], grad_out)
    assert out.dtype == dtype
    for name, grad in zip(PARAM_NAMES, grads):
        assert grad is not None and grad.dtype == dtype, (name, grad)
    if form == "prerouted":
        assert grads[6].dtype == torch.float32
    else:
        assert grads[6] is None
    _check_grads_against_reference(x, layer, routing.indices, weights, fn, grad_out, dtype,
                                   weights_grad=form == "prerouted")
