"""Property tests (hypothesis): the kernels against the reference over random shapes
(0 and 1 included), dtypes, routing options and, above all, values.

Every example draws a layer and, for each row of x, a value class: the row is g * 2^e,
g random at unit scale, e from SCALES (normal; small and tiny, ~1e-18 and ~1e-30 in
float32; big, huge and near the largest float, ~1e18, ~1e30, ~3e35; denormal; "beyond":
a norm past the largest float), or a zero row, or an exact copy of an earlier row.
Optionally two tasks share V (every row ties them exactly), and x gets a strided layout.
In "exact" examples every value is a small dyadic rational and V a signed permutation,
so that every product and sum is exact: there, identical rows and tied tasks must agree
to the bit (elsewhere BLAS may round identical rows differently, see the README).

What must hold (README, "Details that matter"):
* routing: residuals, indices and weights match the reference (helpers: documented ties
  and threshold decisions only), and the indices are DESIGN.md's selection applied to the
  kernel's own residuals, ties to the lower task id;
* scale: a finite row whose norm the accumulation dtype can hold is routed like its
  unit-scale copy g: residuals exactly 2^e times g's for e > 0 (nothing can underflow),
  within the residual tolerance of g's for e < 0 (denormal rows excepted: x itself has
  lost bits there); this is what catches ||x||^2 overflowing near 1e19 (float32);
* outputs, row by row, against the float64 oracle with the kernel's routing;
* identical rows get identical routing (bitwise in exact examples, else up to near-ties)
  and, in exact examples, identical outputs;
* a row beyond the largest norm gets a valid routing (indices in [-1, T), first slot
  kept, no task twice) and leaves the other rows alone; nothing more is promised.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mass_ext
from mass_ext import reference
from mass_ext.routing import Routing

from .helpers import (
    Layer,
    assert_close_to_oracle,
    assert_routing_self_consistent,
    assert_same_routing,
    check_route_against_reference,
    generator,
    make_layer,
    oracle_and_baseline,
    orthonormal_rows,
    res2_tol,
    strided_like,
    tol,
)

pytestmark = pytest.mark.skipif(mass_ext.backend() != "cpp", reason="C++ extension not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
WEIGHTINGS = ["uniform", "softmax", "renormalized"]

# Row value classes: the exponent e of x_row = g * 2^e. The accumulation dtype's squares
# overflow for ||x|| beyond 2^64 (float32, bfloat16) or 2^512 (float64) and lose bits to
# underflow below ~2^-63 (2^-511), so each side of both limits is drawn.
SCALES = {
    torch.float32: dict(normal=0, small=-60, tiny=-100, big=60, huge=100, near_max=118,
                        denormal=-140, beyond=126),
    torch.bfloat16: dict(normal=0, small=-60, tiny=-100, big=60, huge=100, near_max=118,
                         denormal=-126, beyond=126),
    torch.float64: dict(normal=0, small=-400, tiny=-600, big=300, huge=520, near_max=1000,
                        denormal=-1060, beyond=1022),
}
CLASSES = ["normal", "small", "tiny", "big", "huge", "near_max", "denormal", "beyond", "zero",
           "copy"]
# float64 rows this large square past float64: the float64 helpers cannot judge them at
# their own scale; they are judged through their unit-scale copies.
HELPER_MAX_EXPONENT = 500

# derandomize: the same examples every run (CI is reproducible); about 25 s on 2 cores.
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scenarios(draw):
    """A layer, options and a row plan; `build` makes the tensors from the seed."""
    dtype = draw(st.sampled_from(DTYPES))
    d_in = draw(st.integers(0, 40))
    T = draw(st.integers(1, 6))
    # r < d_in: at r = d_in every residual is 0 up to rounding and p is noise by design.
    r = draw(st.integers(1, max(1, d_in - 1))) if d_in else draw(st.integers(1, 3))
    n = draw(st.integers(0, 12))
    plan = []  # per row: (class, row it copies or None); a copy has its source's class
    for row in range(n):
        kind = draw(st.sampled_from(CLASSES if row else CLASSES[:-1]))
        if kind == "copy":
            source = draw(st.integers(0, row - 1))
            plan.append((plan[source][0], source))
        else:
            plan.append((kind, None))
    return dict(
        dtype=dtype, d_in=d_in, d_out=draw(st.integers(0, 40)), T=T, r=r, plan=plan,
        lead=draw(st.sampled_from([(n,), (1, n), (n, 1)] + ([()] if n == 1 else []))),
        k=draw(st.integers(1, T)),
        weighting=draw(st.sampled_from(WEIGHTINGS)),
        temperature=draw(st.sampled_from([1e-44, 1e-30, 0.05, 0.25, 1.0, 4.0, 1e30])),
        threshold=draw(st.sampled_from([-1.0, 0.0, 0.05, 0.2, 0.5, 0.99])),
        bias=draw(st.booleans()),
        shared_task=draw(st.booleans()) and T >= 2 and d_in > 0,
        exact=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "transposed", "column_slice"])),
        seed=draw(st.integers(0, 2**16)),
    )


def exact_layer(s) -> Layer:
    """Dyadic weights (multiples of 1/16, |w| <= 1/4) and V a signed permutation per task:
    every product and sum in the op is exact, whatever the order."""
    T, r, d_in, d_out, gen = s["T"], s["r"], s["d_in"], s["d_out"], generator(s["seed"])

    def dyadic(*shape, low=-4, high=4):
        return torch.randint(low, high + 1, shape, generator=gen).double() / 16

    V = torch.zeros(T, r, d_in, dtype=torch.float64)
    for t in range(T):
        columns = torch.randperm(d_in, generator=gen)[:r]
        signs = torch.randint(0, 2, (r,), generator=gen).double() * 2 - 1
        V[t, torch.arange(r), columns] = signs
    return Layer(dyadic(d_out, d_in), dyadic(d_out) if s["bias"] else None,
                 dyadic(T, d_out, r), dyadic(T, r, low=1, high=16), V)


def build(s):
    """(x, g, layer, exponents): x as planned, g the same rows at unit scale (exact copies
    x * 2^-e of the rows that have one), e per row (None: no unit-scale copy)."""
    dtype, d_in, T, r, n = s["dtype"], s["d_in"], s["T"], s["r"], len(s["plan"])
    if d_in == 0:
        one = make_layer(T, 1, 1, s["d_out"], dtype=torch.float64, bias=s["bias"], seed=s["seed"])
        layer = Layer(one.weight[:, :0], one.bias, one.U.expand(T, s["d_out"], r),
                      one.S.expand(T, r), torch.zeros(T, r, 0, dtype=torch.float64))
    elif s["exact"]:
        layer = exact_layer(s)
    else:
        layer = make_layer(T, r, d_in, s["d_out"], dtype=torch.float64, bias=s["bias"],
                           seed=s["seed"], V=orthonormal_rows(T, r, d_in, s["seed"]))
    if s["shared_task"]:
        layer.V[T - 1] = layer.V[0]  # tasks 0 and T - 1 tie on every row
    layer = layer.to(dtype)

    gen = generator(s["seed"] + 1)
    if s["exact"]:  # integers * 2^-4: exact at every scale drawn, denormals included
        base = torch.randint(-8, 9, (n, d_in), generator=gen).double() / 16
    else:
        base = torch.randn(n, d_in, dtype=torch.float64, generator=gen)
    x64 = torch.zeros(n, d_in, dtype=torch.float64)
    exponents = []
    for row, (kind, _) in enumerate(s["plan"]):
        e = SCALES[dtype].get(kind, 0)
        if kind == "beyond":  # |x_i| < 2^127.6 * (1 or 1/2): finite in every dtype
            base[row] = base[row].clamp(-3, 3) / (2 if dtype == torch.float64 else 1)
        if kind != "zero":
            x64[row] = base[row] * 2.0**e
        exponents.append(None if kind in ("denormal", "beyond") else e)
    x = x64.to(dtype)
    for row, (_, source) in enumerate(s["plan"]):
        if source is not None:
            x[row] = x[source]
    g = x.clone()
    for row, e in enumerate(exponents):
        if e:
            g[row] = (x[row].to(torch.float64) * 2.0**-e).to(dtype)  # exact: a power of two
    shape = (*s["lead"], d_in)
    return (strided_like(x.reshape(shape), s["layout"]),
            strided_like(g.reshape(shape), s["layout"]), layer, exponents)


def flat(t):
    """(..., m) -> (rows, m); explicit row count: reshape(-1, 0) is ambiguous."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def rows_of(routing, mask):
    return Routing(*(flat(t)[mask] for t in routing))


def mask_of(s, keep):
    return torch.tensor([keep(kind, row) for row, (kind, _) in enumerate(s["plan"])],
                        dtype=torch.bool)


def same_bits(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def identical_row_pairs(x):
    xs = flat(x)
    return [(i, j) for j in range(xs.shape[0]) for i in range(j) if torch.equal(xs[i], xs[j])]


def assert_scale_equivariant(got, unit, exponents, g, V):
    """Each row with a unit-scale copy has that copy's residuals times 2^e: exactly for
    e > 0, within the residual tolerance of the copy for e < 0."""
    res, res_unit = flat(got.residuals).double(), flat(unit.residuals).double()
    tau = flat(res2_tol(g, V)) if res.numel() else res
    for row, e in enumerate(exponents):
        if e is None or e == 0:
            continue
        scaled = res[row] * 2.0**-e
        if e > 0:
            assert torch.equal(scaled, res_unit[row]), (
                f"row {row} (x 2^{e}): residuals {scaled.tolist()} != {res_unit[row].tolist()}")
        else:
            diff = (scaled.pow(2) - res_unit[row].pow(2)).abs()
            assert bool((diff <= tau[row]).all()), (
                f"row {row} (x 2^{e}): residuals {scaled.tolist()} vs {res_unit[row].tolist()}")


def assert_row_output(out, x, layer, indices, weights, e, what):
    """One row's output against the float64 oracle (helpers.assert_output_matches). For a
    row scaled up by 2^e the comparison is made on everything times 2^-e (exact): the
    helpers' floor is in units of the inputs' scale, 1 at unit scale, and the output can
    be far below its terms (~2^e each) when they cancel."""
    oracle, baseline = oracle_and_baseline(x, layer, indices, weights)
    unit = 2.0**-e if e and e > 0 else 1.0
    assert_close_to_oracle((out.double() * unit).to(out.dtype), oracle * unit,
                           (baseline.double() * unit).to(out.dtype), out.dtype, what)


def check_beyond_rows(got, mask, T, k):
    """Rows past the largest norm: a valid routing, nothing more."""
    idx = flat(got.indices)[mask]
    assert bool(((idx >= -1) & (idx < T)).all()) and bool((idx[:, 0] >= 0).all())
    for a in range(k):
        for b in range(a + 1, k):
            assert not bool(((idx[:, a] >= 0) & (idx[:, a] == idx[:, b])).any())


@settings(max_examples=800, **FUZZ)
@given(s=scenarios())
def test_fuzz_self_routed_and_route(s):
    x, g, layer, exponents = build(s)
    k, dtype = s["k"], s["dtype"]
    options = dict(temperature=s["temperature"], threshold=s["threshold"],
                   weighting=s["weighting"])
    got = mass_ext.route(x, layer.V, k, **options)
    out, indices, weights = torch.ops.mass_ext.routed_linear(
        x, *layer.params, k, s["temperature"], s["threshold"], s["weighting"])
    # Same projections, same routing code: the fused op decides exactly like `route`.
    assert torch.equal(indices, got.indices) and same_bits(weights, got.weights)
    assert same_bits(mass_ext.routed_linear(x, *layer.params, k, **options), out)
    assert out.shape == (*x.shape[:-1], layer.d_out) and out.dtype == dtype

    in_range = mask_of(s, lambda kind, row: kind != "beyond")
    check_beyond_rows(got, ~in_range, layer.T, k)
    if not bool(in_range.any()):
        return
    assert bool(flat(got.residuals)[in_range].isfinite().all()), "finite row, non-finite residual"
    assert_routing_self_consistent(rows_of(got, in_range), k, **options)

    # Against the reference at the rows' own scale, where the float64 helpers can judge.
    limit = HELPER_MAX_EXPONENT if dtype == torch.float64 else math.inf
    judged = in_range & mask_of(s, lambda kind, row: (exponents[row] or 0) < limit)
    if bool(judged.any()):
        check_route_against_reference(flat(x)[judged], layer.V, k, **options,
                                      got=rows_of(got, judged))
    # Every in-range row through its unit-scale copy, kernel and reference alike.
    unit = mass_ext.route(g, layer.V, k, **options)
    assert_scale_equivariant(got, unit, exponents, g, layer.V)
    check_route_against_reference(flat(g)[in_range], layer.V, k, **options,
                                  got=rows_of(unit, in_range))
    assert_scale_equivariant(reference.route(x, layer.V, k, **options),
                             reference.route(g, layer.V, k, **options), exponents, g, layer.V)

    xs, outs, idx, w = flat(x), flat(out), flat(got.indices), flat(got.weights)
    for row in in_range.nonzero().flatten().tolist():
        assert_row_output(outs[row:row + 1], xs[row:row + 1], layer, idx[row:row + 1],
                          w[row:row + 1], exponents[row], f"row {row} ({s['plan'][row][0]})")

    for i, j in identical_row_pairs(x):
        if s["exact"]:
            for name, t in dict(got._asdict(), out=out).items():
                assert same_bits(flat(t)[i], flat(t)[j]), f"{name}: rows {i} and {j} of x are equal"
        elif bool(judged[i]):
            # BLAS may round identical rows differently: identical up to near-ties.
            assert_same_routing(rows_of(got, [j]), rows_of(got, [i]),
                                flat(got.residuals)[i:i + 1], tol(dtype).probs,
                                res2_tol=res2_tol(xs[i:i + 1], layer.V), **options)


@settings(max_examples=500, **FUZZ)
@given(s=scenarios(), pattern=st.sampled_from(["random", "none", "duplicates", "routed"]),
       weights_dtype=st.sampled_from(["x", "float32"]))
def test_fuzz_prerouted(s, pattern, weights_dtype):
    x, _, layer, exponents = build(s)
    lead, T, k = tuple(x.shape[:-1]), layer.T, s["k"]
    gen = generator(s["seed"] + 2)
    if pattern == "routed":  # the routing the kernel itself chose
        routing = mass_ext.route(x, layer.V, k, weighting="softmax")
        indices, weights = routing.indices, routing.weights
    else:
        indices = torch.randint(-1, T, (*lead, k), generator=gen)
        if pattern == "none":
            indices[..., ::2] = -1
        elif pattern == "duplicates":
            indices[..., -1] = indices[..., 0]
        weights = torch.randint(-2, 5, (*lead, k), generator=gen).double() / 4  # signs, zeros
    # A row of x that copies another gets its routing too, so their outputs must agree.
    fi, fw = flat(indices).clone(), flat(weights).clone()
    for row, (_, source) in enumerate(s["plan"]):
        if source is not None:
            fi[row], fw[row] = fi[source], fw[source]
    indices = fi.reshape(indices.shape)
    weights = fw.reshape(weights.shape).to(s["dtype"] if weights_dtype == "x" else torch.float32)

    out = mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights)
    assert out.shape == (*lead, layer.d_out) and out.dtype == s["dtype"]
    xs, outs, idx, w = flat(x), flat(out), flat(indices), flat(weights)
    for row, (kind, _) in enumerate(s["plan"]):
        if kind != "beyond":
            assert_row_output(outs[row:row + 1], xs[row:row + 1], layer, idx[row:row + 1],
                              w[row:row + 1], exponents[row], f"row {row} ({kind})")
    if s["exact"]:  # only BLAS depends on a row's position, and it is exact here
        for i, j in identical_row_pairs(x):
            assert same_bits(outs[i], outs[j]), f"out: rows {i} and {j} of x are equal"
