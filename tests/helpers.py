"""Shared test helpers: random layers, the per-dtype tolerance table and routing checks.

Tolerance policy (one place, used by every test):

* Where the computation is identical, results are compared exactly (``torch.equal``):
  the routing of ``route`` vs ``routed_linear``, repeated runs, thread counts, uniform
  routing weights (exactly 0 or 1).
* Outputs are compared against a float64 oracle, ``reference.apply_experts`` run in float64
  on the same (already rounded) inputs *with the routing the kernel chose*, so a
  documented routing tie cannot turn into an output mismatch. The kernel's max abs error
  must satisfy

      err(kernel) <= 2 * err(baseline) + floor_ulps * eps(dtype) * max(1, max|oracle|)

  where ``baseline`` is the same computation done by the plain-PyTorch reference on the
  inputs in the tested dtype (float32 accumulation, result rounded to that dtype). For
  bfloat16 / float16 the 2x term dominates (the final rounding); for float32 / float64 the
  floor (a few ulps of the output scale) dominates and acts as a fixed atol = rtol.
* Residuals: the kernel uses ``||x||^2 - ||V_t x||^2`` (norm identity), the reference the
  explicit ``||x - V_t^T V_t x||``. They are compared on *squared* residuals, per row and
  task, with ``res2_tol = |z^T (V_t V_t^T - I) z| + res_ulps * eps(acc) * (||x||^2 + 1)``,
  z = V_t x in float64: the first term is exactly how far the identity is from the
  explicit form for this (rounded) V, nonzero once V is rounded to bf16 / fp16.
* Routing, two checks (`check_route_against_reference` runs both):
  - self-consistency, tight: the kernel's indices are exactly DESIGN.md's selection applied
    (in float64, by reference.select_tasks) to the residuals the kernel itself returned,
    ties to the lower index included; its weights match to 1e-5 relative.
  - against the reference (`assert_same_routing`): indices identical, except (a) a
    documented tie: each task the kernel picked is, within the squared-residual
    tolerance, at least as good as every task it left for later (the reference logits
    -res of the tasks involved are closer than the kernel's residual error can resolve),
    or (b) a threshold decision: a slot kept by one side only whose task's reference
    probability is within tolerance of the threshold. The probability tolerance is
    ``probs`` below plus the bound `probs_log_error_bound` derives from ``res2_tol``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

import mass_ext
from mass_ext import reference

@dataclasses.dataclass(frozen=True)
class Tol:
    floor_ulps: float  # output floor, in ulps of the output scale
    res_ulps: float    # squared-residual tolerance, in ulps (of acc dtype) of ||x||^2
    probs: float       # absolute floor on |p_kernel - p_reference| (p is float32 or float64)


TOLERANCES = {
    torch.float64: Tol(floor_ulps=16, res_ulps=64, probs=1e-12),
    torch.float32: Tol(floor_ulps=16, res_ulps=64, probs=1e-6),
    torch.bfloat16: Tol(floor_ulps=0.25, res_ulps=64, probs=1e-6),
    torch.float16: Tol(floor_ulps=0.25, res_ulps=64, probs=1e-6),
}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tol(dtype) -> Tol:
    return TOLERANCES[dtype]


# ------------------------------------------------------------------------ random inputs

def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal_rows(T: int, r: int, d_in: int, seed: int) -> torch.Tensor:
    """(T, r, d_in) float64, rows of every V[t] orthonormal to float64 precision."""
    return _orthonormal_rows(T, r, d_in, seed).clone()


@functools.lru_cache(maxsize=None)
def _orthonormal_rows(T, r, d_in, seed):
    # Householder QR in float32 (float64 LAPACK QR is much slower on this CPU build), then
    # one Cholesky-QR step in float64, which makes the columns orthonormal to ~1e-15.
    # Cached: the large ones cost ~0.1 s and the suite asks for the same ones often.
    assert r <= d_in
    a = torch.randn(T, d_in, r, dtype=torch.float64, generator=generator(seed))
    q = torch.linalg.qr(a.to(torch.float32)).Q.to(torch.float64)
    chol = torch.linalg.cholesky(q.mT @ q)
    q = torch.linalg.solve_triangular(chol.mT, q, upper=True, left=False)
    return q.transpose(1, 2).contiguous()


@dataclasses.dataclass
class Layer:
    """A routed layer; all tensors share one dtype."""

    weight: torch.Tensor  # (d_out, d_in)
    bias: torch.Tensor | None  # (d_out,)
    U: torch.Tensor  # (T, d_out, r)
    S: torch.Tensor  # (T, r)
    V: torch.Tensor  # (T, r, d_in)

    @property
    def params(self):
        return (self.weight, self.bias, self.U, self.S, self.V)

    @property
    def T(self):
        return self.V.shape[0]

    @property
    def r(self):
        return self.V.shape[1]

    @property
    def d_in(self):
        return self.V.shape[2]

    @property
    def d_out(self):
        return self.weight.shape[0]

    def to(self, dtype) -> "Layer":
        return Layer(*(None if t is None else t.to(dtype) for t in self.params))

    def detach_requires_grad(self) -> "Layer":
        return Layer(*(None if t is None else t.detach().clone().requires_grad_(True)
                       for t in self.params))


def make_layer(T, r, d_in, d_out, *, dtype=torch.float32, bias=True, seed=0, V=None) -> Layer:
    """Random layer built in float64 then cast. The low-rank update has the same scale as
    the base product (entries ~1 for x ~ N(0, I)), so an error in either half shows."""
    g = generator(seed)
    weight = torch.randn(d_out, d_in, dtype=torch.float64, generator=g) / math.sqrt(d_in)
    b = torch.randn(d_out, dtype=torch.float64, generator=g) if bias else None
    U = torch.randn(T, d_out, r, dtype=torch.float64, generator=g) / math.sqrt(r)
    S = torch.rand(T, r, dtype=torch.float64, generator=g) + 0.5
    if V is None:
        V = orthonormal_rows(T, r, d_in, seed)
    return Layer(weight, b, U, S, V.to(torch.float64)).to(dtype)


def make_x(shape, dtype=torch.float32, seed=1) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=generator(seed)).to(dtype)


def strided_like(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as x (..., d_in) with another memory layout.

    "contiguous", "transposed" (a .t() / .mT view of a contiguous buffer), "column_slice"
    (x_big[..., :d_in] with wider rows), "expand" (stride-0 leading dim: only the first
    row of x is kept and broadcast, so the values change).
    """
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":
        out = x.mT.contiguous().mT if x.dim() >= 2 else x
        assert x.dim() < 2 or min(x.shape[-2:]) <= 1 or not out.is_contiguous()
        return out
    if layout == "column_slice":
        big = torch.zeros(*x.shape[:-1], x.shape[-1] + 5, dtype=x.dtype)
        big[..., 5:] = float("nan")  # never read
        big[..., : x.shape[-1]] = x
        out = big[..., : x.shape[-1]]
        assert x.numel() <= x.shape[-1] or not out.is_contiguous()
        return out
    if layout == "expand":
        if x.numel() == 0:
            return x
        first = x.reshape(-1, x.shape[-1])[:1]
        out = first.reshape(*([1] * (x.dim() - 1)), x.shape[-1]).expand(x.shape)
        assert x.dim() < 2 or x.shape[0] <= 1 or out.stride(0) == 0
        return out
    raise ValueError(layout)


# ------------------------------------------------------------------------ tolerances

def eps(dtype) -> float:
    return torch.finfo(dtype).eps


def res2_tol(x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Per (row, task) tolerance (..., T) on squared residuals (see the module docstring).

    model term: |z^T (V_t V_t^T - I) z| with z = V_t x, all in float64 on the values as
    given: exactly how far the norm identity is from the explicit residual for this V
    (zero for exactly orthonormal rows; not zero once V is rounded to a low precision).
    rounding term: res_ulps ulps of the accumulation dtype, times ||x||^2 + 1.
    """
    x64, V64 = x.detach().to(torch.float64), V.detach().to(torch.float64)
    z = torch.einsum("...i,tri->...tr", x64, V64)
    gram = V64 @ V64.mT - torch.eye(V.shape[1], dtype=torch.float64)
    model = torch.einsum("...tr,trs,...ts->...t", z, gram, z).abs()
    x_norm2 = x64.pow(2).sum(-1, keepdim=True)
    return model + tol(x.dtype).res_ulps * eps(acc_dtype(x.dtype)) * (x_norm2 + 1)


def assert_close_to_oracle(got: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor,
                           dtype, what="output"):
    """err(got) <= 2 * err(baseline) + floor, errors measured against the float64 oracle."""
    assert got.dtype == dtype, (what, got.dtype, dtype)
    assert got.shape == oracle.shape == baseline.shape, (what, got.shape, oracle.shape)
    if got.numel() == 0:
        return
    oracle = oracle.to(torch.float64)
    err_got = (got.to(torch.float64) - oracle).abs()
    err_base = float((baseline.to(torch.float64) - oracle).abs().max())
    scale = max(1.0, float(oracle.abs().max()))
    bound = 2 * err_base + tol(dtype).floor_ulps * eps(dtype) * scale
    worst = float(err_got.max())
    assert worst <= bound, (
        f"{what} ({dtype}): max |kernel - oracle| = {worst:.3e} > bound {bound:.3e} "
        f"(baseline error {err_base:.3e}, scale {scale:.3g}) at index "
        f"{tuple(int(i) for i in torch.nonzero(err_got == err_got.max())[0])}"
    )


def oracle_and_baseline(x, layer: Layer, indices, weights):
    """(float64 oracle, reference in x.dtype) of the routed output for a fixed routing."""
    p64 = [None if t is None else t.to(torch.float64) for t in layer.params]
    oracle = reference.apply_experts(x.to(torch.float64), *p64, indices, weights.to(torch.float64))
    baseline = reference.apply_experts(x, *layer.params, indices, weights)
    return oracle, baseline


def assert_output_matches(out, x, layer: Layer, indices, weights, what="output"):
    assert out.shape == (*x.shape[:-1], layer.d_out), (what, out.shape)
    oracle, baseline = oracle_and_baseline(x, layer, indices, weights)
    assert_close_to_oracle(out, oracle, baseline, x.dtype, what)


def assert_residuals_close(got, ref, x, V):
    assert got.dtype == ref.dtype == acc_dtype(x.dtype), (got.dtype, ref.dtype)
    assert got.shape == ref.shape == (*x.shape[:-1], V.shape[0])
    if got.numel() == 0:
        return
    assert bool((got >= 0).all()), "residuals must be >= 0"
    diff = (got.to(torch.float64).pow(2) - ref.to(torch.float64).pow(2)).abs()
    bound = res2_tol(x, V)
    bad = diff > bound
    assert not bool(bad.any()), (
        f"{int(bad.sum())} squared residuals off; worst {float((diff / bound).max()):.3g}x "
        f"the tolerance, first at {tuple(int(i) for i in bad.nonzero()[0])}"
    )


# ------------------------------------------------------------------------ routing

STANDARDIZE_EPS = 1e-6  # DESIGN.md


def reference_probs(residuals: torch.Tensor, temperature: float) -> torch.Tensor:
    """p = softmax(standardize(-res) / temperature) in float64, written out from DESIGN.md."""
    logits = -residuals.to(torch.float64)
    T = logits.shape[-1]
    if T == 1:
        return torch.ones_like(logits)
    mean = logits.mean(-1, keepdim=True)
    std = logits.std(-1, keepdim=True, unbiased=True)
    return torch.softmax((logits - mean) / (std + STANDARDIZE_EPS) / temperature, dim=-1)


def probs_log_error_bound(residuals, res2_tol, temperature) -> torch.Tensor:
    """(rows,) bound D on |log p'_t - log p_t| over all residuals res' with
    |res'^2 - res^2| <= res2_tol (per task): how far the kernel's p can be from the
    reference's, given the residual tolerance. Not first-order: exact interval bounds.

    With |l'_t - l_t| <= delta (l = -res), the mean moves by <= delta and the unbiased std
    by <= delta * sqrt(T / (T - 1)); z = (l - mean) / (std + eps) / temperature then moves by
    <= (2 delta / (s_lo + eps) + |l - mean| * ds / ((s_lo + eps)(s + eps))) / temperature
    (s_lo = the smallest std possible), and softmax moves log p by <= 2 max |dz|."""
    T = residuals.shape[-1]
    res2 = residuals.reshape(-1, T).to(torch.float64).pow(2)
    tau = torch.as_tensor(res2_tol, dtype=torch.float64).expand(residuals.shape).reshape(-1, T)
    if T == 1:
        return torch.zeros(res2.shape[0], dtype=torch.float64)
    res = res2.sqrt()
    up, down = (res2 + tau).sqrt() - res, res - (res2 - tau).clamp(min=0).sqrt()
    delta = torch.maximum(up, down).amax(-1, keepdim=True)
    logits = -res
    centred = (logits - logits.mean(-1, keepdim=True)).abs().amax(-1, keepdim=True)
    s = logits.std(-1, keepdim=True, unbiased=True)
    ds = delta * math.sqrt(T / (T - 1))
    s_lo = (s - ds).clamp(min=0)
    dz = (2 * delta / (s_lo + STANDARDIZE_EPS)
          + centred * ds / ((s_lo + STANDARDIZE_EPS) * (s + STANDARDIZE_EPS))) / temperature
    return (2 * dz).squeeze(-1)


def check_routing_invariants(indices, weights, T, top_k, weighting):
    """What every routing decision must satisfy, whatever the inputs."""
    assert indices.dtype == torch.int64
    assert indices.shape[-1] == top_k and weights.shape == indices.shape
    if indices.numel() == 0:
        return
    flat = indices.reshape(-1, top_k)
    w = weights.reshape(-1, top_k)
    assert bool(((flat >= -1) & (flat < T)).all()), "index out of [-1, T)"
    assert bool((flat[:, 0] >= 0).all()), "the first slot is never dropped"
    kept = flat >= 0
    # p is monotone in the logit and slots come best first: drops form a suffix.
    assert bool((kept[:, 1:] <= kept[:, :-1]).all()), "a kept slot after a dropped one"
    for a in range(top_k):
        for b in range(a + 1, top_k):
            assert not bool((kept[:, a] & (flat[:, a] == flat[:, b])).any()), "duplicate task"
    assert bool((w[~kept] == 0).all()), "dropped slots weigh 0"
    if weighting == "uniform":
        assert bool((w[kept] == 1).all()), "uniform weights are 1"
    else:
        # >= 0: p underflows to 0 for a sharp enough softmax, and a threshold < 0 keeps it.
        assert bool((w[kept] >= 0).all() and (w[kept] <= 1 + 1e-6).all())
    if weighting == "renormalized":
        torch.testing.assert_close(w.sum(-1).double(), torch.ones(w.shape[0], dtype=torch.float64),
                                   atol=1e-5, rtol=0)


def assert_routing_self_consistent(got, top_k, *, temperature=1.0, threshold=0.0,
                                   weighting="uniform"):
    """The kernel's indices and weights are exactly what DESIGN.md's selection gives for the
    kernel's own residuals (reference.select_tasks run in float64 on them): ordering
    exactly (ties included), threshold decisions exactly unless p is within 1e-5 of the
    threshold, weights to 1e-5 relative (the kernel computes p in float32)."""
    T = got.residuals.shape[-1]
    check_routing_invariants(got.indices, got.weights, T, top_k, weighting)
    if got.indices.numel() == 0:
        return
    res = got.residuals.reshape(-1, T).to(torch.float64)
    exp_idx, exp_w = reference.select_tasks(res, top_k, temperature, threshold, weighting)
    gi = got.indices.reshape(-1, top_k)
    probs = reference_probs(res, temperature)
    near = 1e-5 if got.residuals.dtype != torch.float64 else 1e-12
    for n, j in (gi != exp_idx).nonzero().tolist():
        a, b = int(gi[n, j]), int(exp_idx[n, j])
        t = a if a >= 0 else b
        assert (a < 0 or b < 0) and abs(float(probs[n, t]) - threshold) <= near, (
            f"row {n}: the kernel's indices {gi[n].tolist()} are not the selection "
            f"{exp_idx[n].tolist()} its own residuals give: {res[n].tolist()}"
        )
    same = (gi == exp_idx).all(-1)
    torch.testing.assert_close(got.weights.reshape(-1, top_k)[same].to(torch.float64),
                               exp_w[same], rtol=near, atol=near * 1e-2)


def assert_same_routing(got, ref, ref_residuals, probs_tol, *, res2_tol, temperature=1.0,
                        threshold=0.0, weighting="uniform"):
    """The kernel's routing `got` against the reference's `ref` ((indices, weights) pairs; a
    Routing works), given the reference's residuals (..., T) and the per-task tolerance
    res2_tol (..., T) on squared residuals (see `res2_tol`).

    Indices must be identical, except in a row where
      * a tie reorders tasks: every task the kernel selects is, up to the tolerance, at
        least as good as every task it leaves for later slots (res^2 - tol <= res'^2 + tol
        on the reference's squared residuals): the "two tasks involved" of a swap, and
        the tasks a swap cascades over; or
      * a threshold decision differs: a task kept by one and dropped by the other has a
        reference p within probs_tol + p * expm1(D) of the threshold, D the bound of
        `probs_log_error_bound`.
    On rows with identical indices, weights must agree within probs_tol + w * expm1(D)
    (2D for renormalized). Returns the (rows,) mask of rows with identical indices.
    """
    g_idx, g_w = got[0], got[1]
    r_idx, r_w = ref[0], ref[1]
    assert g_idx.shape == r_idx.shape and g_w.shape == r_w.shape
    assert g_w.dtype == r_w.dtype, (g_w.dtype, r_w.dtype)
    T, k = ref_residuals.shape[-1], r_idx.shape[-1]
    check_routing_invariants(g_idx, g_w, T, k, weighting)
    if g_idx.numel() == 0:
        return torch.ones(0, dtype=torch.bool)
    gi, ri = g_idx.reshape(-1, k), r_idx.reshape(-1, k)
    res2 = ref_residuals.reshape(-1, T).to(torch.float64).pow(2)
    tau = torch.as_tensor(res2_tol, dtype=torch.float64).expand(ref_residuals.shape)
    tau = tau.reshape(-1, T)
    probs = reference_probs(ref_residuals.reshape(-1, T), temperature)
    log_err = probs_log_error_bound(ref_residuals, res2_tol, temperature)
    same = (gi == ri).all(-1)
    for n in (~same).nonzero().flatten().tolist():
        row = f"row {n}: kernel {gi[n].tolist()} reference {ri[n].tolist()}"
        kept_k, kept_r = int((gi[n] >= 0).sum()), int((ri[n] >= 0).sum())
        later = torch.ones(T, dtype=torch.bool)
        for j in range(kept_k):
            a = int(gi[n, j])
            later[a] = False
            worst = (res2[n, a] - tau[n, a]) - (res2[n, later] + tau[n, later]).min() \
                if bool(later.any()) else torch.tensor(-1.0)
            assert float(worst) <= 0, (
                f"{row}: slot {j} (task {a}, res^2 {float(res2[n, a]):.6g}) is worse than a "
                f"task left for later by {float(worst):.3e} beyond the tie tolerance"
            )
        for j in range(min(kept_k, kept_r), max(kept_k, kept_r)):
            t = int(gi[n, j]) if kept_k > kept_r else int(ri[n, j])
            p = float(probs[n, t])
            # Capped: a bound past e^700 (tiny temperatures) allows anything anyway.
            allowed = probs_tol + p * math.expm1(min(float(log_err[n]), 700.0))
            assert abs(p - threshold) <= allowed, (
                f"{row}: slot {j} kept by one side only; p[{t}] = {p:.6g} is not within "
                f"{allowed:.3g} of the threshold {threshold}"
            )
    gw = g_w.reshape(-1, k)[same].to(torch.float64)
    rw = r_w.reshape(-1, k)[same].to(torch.float64)
    if weighting == "uniform":
        assert torch.equal(gw, rw), "uniform weights must match exactly"
    else:
        factor = 2 if weighting == "renormalized" else 1
        rel = torch.expm1(factor * log_err[same]).unsqueeze(-1)
        bad = (gw - rw).abs() > probs_tol + rel * rw
        if bool(bad.any()):
            i, j = bad.nonzero()[0].tolist()
            n = int(same.nonzero()[i])
            raise AssertionError(
                f"routing weights differ at row {n}, slot {j}: kernel {float(gw[i, j]):.6g}, "
                f"reference {float(rw[i, j]):.6g}, "
                f"allowed {float(probs_tol + rel[i] * rw[i, j]):.3g}"
            )
    return same


def check_route_against_reference(x, V, top_k, *, temperature=1.0, threshold=0.0,
                                  weighting="uniform", got=None):
    """Runs mass_ext.route (unless `got` is given) and reference.route; asserts the kernel's
    routing is self-consistent and agrees with the reference's, and the residuals agree.
    Returns (kernel Routing, reference Routing)."""
    options = dict(temperature=temperature, threshold=threshold, weighting=weighting)
    if got is None:
        got = mass_ext.route(x, V, top_k, **options)
    ref = reference.route(x, V, top_k, **options)
    acc = acc_dtype(x.dtype)
    assert got.indices.shape == (*x.shape[:-1], top_k)
    assert got.weights.dtype == acc and got.residuals.dtype == acc
    assert_residuals_close(got.residuals, ref.residuals, x, V)
    assert_routing_self_consistent(got, top_k, **options)
    assert_same_routing(got, ref, ref.residuals, tol(x.dtype).probs, res2_tol=res2_tol(x, V),
                        **options)
    return got, ref


def nearly_tied_rows(T, n, seed, dtype=torch.float32):
    """(x (n, 64), V (T, 1, 64)): rows of norm ~26 whose T residuals (~26) differ by ~1e-4,
    1e-5 or 1e-6 of their size: the standardisation's float32 mean then loses most of the
    spread's bits unless the variance is corrected (routing.h, select_tasks)."""
    g = generator(seed)
    d = 64
    V = torch.eye(d, dtype=torch.float64)[:T].reshape(T, 1, d)
    x = torch.zeros(n, d, dtype=torch.float64)
    x[:, T:] = 26 / math.sqrt(d - T)
    spread = 10.0 ** -torch.randint(2, 5, (n, 1), generator=g).to(torch.float64)
    x[:, :T] = 3 + spread * torch.rand(n, T, generator=g, dtype=torch.float64)
    return x.to(dtype), V.to(dtype)


def case_inputs(case, dtype, seed=0):
    """x (in the case's layout) and a Layer for one tests/cases.py Case."""
    layer = make_layer(case.T, case.r, case.d_in, case.d_out, dtype=dtype, bias=case.bias,
                       seed=seed)
    x = strided_like(make_x((*case.lead, case.d_in), dtype, seed=seed + 1), case.layout)
    return x, layer
