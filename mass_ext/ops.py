"""Public ops. They call the registered `torch.ops.mass_ext.*` ops (C++/CUDA kernels)
when the extension is built, and the pure-PyTorch reference otherwise. This module also
registers the fake kernels (torch.compile, meta tensors) and the autograd formulas."""
from __future__ import annotations

import torch

from . import _validation as check
from . import reference
from .routing import Routing

_LOADED = hasattr(torch.ops.mass_ext, "routed_linear")


def routed_linear(x, weight, bias, U, S, V, top_k=1, *, temperature=1.0, threshold=0.0,
                  weighting="uniform", indices=None, weights=None):
    """Linear layer plus the low-rank update of the task subspace(s) each row selects.

    Semantics (per row x of the leading dims; c_t = total weight of the slots selecting t):
        indices, weights = route(x, V, top_k, ...)          # unless given (pre-routed)
        y = F.linear(x, weight, bias)
            + sum_t c_t * U[t] @ (S[t] * (V[t] @ x))

    Args:
        x: (..., d_in) float32 / bfloat16 / float16 / float64, any layout.
        weight: (d_out, d_in) base weight W0, dtype of x.
        bias: (d_out,) or None.
        U: (T, d_out, r) left singular vectors of each task delta.
        S: (T, r) singular values.
        V: (T, r, d_in) right singular vectors; rows of each V[t] orthonormal.
        top_k: number of tasks per row, 1..T (self-routed form).
        temperature: > 0, softmax temperature over the standardised logits.
        threshold: a selected task other than the best is dropped when its p <= threshold.
        weighting: "uniform" (1), "softmax" (p_t) or "renormalized" (p_t / sum of kept p).
        indices, weights: (..., k) int64 task ids (-1 = none) and their weights: the
            pre-routed form; routing arguments are then ignored.

    Returns: (..., d_out), dtype of x. Accumulation is float32 (float64 for float64).
    Gradients flow to x, weight, bias, U, S, V (and `weights` in the pre-routed form)
    through the selected tasks; the routing decision itself is a constant.
    """
    check.check_indices_weights_pair(indices, weights)
    if not _LOADED:
        return reference.routed_linear(x, weight, bias, U, S, V, top_k, temperature=temperature,
                                       threshold=threshold, weighting=weighting,
                                       indices=indices, weights=weights)
    if indices is None:
        return torch.ops.mass_ext.routed_linear(x, weight, bias, U, S, V, top_k, temperature,
                                                threshold, weighting)[0]
    return torch.ops.mass_ext.routed_linear_prerouted(x, weight, bias, U, S, V, indices, weights)


def route(x, V, top_k=1, *, temperature=1.0, threshold=0.0, weighting="uniform") -> Routing:
    """Routes every row of x to the task subspaces that best explain it.

    Semantics (per row x, T tasks):
        res_t = ||x - V[t].T @ V[t] @ x||
        p = softmax(standardize(-res) / temperature)   # standardize: (l - mean) / (std + 1e-6)
        indices = the top_k tasks by -res (ties -> lower task id); a slot j >= 1 whose
                  p <= threshold becomes -1
        weights = 1 | p_t | p_t / sum(kept p)          # weighting, 0 for dropped slots

    Args: as in `routed_linear`. Returns `Routing(indices (..., k) int64,
    weights (..., k), residuals (..., T))`, weights/residuals in float32 (float64 for
    float64 x). Not differentiable.
    """
    if not _LOADED:
        return reference.route(x, V, top_k, temperature=temperature, threshold=threshold,
                               weighting=weighting)
    return Routing(*torch.ops.mass_ext.route(x, V, top_k, temperature, threshold, weighting))


def backend(device="cpu") -> str:
    """Which implementation runs for tensors on `device`: "cpp" (C++ CPU kernel),
    "cuda" (CUDA kernel) or "reference" (pure PyTorch)."""
    device = torch.device(device)
    if not _LOADED:
        return "reference"
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None or key in _REFERENCE_KEYS:
        return "reference"
    return "cpp" if key == "CPU" else "cuda"


# ---------------------------------------------------------------------------------------
# Registrations: fake kernels, autograd, reference kernels for devices the build lacks.

def _expert_backward(ctx, grad_out, x, weight, U, S, V, indices, weights):
    """Gradients of y = x W^T + b + sum_t c_t U_t (S_t * V_t x) for a fixed routing.

    Dense over tasks (c_t = 0 for tasks a row did not select): O(N * T * r) memory."""
    need_x, need_w, need_b, need_U, need_S, need_V = ctx.needs_input_grad[:6]
    acc = check.acc_dtype(x.dtype)
    d_in, d_out, T = x.shape[-1], weight.shape[0], V.shape[0]
    g = grad_out.reshape(-1, d_out).to(acc)
    rows = x.reshape(-1, d_in).to(acc)
    U_acc, S_acc, V_acc = U.to(acc), S.to(acc), V.to(acc)
    coefficients = reference.expert_coefficients(
        indices.reshape(-1, indices.shape[-1]), weights.reshape(-1, weights.shape[-1]).to(acc), T
    ).unsqueeze(-1)                                           # (N, T, 1)
    z = torch.einsum("ni,tri->ntr", rows, V_acc)               # V_t x
    a = torch.einsum("no,tor->ntr", g, U_acc)                  # U_t^T g
    grads = {}
    if need_x:
        dz = a * coefficients * S_acc
        grads["x"] = (g @ weight.to(acc) + torch.einsum("ntr,tri->ni", dz, V_acc)).reshape(x.shape)
    if need_w:
        grads["weight"] = g.T @ rows
    if need_b:
        grads["bias"] = g.sum(0)
    if need_U:
        grads["U"] = torch.einsum("no,ntr->tor", g, coefficients * S_acc * z)
    if need_S:
        grads["S"] = (coefficients * a * z).sum(0)
    if need_V:
        grads["V"] = torch.einsum("ntr,ni->tri", a * coefficients * S_acc, rows)
    # d y / d w_j = <U_t^T g, S_t * V_t x> at t = indices[j]; 0 for dropped slots.
    per_task = (a * S_acc * z).sum(-1)                         # (N, T)
    flat_indices = indices.reshape(-1, indices.shape[-1])
    slot_grads = per_task.gather(-1, flat_indices.clamp(min=0))
    grads["weights"] = torch.where(flat_indices >= 0, slot_grads, 0.0).reshape(indices.shape)
    originals = {"x": x, "weight": weight, "bias": weight, "U": U, "S": S, "V": V,
                 "weights": weights}
    return {k: v.to(originals[k].dtype) for k, v in grads.items()}


def _setup_self_routed(ctx, inputs, output):
    x, weight, bias, U, S, V = inputs[:6]
    _, indices, weights = output
    ctx.save_for_backward(x, weight, U, S, V, indices, weights)
    ctx.mark_non_differentiable(indices, weights)


def _backward_self_routed(ctx, grad_out, _grad_indices, _grad_weights):
    x, weight, U, S, V, indices, weights = ctx.saved_tensors
    g = _expert_backward(ctx, grad_out, x, weight, U, S, V, indices, weights)
    return (g.get("x"), g.get("weight"), g.get("bias"), g.get("U"), g.get("S"), g.get("V"),
            None, None, None, None)


def _setup_prerouted(ctx, inputs, output):
    x, weight, bias, U, S, V, indices, weights = inputs
    ctx.save_for_backward(x, weight, U, S, V, indices, weights)


def _backward_prerouted(ctx, grad_out):
    x, weight, U, S, V, indices, weights = ctx.saved_tensors
    g = _expert_backward(ctx, grad_out, x, weight, U, S, V, indices, weights)
    grad_weights = g["weights"].to(weights.dtype) if ctx.needs_input_grad[7] else None
    return (g.get("x"), g.get("weight"), g.get("bias"), g.get("U"), g.get("S"), g.get("V"),
            None, grad_weights)


def _fake_route(x, V, top_k, temperature, threshold, weighting):
    T, _, _ = check.check_route_inputs(x, V)
    check.check_routing_options(top_k, T, temperature, threshold, weighting)
    lead, acc = tuple(x.shape[:-1]), check.acc_dtype(x.dtype)
    return (x.new_empty((*lead, top_k), dtype=torch.int64), x.new_empty((*lead, top_k), dtype=acc),
            x.new_empty((*lead, T), dtype=acc))


def _fake_routed_linear(x, weight, bias, U, S, V, top_k, temperature, threshold, weighting):
    d_out, T, _, _ = check.check_layer_inputs(x, weight, bias, U, S, V)
    check.check_routing_options(top_k, T, temperature, threshold, weighting)
    lead, acc = tuple(x.shape[:-1]), check.acc_dtype(x.dtype)
    return (x.new_empty((*lead, d_out)), x.new_empty((*lead, top_k), dtype=torch.int64),
            x.new_empty((*lead, top_k), dtype=acc))


def _fake_prerouted(x, weight, bias, U, S, V, indices, weights):
    d_out, _, _, _ = check.check_layer_inputs(x, weight, bias, U, S, V)
    check.check_prerouted_inputs(x, indices, weights)
    return x.new_empty((*x.shape[:-1], d_out))


# Reference kernels with the ops' exact signatures, for devices the build has no kernel for.
def _reference_route(x, V, top_k, temperature, threshold, weighting):
    return tuple(reference.route(x, V, top_k, temperature=temperature, threshold=threshold,
                                 weighting=weighting))


def _reference_routed_linear(x, weight, bias, U, S, V, top_k, temperature, threshold, weighting):
    indices, weights, _ = _reference_route(x, V, top_k, temperature, threshold, weighting)
    return reference.apply_experts(x, weight, bias, U, S, V, indices, weights), indices, weights


def _reference_prerouted(x, weight, bias, U, S, V, indices, weights):
    return reference.routed_linear(x, weight, bias, U, S, V, indices=indices, weights=weights)


_REFERENCE_KEYS = set()

if _LOADED:
    _OPS = {
        "mass_ext::route": (_fake_route, _reference_route, None),
        "mass_ext::routed_linear": (_fake_routed_linear, _reference_routed_linear,
                                    (_backward_self_routed, _setup_self_routed)),
        "mass_ext::routed_linear_prerouted": (_fake_prerouted, _reference_prerouted,
                                              (_backward_prerouted, _setup_prerouted)),
    }
    for _name, (_fake, _ref, _autograd) in _OPS.items():
        torch.library.register_fake(_name, _fake)
        if _autograd is not None:
            torch.library.register_autograd(_name, _autograd[0], setup_context=_autograd[1])
        if not torch._C._dispatch_has_kernel_for_dispatch_key(_name, "CUDA"):
            torch.library.register_kernel(_name, "cuda", _ref)
            _REFERENCE_KEYS.add("CUDA")
