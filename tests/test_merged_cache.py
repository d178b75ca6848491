"""The merged-weight cache of two-pass MASS (MASS.cache_merged_weights) and the op it runs,
_grouped_linear: each row times the weight its group names, checked against the reference
on awkward shapes and every dtype; the cache agrees with the op, keeps at most max_sets
task sets, notices changed tensors and steps aside where it does not apply."""
import copy
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mass_ext
from mass_ext import MASS, ops, reference

from .helpers import assert_close_to_oracle, generator, make_x
from .small_models import make_experts, task_inputs

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _grouped_case(rows, d_in, d_out, G, dtype, *, seed, bias=True, acc_weights=False):
    g = generator(seed)
    w_dtype = reference.check.acc_dtype(dtype) if acc_weights else dtype
    weights = [(torch.randn(d_out, d_in, generator=g) / max(1, d_in) ** 0.5).to(w_dtype)
               for _ in range(G)]
    b = torch.randn(d_out, generator=g).to(dtype) if bias else None
    groups = torch.randint(0, G, rows if isinstance(rows, tuple) else (rows,), generator=g)
    x = make_x((*groups.shape, d_in), dtype=dtype, seed=seed + 1)
    return x, weights, b, groups


def _oracle(x, weights, bias, groups):
    return reference.grouped_linear(x.double(), [w.double() for w in weights],
                                    None if bias is None else bias.double(), groups)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d_in,d_out,G", [
    (1, 1, 1, 1), (37, 5, 3, 4), ((3, 11), 70, 130, 3), (300, 64, 33, 2), (0, 8, 4, 2)])
@pytest.mark.parametrize("acc_weights", [False, True])
def test_grouped_linear_matches_the_reference(dtype, rows, d_in, d_out, G, acc_weights):
    x, weights, b, groups = _grouped_case(rows, d_in, d_out, G, dtype, seed=10,
                                          acc_weights=acc_weights)
    out = ops.grouped_linear(x, weights, b, groups)
    baseline = reference.grouped_linear(x, weights, b, groups)
    assert_close_to_oracle(out, _oracle(x, weights, b, groups), baseline, dtype)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(0, 300), d_in=st.integers(1, 80), d_out=st.integers(1, 80),
       G=st.integers(1, 5), dtype=st.sampled_from(DTYPES), scale=st.sampled_from([-10, 0, 10]),
       bias=st.booleans(), acc_weights=st.booleans(), column_major=st.booleans(),
       backend=st.sampled_from(["auto", "onednn", "aten"]), seed=st.integers(0, 2**16))
def test_grouped_linear_fuzz(rows, d_in, d_out, G, dtype, scale, bias, acc_weights,
                             column_major, backend, seed, monkeypatch):
    """Random shapes (0 rows, 1 column), dtypes, value scales (2^-10, 1, 2^10: float16 holds
    them), layouts and GEMM back-ends, against the float64 oracle."""
    monkeypatch.setenv("MASS_EXT_CPU_GEMM", backend)
    x, weights, b, groups = _grouped_case(rows, d_in, d_out, G, dtype, seed=seed, bias=bias,
                                          acc_weights=acc_weights)
    x = x * 2.0 ** scale
    if column_major:
        x = x.T.contiguous().T
    out = ops.grouped_linear(x, weights, b, groups)
    baseline = reference.grouped_linear(x, weights, b, groups)
    assert_close_to_oracle(out, _oracle(x, weights, b, groups), baseline, dtype)


@pytest.mark.parametrize("backend", ["onednn", "aten"])
def test_grouped_linear_tiles_and_empty_groups(backend, monkeypatch):
    """Groups of every size (one empty) over a non-contiguous input, in the oneDNN tiles
    (forced, small shapes) and ATen; no bias."""
    monkeypatch.setenv("MASS_EXT_CPU_GEMM", backend)
    x, weights, _, _ = _grouped_case(301, 70, 1030, 4, torch.float32, seed=11)
    x = x.T.contiguous().T                                   # column-major rows
    groups = torch.tensor([0] * 200 + [2] * 1 + [3] * 100)[torch.randperm(301, generator=generator(12))]
    out = ops.grouped_linear(x, weights, None, groups)
    expected = torch.stack([weights[g].double() @ row for g, row in zip(groups.tolist(), x.double())])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_grouped_linear_does_not_depend_on_the_thread_count():
    x, weights, b, groups = _grouped_case(900, 256, 384, 3, torch.float32, seed=13)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.grouped_linear(x, weights, b, groups)
        torch.set_num_threads(max(2, threads))
        many = ops.grouped_linear(x, weights, b, groups)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_grouped_linear_opcheck():
    x, weights, b, groups = _grouped_case((4, 5), 16, 9, 3, torch.float32, seed=14)
    torch.library.opcheck(torch.ops.mass_ext._grouped_linear, (x, weights, b, groups))


@pytest.mark.parametrize("change,error,message", [
    (lambda a: a["groups"].view(-1)[7:8].fill_(3), IndexError,
     r"groups must hold indices into weights in \[0, G\) = \[0, 3\), got 3 at row 7"),
    (lambda a: a.update(groups=a["groups"].int()), TypeError, "groups must be int64, got int32"),
    (lambda a: a.update(groups=a["groups"][:2]), ValueError,
     r"groups must have shape x.shape\[:-1\] = \(4, 5\), got \(2, 5\)"),
    (lambda a: a.update(weights=[]), ValueError, "weights must hold at least one"),
    (lambda a: a["weights"].append(torch.zeros(9, 15)), ValueError,
     r"weights\[3\] must have shape \(d_out, d_in\) = \(9, 16\)"),
    (lambda a: a["weights"].append(torch.zeros(9, 16, dtype=torch.float64)), TypeError,
     r"weights\[3\] must have the dtype of x \(float32\) or its accumulation dtype"),
    (lambda a: a.update(bias=torch.zeros(8)), ValueError, r"bias must have shape \(d_out,\)"),
    (lambda a: a.update(x=a["x"].int()), TypeError, "x must be float32, float64"),
])
def test_grouped_linear_bad_input_is_named(change, error, message):
    x, weights, b, groups = _grouped_case((4, 5), 16, 9, 3, torch.float32, seed=15)
    args = {"x": x, "weights": weights, "bias": b, "groups": groups}
    change(args)
    for fn in (ops.grouped_linear, reference.grouped_linear):
        with pytest.raises(error, match=message):
            fn(args["x"], args["weights"], args["bias"], args["groups"])


def test_grouped_linear_refuses_autograd():
    x, weights, b, groups = _grouped_case(6, 8, 4, 2, torch.float32, seed=16)
    with pytest.raises(ValueError, match="_grouped_linear has no backward"):
        ops.grouped_linear(x.requires_grad_(), weights, b, groups)
    with torch.no_grad():
        ops.grouped_linear(x, weights, b, groups)          # fine without autograd


# ----------------------------------------------------------------------- the cache

@pytest.fixture(scope="module")
def experts():
    return make_experts(seed=5)


def _mass(experts, **options):
    base, finetuned, _ = experts
    return MASS.from_finetuned(base, finetuned, router_layer="0", progress=False, **options)


def _mixed_routing(B, T, top_k, seed):
    """Every task set of size top_k, sample by sample in a shuffled order, weights 1."""
    g = generator(seed)
    indices = torch.stack([torch.randperm(T, generator=g)[:top_k] for _ in range(B)])
    return mass_ext.Routing(indices, torch.ones(B, top_k), torch.zeros(B, T))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shape", ["rows", "tokens", "flattened"])
def test_cache_agrees_with_the_op(experts, top_k, shape):
    """Pass 2 with the cache on gives the op's output to float rounding: samples as rows
    (B, d), as tokens (B, L, d), and tokens flattened sample-major (B * L, d)."""
    mm = _mass(experts)
    routing = _mixed_routing(12, 3, top_k, seed=20)
    x = make_x((12, 4, 24), seed=21)
    if shape == "rows":
        x = x[:, 0]

    def run():
        with mm.applying(routing):
            if shape != "flattened":
                return mm.model(x)
            mm._state.tokens = tuple(x.shape[:2])
            return mm.model(x.reshape(-1, 24)).reshape(12, 4, -1)
    with torch.no_grad():
        expected = run()
        mm.cache_merged_weights(3)
        first, again = run(), run()
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, again)
    sets = {tuple(sorted(row)) for row in routing.indices.tolist()}
    assert all(len(layer._merged) == len(sets) for layer in mm.routed.values())
    assert mm.merged_cache_bytes == len(sets) * sum(
        layer.weight.numel() * 4 for layer in mm.routed.values())


def test_cache_merges_with_the_slot_weights(experts):
    """Task sets with weights other than 1 (renormalized-like, two sets in the batch,
    slots in either order, one dropped): each merged with its weights."""
    mm = _mass(experts)
    x = make_x((8, 24), seed=29)
    indices = torch.tensor([[0, 2], [2, 0], [1, -1], [0, 2]] * 2)
    weights = torch.tensor([[0.7, 0.3], [0.3, 0.7], [1.0, 0.0], [0.7, 0.3]] * 2)
    routing = mass_ext.Routing(indices, weights, torch.zeros(8, 3))
    with torch.no_grad():
        expected = mm.run(routing, x)
        mm.cache_merged_weights(2)
        out = mm.run(routing, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    keys = sorted(mm.routed["0"]._merged)  # slots by task, the dropped one gone
    assert [[t for t, _ in key] for key in keys] == [[0, 2], [1]]
    assert [w for _, w in keys[0]] == pytest.approx([0.7, 0.3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_cache_in_other_dtypes(experts, dtype):
    """A model in another dtype: the merged weights are kept in the accumulation dtype
    (float32 for half precision, as the op merges), so the outputs match the op's."""
    mm, routing, x = _cached_case(experts, seed=32)
    mm.model.to(dtype)
    x = x.to(dtype)
    with torch.no_grad():
        cached = mm.run(routing, x)
        merged = next(iter(mm.routed["0"]._merged.values()))
        mm.cache_merged_weights(0)
        expected = mm.run(routing, x)
    assert cached.dtype == dtype and merged.dtype == reference.check.acc_dtype(dtype)
    torch.testing.assert_close(cached, expected, rtol=1e-2 if dtype != torch.float64 else 1e-12,
                               atol=1e-2 if dtype != torch.float64 else 1e-12)


def test_cache_reproduces_each_expert(experts):
    base, finetuned, subspaces = experts
    mm = _mass(experts)
    mm.cache_merged_weights(3)
    x, labels = task_inputs(subspaces, per_task=7)
    with torch.inference_mode():
        out = mm(x)
        assert mm.merged_cache_bytes > 0
    for t, name in enumerate(finetuned):
        rows = labels == t
        with torch.no_grad():
            torch.testing.assert_close(out[rows], finetuned[name](x[rows]), atol=2e-5, rtol=2e-5)


def test_cache_keeps_the_most_recent_sets(experts):
    mm = _mass(experts)
    mm.cache_merged_weights(2)
    layer = mm.routed["0"]
    x = make_x((4, 24), seed=22)
    with torch.no_grad():
        for tasks in ([0, 0, 1, 1], [2, 2, 2, 2], [0, 1, 0, 1]):
            mm.run(mass_ext.Routing(torch.tensor(tasks)[:, None], torch.ones(4, 1),
                                    torch.zeros(4, 3)), x)
    assert list(layer._merged) == [((0, 1.0),), ((1, 1.0),)]
    # Three sets in one batch, more than the cache keeps: the op runs, the cache stays.
    routing = mass_ext.Routing(torch.tensor([0, 1, 2, 0])[:, None], torch.ones(4, 1),
                               torch.zeros(4, 3))
    with torch.no_grad():
        out = mm.run(routing, x)
        mm.cache_merged_weights(0)
        assert torch.equal(out, mm.run(routing, x))
    assert mm.merged_cache_bytes == 0


def test_cache_steps_aside_for_per_sample_weights_and_autograd(experts):
    """Softmax-like weights that differ per sample make every sample its own set: more
    than max_sets, so the op runs (bit for bit its output). With autograd on, the op runs
    too and gradients flow."""
    mm = _mass(experts)
    mm.cache_merged_weights(3)
    x = make_x((6, 24), seed=23)
    w = torch.linspace(0.55, 0.95, 6)
    routing = mass_ext.Routing(torch.tensor([[0, 1]] * 6), torch.stack([w, 1 - w], -1),
                               torch.zeros(6, 3))
    with torch.no_grad():
        cached = mm.run(routing, x)
    mm.cache_merged_weights(0)
    with torch.no_grad():
        assert torch.equal(cached, mm.run(routing, x))
    mm.cache_merged_weights(3)
    leaf = x.clone().requires_grad_()
    mm.run(_mixed_routing(6, 3, 1, seed=24), leaf).sum().backward()
    assert leaf.grad is not None and mm.merged_cache_bytes == 0


def _cached_case(experts, seed):
    """A MASS model with the cache on (3 sets), a top-1 routing of 6 samples and their input."""
    mm = _mass(experts)
    mm.cache_merged_weights(3)
    return mm, _mixed_routing(6, 3, 1, seed=seed), make_x((6, 24), seed=seed + 1)


def test_cache_notices_changed_weights(experts):
    mm, routing, x = _cached_case(experts, seed=25)
    with torch.no_grad():
        before = mm.run(routing, x)
        for layer in mm.routed.values():
            layer.weight.mul_(2)           # in place: the version changes
            layer.S.mul_(0.5)
        after = mm.run(routing, x)
        mm.cache_merged_weights(0)
        expected = mm.run(routing, x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_cache_survives_copies_and_threads(experts):
    """A deep copy computes the same; the cache is not state. Threads calling the model at
    once, each with its own routing (the cache shared, two sets at a time), each get the
    output they get alone."""
    mm, routing, x = _cached_case(experts, seed=27)
    with torch.no_grad():
        out = mm.run(routing, x)
        copied = copy.deepcopy(mm)
        assert torch.equal(copied.run(routing, x), out)
    assert set(copied.state_dict()) == set(mm.state_dict())
    mm.cache_merged_weights(2)
    routings = [mass_ext.Routing(torch.tensor([a, b] * 3)[:, None], torch.ones(6, 1),
                                 torch.zeros(6, 3)) for a, b in ((0, 1), (1, 2), (2, 0))]
    with torch.no_grad():
        alone = [mm.run(r, x) for r in routings]
    results, errors = {}, []

    def worker(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    got = mm.run(routings[i], x)
                    if not torch.equal(got, alone[i]):
                        results[i] = got
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not results


def test_bundle_does_not_hold_the_cache(experts, tmp_path):
    """save with the cache on writes the same bundle as without; the loaded model starts
    with the cache off and computes the same."""
    base, _, _ = experts
    mm, routing, x = _cached_case(experts, seed=34)
    with torch.no_grad():
        out = mm.run(routing, x)
    mm.save(tmp_path / "cached.safetensors")
    mm.cache_merged_weights(0)
    mm.save(tmp_path / "plain.safetensors")
    assert (tmp_path / "cached.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    loaded = MASS.load(tmp_path / "cached.safetensors", copy.deepcopy(base))
    with torch.no_grad():
        torch.testing.assert_close(loaded.run(routing, x), out, rtol=1e-5, atol=1e-5)
    assert loaded.merged_cache_bytes == 0
    assert all(layer.merged_cache_size == 0 for layer in loaded.routed.values())


def test_compiled_model_keeps_the_op(experts):
    """Under torch.compile the layers run the op (the cache's bookkeeping is Python and
    would break the graph): one graph, the eager result, nothing cached."""
    mm, routing, x = _cached_case(experts, seed=30)
    compiled = torch.compile(mm.model, fullgraph=True)
    with torch.no_grad(), mm.applying(routing):
        out = compiled(x)
    assert all(not layer._merged for layer in mm.routed.values())
    mm.cache_merged_weights(0)
    with torch.no_grad():
        torch.testing.assert_close(out, mm.run(routing, x), rtol=1e-5, atol=1e-5)


def test_cache_leaves_bad_input_to_the_op(experts):
    """An input of another dtype than the model's raises the layer's error, cache or not
    (its float32 merged weights would otherwise accept a bfloat16 input)."""
    mm, routing, x = _cached_case(experts, seed=33)
    for max_sets in (3, 0):
        mm.cache_merged_weights(max_sets)
        with torch.no_grad(), pytest.raises(TypeError,
                match=r"weights are torch.float32, its input torch.bfloat16: cast"):
            mm.run(routing, x.bfloat16())


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_cache_size_is_checked(experts, bad):
    with pytest.raises(ValueError, match="max_sets must be an int >= 0, got"):
        _mass(experts).cache_merged_weights(bad)
