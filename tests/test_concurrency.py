"""Concurrency: Python threads calling the ops at once, on shared parameters, get bitwise
the results of the same calls made one after the other. The ops release the GIL, so the
calls really overlap, each with its own intra-op parallel_for; every output element is
reduced in a fixed order, so neither the overlap nor each thread's intra-op thread count
may change a bit. The backward pass is included (autograd from several threads at once)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mass_ext

from .helpers import generator, make_layer, make_x

pytestmark = pytest.mark.skipif(mass_ext.backend() != "cpp", reason="C++ extension not built")

THREADS = 8
ROUNDS = 3
KINDS = ["route", "self_routed", "prerouted", "backward"]


def make_jobs(layer, dtype, seed):
    """Calls of every kind on inputs of several sizes (1 row: decode, where the shrink
    splits rank runs over threads; 133 rows: every kernel's parallel_for splits)."""
    jobs = []
    for i in range(4 * THREADS):
        n = (1, 7, 133)[i % 3]
        x = make_x((n, layer.d_in), dtype, seed=seed + i)
        g = generator(seed + 1000 + i)
        indices = torch.randint(-1, layer.T, (n, 3), generator=g)
        weights = torch.rand(n, 3, generator=g)
        jobs.append((KINDS[i % len(KINDS)], x, indices, weights))
    return jobs


def run(layer, job):
    kind, x, indices, weights = job
    if kind == "route":
        return tuple(mass_ext.route(x, layer.V, 3, temperature=0.5, threshold=0.05,
                                    weighting="renormalized"))
    if kind == "self_routed":
        return torch.ops.mass_ext.routed_linear(x, *layer.params, 3, 0.5, 0.05, "softmax")
    if kind == "prerouted":
        return (mass_ext.routed_linear(x, *layer.params, indices=indices, weights=weights),)
    params = [p.detach().requires_grad_(True) for p in layer.params]
    xg = x.detach().requires_grad_(True)
    w = weights.detach().requires_grad_(True)
    loss = (mass_ext.routed_linear(xg, *params, 2, weighting="softmax").square().sum()
            + mass_ext.routed_linear(xg, *params, indices=indices, weights=w).sum())
    return torch.autograd.grad(loss, [xg, *params, w])


def assert_same(expected, got, what):
    assert len(expected) == len(got), what
    for i, (a, b) in enumerate(zip(expected, got)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        assert torch.equal(a, b), f"{what}: output {i} differs from the sequential call"


@pytest.mark.parametrize("dtype,shape", [
    (torch.float32, (20, 96, 769, 300)),
    (torch.bfloat16, (8, 16, 64, 65)),
    (torch.float64, (8, 16, 64, 65)),
], ids=str)
def test_threads_match_sequential_calls(dtype, shape):
    T, r, d_in, d_out = shape
    layer = make_layer(T, r, d_in, d_out, dtype=dtype, seed=1)  # shared by every thread
    jobs = make_jobs(layer, dtype, seed=2)
    expected = [run(layer, job) for job in jobs]
    for round_ in range(ROUNDS):
        # Every THREADS calls start at the same moment (len(jobs) is a multiple of THREADS).
        start = threading.Barrier(THREADS)

        def together(job):
            start.wait(timeout=60)
            return run(layer, job)

        with ThreadPoolExecutor(THREADS) as pool:
            got = list(pool.map(together, jobs))
        for i, (e, g) in enumerate(zip(expected, got)):
            assert_same(e, g, f"round {round_}, job {i} ({jobs[i][0]})")


def test_threads_share_one_input():
    """Every thread reads the same x (and the same indices and weights) at once."""
    layer = make_layer(8, 16, 64, 65, seed=3)
    job = ("self_routed", make_x((133, 64), seed=4), None, None)
    pre = ("prerouted", job[1], torch.randint(-1, 8, (133, 3), generator=generator(5)),
           torch.rand(133, 3, generator=generator(6)))
    expected = {kind: run(layer, j) for kind, j in (("self", job), ("pre", pre))}
    with ThreadPoolExecutor(THREADS) as pool:
        got = list(pool.map(lambda j: run(layer, j), [job, pre] * (2 * THREADS)))
    for i, g in enumerate(got):
        assert_same(expected["self" if i % 2 == 0 else "pre"], g, f"call {i}")
