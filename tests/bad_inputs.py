"""Bad inputs and the errors they must raise: data for tests/test_bad_input.py and for
any script that renders the table (input -> error message), e.g.

    from tests.bad_inputs import CASES, run_kernel
    for case in CASES:
        try:
            run_kernel(case.build())
        except Exception as e:
            print(f"| {case.description} | {type(e).__name__}: {e} |")

Every case starts from one valid layer (N = 6 rows, d_in = 16, d_out = 5, T = 4, r = 3,
float32) and changes one thing. `substrings` must all appear in the message: the argument
name, the expected value and the actual value. `fake` says whether the check needs only
metadata (shapes, dtypes, scalars), so that the fake kernels (torch.compile, FakeTensor)
must raise it too; index values need the data and are checked by the real kernels only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import mass_ext
from mass_ext import reference

N, D_IN, D_OUT, T, R = 6, 16, 5, 4, 3


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of the public API: op is "routed_linear" or "route"; kwargs are named as
    in mass_ext.routed_linear / mass_ext.route."""

    op: str
    kwargs: dict


@dataclasses.dataclass(frozen=True)
class BadInput:
    description: str  # the input, in words
    build: Callable[[], Call]
    error: type
    substrings: tuple  # argument name, expected value, actual value
    fake: bool = True  # also raised by the fake kernels

    def __str__(self):
        return self.description


def valid(op="routed_linear", prerouted=False, **changes) -> Call:
    """A valid call with `changes` applied (None removes nothing: it sets None)."""
    g = torch.Generator().manual_seed(0)
    V = torch.linalg.qr(torch.randn(T, D_IN, R, dtype=torch.float64, generator=g)).Q
    kwargs = dict(
        x=torch.randn(N, D_IN, generator=g),
        weight=torch.randn(D_OUT, D_IN, generator=g),
        bias=torch.randn(D_OUT, generator=g),
        U=torch.randn(T, D_OUT, R, generator=g),
        S=torch.rand(T, R, generator=g),
        V=V.transpose(1, 2).contiguous().float(),
        top_k=2, temperature=1.0, threshold=0.0, weighting="uniform",
    )
    if prerouted:
        kwargs["indices"] = torch.tensor([[0, 1], [2, -1], [3, 3], [-1, -1], [1, 0], [2, 3]])
        kwargs["weights"] = torch.rand(N, 2, generator=g)
    if op == "route":
        kwargs = {k: kwargs[k] for k in ("x", "V", "top_k", "temperature", "threshold",
                                          "weighting")}
    kwargs.update(changes)
    return Call(op, kwargs)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


CASES = [
    # --- x
    BadInput("x dtype int64", lambda: valid(x=torch.ones(N, D_IN, dtype=torch.int64)),
             TypeError, ("x must be", "float32, float64, bfloat16 or float16", "got int64")),
    BadInput("route: x dtype int64",
             lambda: valid("route", x=torch.ones(N, D_IN, dtype=torch.int64)),
             TypeError, ("x must be", "float32, float64, bfloat16 or float16", "got int64")),
    BadInput("x dtype complex64", lambda: valid(x=torch.ones(N, D_IN, dtype=torch.complex64)),
             TypeError, ("x must be", "float32, float64, bfloat16 or float16", "got complex64")),
    BadInput("x dtype float8_e4m3fn",
             lambda: valid(x=torch.ones(N, D_IN).to(torch.float8_e4m3fn)),
             TypeError, ("x must be", "float32, float64, bfloat16 or float16",
                         "got float8_e4m3fn")),
    BadInput("x 0-d", lambda: valid(x=torch.tensor(1.0)),
             ValueError, ("x must have at least 1 dimension", "(..., d_in)", "got a 0-d tensor")),
    # --- V
    BadInput("V 2-D (r, d_in)", lambda: valid(V=_randn(R, D_IN)),
             ValueError, ("V must have 3 dimensions", "(T, r, d_in)", "got shape (3, 16)")),
    BadInput("route: V 4-D", lambda: valid("route", V=_randn(1, T, R, D_IN)),
             ValueError, ("V must have 3 dimensions", "(T, r, d_in)", "got shape (1, 4, 3, 16)")),
    BadInput("V d_in 17 != x d_in 16", lambda: valid(V=_randn(T, R, D_IN + 1)),
             ValueError, ("V must have shape (T, r, d_in) = (4, 3, 16)", "got (4, 3, 17)")),
    BadInput("route: V d_in 15 != x d_in 16", lambda: valid("route", V=_randn(T, R, D_IN - 1)),
             ValueError, ("V must have shape (T, r, d_in) = (4, 3, 16)", "got (4, 3, 15)")),
    BadInput("V with T = 0 tasks", lambda: valid(V=_randn(0, R, D_IN)),
             ValueError, ("V must hold at least one task", "T >= 1", "got shape (0, 3, 16)")),
    BadInput("V with rank r = 0", lambda: valid(V=_randn(T, 0, D_IN)),
             ValueError, ("V must have rank r >= 1", "got shape (4, 0, 16)")),
    BadInput("V float64, x float32", lambda: valid(V=_randn(T, R, D_IN, dtype=torch.float64)),
             TypeError, ("V must have the dtype of x", "(float32)", "got float64")),
    # --- weight, bias, U, S
    BadInput("weight (5, 15): d_in 15 != 16", lambda: valid(weight=_randn(D_OUT, D_IN - 1)),
             ValueError, ("weight must have shape (d_out, d_in) = (5, 16)", "got (5, 15)")),
    BadInput("weight 1-D", lambda: valid(weight=_randn(D_IN)),
             ValueError, ("weight must have 2 dimensions", "(d_out, d_in)", "got shape (16,)")),
    BadInput("weight bfloat16, x float32", lambda: valid(weight=_randn(D_OUT, D_IN,
                                                                     dtype=torch.bfloat16)),
             TypeError, ("weight must have the dtype of x", "(float32)", "got bfloat16")),
    BadInput("bias (6,) != d_out 5", lambda: valid(bias=_randn(D_OUT + 1)),
             ValueError, ("bias must have shape (d_out,) = (5,)", "got (6,)")),
    BadInput("bias 2-D (1, 5)", lambda: valid(bias=_randn(1, D_OUT)),
             ValueError, ("bias must have shape (d_out,) = (5,)", "got (1, 5)")),
    BadInput("U (4, 6, 3): d_out 6 != 5", lambda: valid(U=_randn(T, D_OUT + 1, R)),
             ValueError, ("U must have shape (T, d_out, r) = (4, 5, 3)", "got (4, 6, 3)")),
    BadInput("U transposed (4, 3, 5)", lambda: valid(U=_randn(T, R, D_OUT)),
             ValueError, ("U must have shape (T, d_out, r) = (4, 5, 3)", "got (4, 3, 5)")),
    BadInput("S (4, 2): r 2 != 3", lambda: valid(S=_randn(T, R - 1)),
             ValueError, ("S must have shape (T, r) = (4, 3)", "got (4, 2)")),
    BadInput("S 1-D (3,)", lambda: valid(S=_randn(R)),
             ValueError, ("S must have shape (T, r) = (4, 3)", "got (3,)")),
    BadInput("S float16, x float32", lambda: valid(S=_randn(T, R, dtype=torch.float16)),
             TypeError, ("S must have the dtype of x", "(float32)", "got float16")),
    # --- routing options
    BadInput("top_k 0", lambda: valid(top_k=0),
             ValueError, ("top_k must be in 1..T", "1..4", "got 0")),
    BadInput("top_k T + 1 = 5", lambda: valid(top_k=T + 1),
             ValueError, ("top_k must be in 1..T", "1..4", "got 5")),
    BadInput("route: top_k 0", lambda: valid("route", top_k=0),
             ValueError, ("top_k must be in 1..T", "1..4", "got 0")),
    BadInput("route: top_k T + 1 = 5", lambda: valid("route", top_k=T + 1),
             ValueError, ("top_k must be in 1..T", "1..4", "got 5")),
    BadInput("weighting 'bogus'", lambda: valid(weighting="bogus"),
             ValueError, ("weighting must be one of", "'uniform', 'softmax', 'renormalized'",
                          "got 'bogus'")),
    BadInput("route: weighting 'Softmax'", lambda: valid("route", weighting="Softmax"),
             ValueError, ("weighting must be one of", "'uniform', 'softmax', 'renormalized'",
                          "got 'Softmax'")),
    BadInput("temperature 0", lambda: valid(temperature=0.0),
             ValueError, ("temperature must be", "a finite number > 0", "got 0")),
    BadInput("temperature -1", lambda: valid(temperature=-1.0),
             ValueError, ("temperature must be", "a finite number > 0", "got -1")),
    BadInput("temperature nan", lambda: valid(temperature=float("nan")),
             ValueError, ("temperature must be", "a finite number > 0", "got nan")),
    BadInput("temperature inf", lambda: valid(temperature=float("inf")),
             ValueError, ("temperature must be", "a finite number > 0", "got inf")),
    BadInput("route: temperature -inf", lambda: valid("route", temperature=float("-inf")),
             ValueError, ("temperature must be", "a finite number > 0", "got -inf")),
    BadInput("threshold nan", lambda: valid(threshold=float("nan")),
             ValueError, ("threshold must be", "a finite number", "got nan")),
    BadInput("route: threshold inf", lambda: valid("route", threshold=float("inf")),
             ValueError, ("threshold must be", "a finite number", "got inf")),
    # --- Python types the ops' schema does not take (checked before the dispatcher,
    # whose own error is a RuntimeError quoting the schema: no fake-kernel counterpart)
    BadInput("x a list", lambda: valid(x=[[1.0] * D_IN] * N),
             TypeError, ("x must be", "a torch.Tensor", "got list"), fake=False),
    BadInput("route: V a numpy array", lambda: valid("route", V=_randn(T, R, D_IN).numpy()),
             TypeError, ("V must be", "a torch.Tensor", "got numpy.ndarray"), fake=False),
    BadInput("bias an int", lambda: valid(bias=5),
             TypeError, ("bias must be", "a torch.Tensor or None", "got int"), fake=False),
    BadInput("top_k the str '2'", lambda: valid(top_k="2"),
             TypeError, ("top_k must be", "an int", "got str '2'"), fake=False),
    BadInput("top_k 1.5", lambda: valid(top_k=1.5),
             TypeError, ("top_k must be", "an int", "got float 1.5"), fake=False),
    BadInput("top_k True", lambda: valid(top_k=True),
             TypeError, ("top_k must be", "an int", "got bool True"), fake=False),
    BadInput("route: temperature the str '1'", lambda: valid("route", temperature="1"),
             TypeError, ("temperature must be", "a number", "got str '1'"), fake=False),
    BadInput("threshold None", lambda: valid(threshold=None),
             TypeError, ("threshold must be", "a number", "got NoneType None"), fake=False),
    BadInput("weighting the int 3", lambda: valid(weighting=3),
             TypeError, ("weighting must be", "a str", "got int 3"), fake=False),
    BadInput("indices a list", lambda: valid(prerouted=True, indices=[[0, 1]] * N),
             TypeError, ("indices must be", "a torch.Tensor or None", "got list"), fake=False),
    # --- pre-routed: indices and weights
    BadInput("indices int32", lambda: valid(prerouted=True,
                                            indices=torch.zeros(N, 2, dtype=torch.int32)),
             TypeError, ("indices must be int64", "got int32")),
    BadInput("indices leading shape (5, 2), x (6, 16)",
             lambda: valid(prerouted=True, indices=torch.zeros(N - 1, 2, dtype=torch.int64),
                           weights=torch.ones(N - 1, 2)),
             ValueError, ("indices must have shape (*x.shape[:-1], k)", "x.shape[:-1] = (6,)",
                          "got (5, 2)")),
    BadInput("indices 1-D (6,)", lambda: valid(prerouted=True,
                                               indices=torch.zeros(N, dtype=torch.int64),
                                               weights=torch.ones(N)),
             ValueError, ("indices must have shape (*x.shape[:-1], k)", "x.shape[:-1] = (6,)",
                          "got (6,)")),
    BadInput("indices with k = 0 slots", lambda: valid(
                 prerouted=True, indices=torch.zeros(N, 0, dtype=torch.int64),
                 weights=torch.ones(N, 0)),
             ValueError, ("indices must have shape (*x.shape[:-1], k) with k >= 1",
                          "got (6, 0)")),
    BadInput("indices value T = 4", lambda: valid(
                 prerouted=True, indices=torch.tensor([[0, 1]] * 2 + [[2, 4]] + [[0, 1]] * 3)),
             IndexError, ("indices must hold task ids in [-1, T) = [-1, 4)", "got 4",
                          "at row 2, slot 1"), fake=False),
    BadInput("indices value -2", lambda: valid(
                 prerouted=True, indices=torch.tensor([[0, 1]] * 5 + [[-2, 1]])),
             IndexError, ("indices must hold task ids in [-1, T) = [-1, 4)", "got -2",
                          "at row 5, slot 0"), fake=False),
    BadInput("weights (6, 3) != indices (6, 2)", lambda: valid(prerouted=True,
                                                               weights=torch.ones(N, 3)),
             ValueError, ("weights must have the shape of indices (6, 2)", "got (6, 3)")),
    BadInput("weights int64", lambda: valid(prerouted=True,
                                            weights=torch.ones(N, 2, dtype=torch.int64)),
             TypeError, ("weights must be a floating tensor", "got int64")),
    BadInput("indices without weights", lambda: valid(prerouted=True, weights=None),
             ValueError, ("indices and weights must be given together", "got indices",
                          "weights=None"), fake=False),
    BadInput("weights without indices", lambda: valid(prerouted=True, indices=None),
             ValueError, ("weights and indices must be given together", "got weights",
                          "indices=None"), fake=False),
]


# ------------------------------------------------------------------------ runners

def run_kernel(call: Call):
    """The public API (the C++ kernels when the extension is built)."""
    fn = mass_ext.routed_linear if call.op == "routed_linear" else mass_ext.route
    return fn(**call.kwargs)


def run_reference(call: Call):
    fn = reference.routed_linear if call.op == "routed_linear" else reference.route
    return fn(**call.kwargs)


def run_fake(call: Call):
    """The registered op on fake tensors (what torch.compile traces): its fake kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.mass_ext
    with FakeTensorMode() as mode:
        kw = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
              for k, v in call.kwargs.items()}
        options = (kw["top_k"], kw["temperature"], kw["threshold"], kw["weighting"])
        if call.op == "route":
            return ops.route(kw["x"], kw["V"], *options)
        layer = (kw["x"], kw["weight"], kw["bias"], kw["U"], kw["S"], kw["V"])
        if kw.get("indices") is None:
            return ops.routed_linear(*layer, *options)
        return ops.routed_linear_prerouted(*layer, kw["indices"], kw["weights"])


RUNNERS = {"kernel": run_kernel, "reference": run_reference, "fake": run_fake}
