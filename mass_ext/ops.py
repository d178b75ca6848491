"""Public ops. They call the registered `torch.ops.mass_ext.*` ops (C++/CUDA kernels)
when the extension is built, and the pure-PyTorch reference otherwise. This module also
registers the fake kernels (torch.compile, meta tensors); autograd is in csrc/autograd.cpp."""
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
    check.check_tensor_types(indices=indices, weights=weights)
    check.check_indices_weights_pair(indices, weights)
    if indices is None:  # self_routed checks the rest
        return self_routed(x, weight, bias, U, S, V, top_k, temperature, threshold, weighting)[0]
    check.check_tensor_types(x=x, weight=weight, bias=bias, U=U, S=S, V=V)
    if not _LOADED:
        return reference.routed_linear(x, weight, bias, U, S, V, indices=indices, weights=weights)
    return torch.ops.mass_ext.routed_linear_prerouted(x, weight, bias, U, S, V, indices, weights)


def self_routed(x, weight, bias, U, S, V, top_k, temperature, threshold, weighting):
    """The self-routed form with the routing it used: (out, indices, weights)."""
    check.check_tensor_types(x=x, weight=weight, bias=bias, U=U, S=S, V=V)
    top_k, temperature, threshold, weighting = check.routing_options(top_k, temperature,
                                                                     threshold, weighting)
    if not _LOADED:
        return _reference_routed_linear(x, weight, bias, U, S, V, top_k, temperature, threshold,
                                        weighting)
    return torch.ops.mass_ext.routed_linear(x, weight, bias, U, S, V, top_k, temperature,
                                            threshold, weighting)


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
    check.check_tensor_types(x=x, V=V)
    top_k, temperature, threshold, weighting = check.routing_options(top_k, temperature,
                                                                     threshold, weighting)
    if not _LOADED:
        return reference.route(x, V, top_k, temperature=temperature, threshold=threshold,
                               weighting=weighting)
    return Routing(*torch.ops.mass_ext.route(x, V, top_k, temperature, threshold, weighting))


def grouped_linear(x, weights, bias, groups):
    """Row n of x times weights[groups[n]]^T, + bias: the dense GEMM of weights merged
    elsewhere (RoutedLinear's merged-weight cache). Internal; inference only.

    Args:
        x: (..., d_in) float32 / bfloat16 / float16 / float64.
        weights: G >= 1 tensors (d_out, d_in), each of x's dtype or its accumulation dtype.
        bias: (d_out,) of x's dtype, or None.
        groups: int64 of shape x.shape[:-1], values in [0, G).

    Returns: (..., d_out) in x's dtype, accumulated in float32 (float64 for float64).
    """
    if not _LOADED:
        return reference.grouped_linear(x, list(weights), bias, groups)
    return torch.ops.mass_ext._grouped_linear(x, list(weights), bias, groups)


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
# Registrations: fake kernels, and reference kernels for devices the build lacks.

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


def _fake_grouped_linear(x, weights, bias, groups):
    d_out = check.check_grouped_linear_inputs(x, weights, bias, groups)
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
        "mass_ext::route": (_fake_route, _reference_route),
        "mass_ext::routed_linear": (_fake_routed_linear, _reference_routed_linear),
        "mass_ext::routed_linear_prerouted": (_fake_prerouted, _reference_prerouted),
        "mass_ext::_grouped_linear": (_fake_grouped_linear, reference.grouped_linear),
    }
    # The ops this build has no CUDA kernel for, read before the references fill the gap.
    _NO_CUDA_KERNEL = {name for name in _OPS
                       if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")}
    # Autograd is registered in C++ (csrc/autograd.cpp), for every device (_grouped_linear:
    # a clear error when grad is needed).
    for _name, (_fake, _ref) in _OPS.items():
        torch.library.register_fake(_name, _fake)
        if _name in _NO_CUDA_KERNEL:
            torch.library.register_kernel(_name, "cuda", _ref)
    # `backend` names what runs the routed ops (the internal _grouped_linear has a CPU
    # kernel only: its one user, the merged-weight cache, runs on the CPU).
    if "mass_ext::routed_linear" in _NO_CUDA_KERNEL:
        _REFERENCE_KEYS.add("CUDA")
