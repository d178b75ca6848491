"""Argument checks for the Python paths (fake kernels and the reference).

They mirror csrc/checks.cpp message for message, so an error reads the same whether the
C++ kernel, a fake tensor under torch.compile, or the pure-PyTorch fallback raised it.
They use torch._check_* so that symbolic shapes under torch.compile become guards.
Python types the ops' schema does not take (check_tensor_types, routing_options) are
checked here for every path, before the dispatcher sees them.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
WEIGHTINGS = ("uniform", "softmax", "renormalized")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(sizes) -> str:
    sizes = tuple(sizes)
    return "(" + ", ".join(str(s) for s in sizes) + ("," if len(sizes) == 1 else "") + ")"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_float_dtype(t: torch.Tensor, name: str) -> None:
    torch._check_type(
        t.dtype in FLOAT_DTYPES,
        lambda: f"{name} must be float32, float64, bfloat16 or float16, got {_dtype_name(t.dtype)}",
    )


def _check_like_x(t: torch.Tensor, name: str, x: torch.Tensor) -> None:
    torch._check_type(
        t.dtype == x.dtype,
        lambda: f"{name} must have the dtype of x ({_dtype_name(x.dtype)}), got {_dtype_name(t.dtype)}",
    )
    torch._check_value(
        t.device == x.device,
        lambda: f"{name} must be on the device of x ({x.device}), got {t.device}",
    )


def _check_shape(t: torch.Tensor, name: str, symbolic: str, expected) -> None:
    expected = tuple(expected)
    torch._check_value(
        t.dim() == len(expected) and all(a == b for a, b in zip(t.shape, expected)),
        lambda: f"{name} must have shape {symbolic} = {_shape(expected)}, got {_shape(t.shape)}",
    )


def _type_name(value) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# What the ops' schema accepts for its number arguments, checked before the dispatcher
# sees them (its own error is a RuntimeError quoting the whole schema). A bool top_k is
# refused too (True would silently mean 1).
def _is_int(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and value.dtype != torch.bool and not value.is_complex()
    return (isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat))
            and not isinstance(value, bool))


_OPTIONAL_TENSORS = ("bias", "indices", "weights")


def check_tensor_types(**arguments) -> None:
    """The public ops' tensor arguments (named as in mass_ext.routed_linear and
    mass_ext.route) are tensors, the optional ones (bias, indices, weights) or None."""
    for name, value in arguments.items():
        if not isinstance(value, torch.Tensor) and not (value is None and name in _OPTIONAL_TENSORS):
            expected = "a torch.Tensor or None" if name in _OPTIONAL_TENSORS else "a torch.Tensor"
            raise TypeError(f"{name} must be {expected}, got {_type_name(value)}")


def check_option_types(**options) -> None:
    """top_k an int (not a bool), temperature and threshold numbers, weighting a str."""
    for name, value in options.items():
        if name == "top_k":
            ok, expected = _is_int(value), "an int"
        elif name == "weighting":
            ok, expected = isinstance(value, str), "a str"
        else:
            ok, expected = _is_number(value), "a number (float)"
        if not ok:
            raise TypeError(f"{name} must be {expected}, got {_type_name(value)} {value!r}")


def routing_options(top_k, temperature, threshold, weighting) -> tuple:
    """The routing options, type-checked, as the Python int / floats the ops' schema and
    the range checks take (a numpy integer, a Fraction or a 0-d tensor converted; a
    symbolic number under torch.compile kept)."""
    check_option_types(top_k=top_k, temperature=temperature, threshold=threshold,
                       weighting=weighting)
    if not isinstance(top_k, torch.SymInt):
        top_k = int(top_k)
    temperature, threshold = (v if isinstance(v, (torch.SymInt, torch.SymFloat)) else float(v)
                              for v in (temperature, threshold))
    return top_k, temperature, threshold, weighting


def check_route_inputs(x: torch.Tensor, V: torch.Tensor):
    """Returns (T, r, d_in)."""
    _check_float_dtype(x, "x")
    torch._check_value(
        x.dim() >= 1, lambda: "x must have at least 1 dimension (..., d_in), got a 0-d tensor"
    )
    torch._check_value(
        V.dim() == 3,
        lambda: f"V must have 3 dimensions (T, r, d_in), got shape {_shape(V.shape)}",
    )
    _check_like_x(V, "V", x)
    d_in = x.shape[-1]
    T, r = V.shape[0], V.shape[1]
    torch._check_value(
        T >= 1, lambda: f"V must hold at least one task (T >= 1), got shape {_shape(V.shape)}"
    )
    torch._check_value(r >= 1, lambda: f"V must have rank r >= 1, got shape {_shape(V.shape)}")
    _check_shape(V, "V", "(T, r, d_in)", (T, r, d_in))
    return T, r, d_in


def check_layer_inputs(x, weight, bias, U, S, V):
    """Returns (d_out, T, r, d_in)."""
    T, r, d_in = check_route_inputs(x, V)
    torch._check_value(
        weight.dim() == 2,
        lambda: f"weight must have 2 dimensions (d_out, d_in), got shape {_shape(weight.shape)}",
    )
    _check_like_x(weight, "weight", x)
    d_out = weight.shape[0]
    _check_shape(weight, "weight", "(d_out, d_in)", (d_out, d_in))
    if bias is not None:
        _check_like_x(bias, "bias", x)
        _check_shape(bias, "bias", "(d_out,)", (d_out,))
    _check_like_x(U, "U", x)
    _check_shape(U, "U", "(T, d_out, r)", (T, d_out, r))
    _check_like_x(S, "S", x)
    _check_shape(S, "S", "(T, r)", (T, r))
    return d_out, T, r, d_in


def check_routing_options(top_k, T, temperature, threshold, weighting) -> tuple:
    """Types and ranges of the routing options; returns them as routing_options does."""
    top_k, temperature, threshold, weighting = routing_options(top_k, temperature, threshold,
                                                               weighting)
    torch._check_value(
        1 <= top_k <= T, lambda: f"top_k must be in 1..T = 1..{T}, got {top_k}"
    )
    torch._check_value(
        math.isfinite(temperature) and temperature > 0,
        lambda: f"temperature must be a finite number > 0, got {temperature}",
    )
    torch._check_value(
        math.isfinite(threshold), lambda: f"threshold must be a finite number, got {threshold}"
    )
    torch._check_value(
        weighting in WEIGHTINGS,
        lambda: "weighting must be one of 'uniform', 'softmax', 'renormalized', "
        f"got '{weighting}'",
    )
    return top_k, temperature, threshold, weighting


def check_prerouted_inputs(x, indices, weights) -> None:
    torch._check_type(
        indices.dtype == torch.int64,
        lambda: f"indices must be int64, got {_dtype_name(indices.dtype)}",
    )
    torch._check_value(
        indices.device == x.device,
        lambda: f"indices must be on the device of x ({x.device}), got {indices.device}",
    )
    lead = tuple(x.shape[:-1])
    torch._check_value(
        indices.dim() == x.dim()
        and indices.shape[-1] >= 1
        and all(a == b for a, b in zip(indices.shape[:-1], lead)),
        lambda: "indices must have shape (*x.shape[:-1], k) with k >= 1, where "
        f"x.shape[:-1] = {_shape(lead)}, got {_shape(indices.shape)}",
    )
    torch._check_type(
        weights.is_floating_point(),
        lambda: f"weights must be a floating tensor, got {_dtype_name(weights.dtype)}",
    )
    torch._check_value(
        weights.device == x.device,
        lambda: f"weights must be on the device of x ({x.device}), got {weights.device}",
    )
    torch._check_value(
        weights.shape == indices.shape,
        lambda: f"weights must have the shape of indices {_shape(indices.shape)}, "
        f"got {_shape(weights.shape)}",
    )


def check_grouped_linear_inputs(x, weights, bias, groups) -> int:
    """_grouped_linear's inputs (csrc/checks.cpp). Returns d_out."""
    _check_float_dtype(x, "x")
    torch._check_value(
        x.dim() >= 1, lambda: "x must have at least 1 dimension (..., d_in), got a 0-d tensor")
    torch._check_value(
        len(weights) >= 1, lambda: "weights must hold at least one (d_out, d_in) weight, got none")
    d_in, d_out = x.shape[-1], weights[0].shape[0] if weights[0].dim() == 2 else -1
    acc = acc_dtype(x.dtype)
    for g, w in enumerate(weights):
        torch._check_type(
            w.dtype in (x.dtype, acc),
            lambda: f"weights[{g}] must have the dtype of x ({_dtype_name(x.dtype)}) or its "
                    f"accumulation dtype ({_dtype_name(acc)}), got {_dtype_name(w.dtype)}")
        torch._check_value(
            w.device == x.device,
            lambda: f"weights[{g}] must be on the device of x ({x.device}), got {w.device}")
        torch._check_value(
            w.dim() == 2 and w.shape[0] == d_out and w.shape[1] == d_in,
            lambda: f"weights[{g}] must have shape (d_out, d_in) = ({d_out}, {d_in}) (d_out "
                    f"from weights[0], d_in from x), got {_shape(w.shape)}")
    if bias is not None:
        _check_like_x(bias, "bias", x)
        _check_shape(bias, "bias", "(d_out,)", (d_out,))
    torch._check_type(
        groups.dtype == torch.int64,
        lambda: f"groups must be int64, got {_dtype_name(groups.dtype)}")
    torch._check_value(
        groups.device == x.device,
        lambda: f"groups must be on the device of x ({x.device}), got {groups.device}")
    lead = tuple(x.shape[:-1])
    torch._check_value(
        groups.dim() == len(lead) and all(a == b for a, b in zip(groups.shape, lead)),
        lambda: f"groups must have shape x.shape[:-1] = {_shape(lead)}, got {_shape(groups.shape)}")
    return d_out


def check_group_values(groups: torch.Tensor, G: int) -> None:
    """Eager-only (reads the data): every group id in [0, G)."""
    bad = (groups < 0) | (groups >= G)
    if bool(bad.any()):
        row = int(bad.reshape(-1).nonzero()[0])
        raise IndexError(f"groups must hold indices into weights in [0, G) = [0, {G}), got "
                         f"{int(groups.reshape(-1)[row])} at row {row}")


def check_index_values(indices: torch.Tensor, T: int, name: str = "indices",
                       row: str = "row") -> None:
    """Eager-only (reads the data): every index in [-1, T); the first one out of range
    named by its `row` (a row of x; a sample, for a per-sample routing) and slot."""
    bad = (indices < -1) | (indices >= T)
    if bool(bad.any()):
        pos = bad.reshape(-1, indices.shape[-1]).nonzero()[0].tolist()
        value = int(indices.reshape(-1, indices.shape[-1])[pos[0], pos[1]])
        raise IndexError(
            f"{name} must hold task ids in [-1, T) = [-1, {T}), got {value} "
            f"at {row} {pos[0]}, slot {pos[1]}"
        )


def check_indices_weights_pair(indices, weights) -> None:
    if (indices is None) != (weights is None):
        given, missing = ("indices", "weights") if weights is None else ("weights", "indices")
        raise ValueError(
            f"{given} and {missing} must be given together (pre-routed form): "
            f"got {given} but {missing}=None"
        )
