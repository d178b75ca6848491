"""Pure-PyTorch MASS routing and routed linear layer, written for clarity, not speed.

It is the fallback when the C++/CUDA extension is not built, the oracle of the tests
and a baseline of the benchmarks. Everything is computed in float32 (float64 for
float64 inputs) and the output is cast back to the dtype of x. The residual is the
explicit ||x - V_t^T V_t x||, not the norm identity the kernels use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _validation as check
from .routing import Routing

STANDARDIZE_EPS = 1e-6


def power_of_two_scale(magnitude):
    """The power of two 2^m with magnitude in [2^m, 2^(m+1)), elementwise (always
    representable); 1 where magnitude is 0, inf or NaN.

    Dividing by it is exact, so it changes no bit of a computation that neither overflows
    nor underflows, and it keeps sums of squares of values up to `magnitude` in range.
    """
    mantissa, _ = torch.frexp(magnitude)  # magnitude = mantissa * 2^(m+1), mantissa in [0.5, 1)
    usable = (magnitude > 0) & magnitude.isfinite()
    return torch.where(usable, magnitude / torch.where(usable, 2 * mantissa, 1.0), 1.0)


def select_tasks(residuals, top_k, temperature, threshold, weighting):
    """Routing decision from residuals (..., T) -> (indices (..., k), weights (..., k))."""
    logits = -residuals
    # A NaN residual (non-finite row) ranks last, like -inf, so indices stay valid.
    logits = torch.where(torch.isnan(logits), float("-inf"), logits)
    T = logits.shape[-1]
    if T == 1:
        probs = torch.ones_like(logits)
    else:
        # Standardised in units of a power of two near the largest finite |logit| (exact),
        # so that the mean and the squares cannot overflow (float32 residuals > ~1e19).
        unit = power_of_two_scale(
            torch.where(logits.isfinite(), logits.abs(), 0.0).amax(dim=-1, keepdim=True))
        scaled = logits / unit
        mean = scaled.mean(dim=-1, keepdim=True)
        # Corrected two-pass variance (as the kernels): the (sum c)^2 / T term removes the
        # rounding error of `mean`, which float32 rows of large, nearly tied logits need.
        centred = scaled - mean
        var = ((centred**2).sum(dim=-1, keepdim=True)
               - centred.sum(dim=-1, keepdim=True) ** 2 / T).clamp(min=0)
        std = (var / (T - 1)).sqrt()  # unbiased
        standardized = centred / (std + STANDARDIZE_EPS / unit)
        # Shifted to max 0 before the temperature divides: finite for any temperature > 0;
        # one below the smallest positive float of the dtype acts as that one (arg-max).
        standardized = standardized - standardized.amax(dim=-1, keepdim=True)
        smallest = torch.finfo(logits.dtype).tiny * torch.finfo(logits.dtype).eps
        probs = torch.softmax(standardized / max(temperature, smallest), dim=-1)
    # A stable descending sort keeps the lower task index first among ties.
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :top_k]
    selected_probs = probs.gather(-1, order)
    keep = selected_probs > threshold
    keep[..., 0] = True  # the best task is never dropped
    indices = torch.where(keep, order, -1)
    if weighting == "uniform":
        weights = keep.to(probs.dtype)
    else:
        weights = torch.where(keep, selected_probs, 0.0)
        if weighting == "renormalized":
            # Dropped slots stay 0 even when the sum is NaN (a non-finite row).
            weights = torch.where(keep, weights / weights.sum(dim=-1, keepdim=True), 0.0)
    return indices, weights


def route(x, V, top_k=1, *, temperature=1.0, threshold=0.0, weighting="uniform") -> Routing:
    """Reference of `mass_ext.route`."""
    check.check_tensor_types(x=x, V=V)
    top_k, temperature, threshold, weighting = check.routing_options(top_k, temperature,
                                                                     threshold, weighting)
    T, _, _ = check.check_route_inputs(x, V)
    check.check_routing_options(top_k, T, temperature, threshold, weighting)
    acc = check.acc_dtype(x.dtype)
    x_acc, V_acc = x.to(acc), V.to(acc)
    # Each row in units of a power of two near its largest |x_i| (exact): the squares in
    # the norm then neither overflow (float32 rows beyond ~1e19) nor underflow (< ~1e-19).
    row_max = (x_acc.abs().amax(dim=-1, keepdim=True) if x.shape[-1]
               else x_acc.new_zeros((*x.shape[:-1], 1)))
    unit = power_of_two_scale(row_max)
    x_acc = x_acc / unit
    projections = torch.einsum("...i,tri->...tr", x_acc, V_acc)
    reconstructions = torch.einsum("...tr,tri->...ti", projections, V_acc)
    residuals = torch.linalg.vector_norm(x_acc.unsqueeze(-2) - reconstructions, dim=-1) * unit
    indices, weights = select_tasks(residuals, top_k, temperature, threshold, weighting)
    return Routing(indices, weights, residuals)


def expert_coefficients(indices, weights, T):
    """c (..., T): the total weight each task gets in each row (dropped slots give none)."""
    coefficients = weights.new_zeros((*indices.shape[:-1], T))
    kept = indices >= 0
    return coefficients.scatter_add(
        -1, indices.clamp(min=0), torch.where(kept, weights, torch.zeros_like(weights))
    )


def apply_experts(x, weight, bias, U, S, V, indices, weights):
    """y = x W^T + b + sum_t c_t U_t (S_t * V_t x), c = expert_coefficients(indices, weights)."""
    acc = check.acc_dtype(x.dtype)
    x_acc = x.to(acc)
    out = F.linear(x_acc, weight.to(acc), None if bias is None else bias.to(acc))
    coefficients = expert_coefficients(indices, weights.to(acc), V.shape[0])
    projections = torch.einsum("...i,tri->...tr", x_acc, V.to(acc))
    scaled = projections * S.to(acc) * coefficients.unsqueeze(-1)
    out = out + torch.einsum("...tr,tor->...o", scaled, U.to(acc))
    return out.to(x.dtype)


def routed_linear(x, weight, bias, U, S, V, top_k=1, *, temperature=1.0, threshold=0.0,
                  weighting="uniform", indices=None, weights=None):
    """Reference of `mass_ext.routed_linear` (self-routed, or pre-routed with indices/weights)."""
    check.check_tensor_types(indices=indices, weights=weights)
    check.check_indices_weights_pair(indices, weights)
    check.check_tensor_types(x=x, weight=weight, bias=bias, U=U, S=S, V=V)
    if indices is None:  # the routing options are read (and their types checked) only here
        top_k, temperature, threshold, weighting = check.routing_options(
            top_k, temperature, threshold, weighting)
    _, T, _, _ = check.check_layer_inputs(x, weight, bias, U, S, V)
    if indices is None:
        check.check_routing_options(top_k, T, temperature, threshold, weighting)
        indices, weights, _ = route(x, V, top_k, temperature=temperature, threshold=threshold,
                                    weighting=weighting)
    else:
        check.check_prerouted_inputs(x, indices, weights)
        check.check_index_values(indices, T)
    return apply_experts(x, weight, bias, U, S, V, indices, weights)


def grouped_linear(x, weights, bias, groups):
    """Reference of the `_grouped_linear` op: row n of x times weights[groups[n]]^T, + bias,
    in the accumulation dtype, returned in x's dtype."""
    d_out = check.check_grouped_linear_inputs(x, weights, bias, groups)
    check.check_group_values(groups, len(weights))
    acc = check.acc_dtype(x.dtype)
    rows, ids = x.reshape(-1, x.shape[-1]).to(acc), groups.reshape(-1)
    out = rows.new_empty((rows.shape[0], d_out))
    for g, weight in enumerate(weights):
        selected = (ids == g).nonzero().flatten()
        out[selected] = F.linear(rows[selected], weight.to(acc),
                                 None if bias is None else bias.to(acc))
    return out.to(x.dtype).reshape(*x.shape[:-1], d_out)


def per_task_loop(x, weight, bias, U, S, V, top_k=1, *, temperature=1.0, threshold=0.0,
                  weighting="uniform"):
    """What users write today without mass_ext: route, then one masked pass per task.

    Benchmark baseline only: a Python loop over tasks, gathering the rows that selected
    each task and adding their low-rank update with index_add_.
    """
    indices, weights, _ = route(x, V, top_k, temperature=temperature, threshold=threshold,
                                weighting=weighting)
    acc = check.acc_dtype(x.dtype)
    rows = x.reshape(-1, x.shape[-1]).to(acc)
    out = F.linear(rows, weight.to(acc), None if bias is None else bias.to(acc))
    flat_indices = indices.reshape(-1, indices.shape[-1])
    flat_weights = weights.reshape(-1, weights.shape[-1])
    for t in range(V.shape[0]):
        row_ids, slot_ids = (flat_indices == t).nonzero(as_tuple=True)
        if row_ids.numel() == 0:
            continue
        z = rows[row_ids] @ V[t].to(acc).T
        h = z * S[t].to(acc) * flat_weights[row_ids, slot_ids].unsqueeze(-1)
        out.index_add_(0, row_ids, h @ U[t].to(acc).T)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
