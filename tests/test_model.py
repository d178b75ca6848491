"""Model-level MASS on small models with exactly low-rank task deltas: every expert is
reproduced when its samples are routed to it; save/load, errors, HF BERT conversion."""
import copy
import os
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mass_ext
from mass_ext import MASS, RoutedLinear

from .small_models import D_HIDDEN, D_IN, D_OUT, T, make_experts, task_inputs


@pytest.fixture(scope="module")
def experts():
    return make_experts()


def test_two_pass_top1_reproduces_each_expert_on_a_mixed_batch(experts):
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    x, labels = task_inputs(subspaces, per_task=7)
    with torch.no_grad():
        out = mm(x)
        assert torch.equal(mm.routing.indices[:, 0], labels)
        for t, name in enumerate(finetuned):
            rows = labels == t
            torch.testing.assert_close(out[rows], finetuned[name](x[rows]), atol=2e-5, rtol=2e-5)


def test_routed_layers_and_averaged_parameters(experts):
    base, finetuned, _ = experts
    finetuned = copy.deepcopy(finetuned)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for expert in finetuned.values():
            expert[0].bias += 0.1 * torch.randn(D_HIDDEN, generator=g)
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    assert sorted(mm.routed) == ["0", "2"]
    assert mm.routed["0"].rank == min(D_HIDDEN, D_IN) // T
    mean_bias = torch.stack([m[0].bias.detach() for m in finetuned.values()]).mean(0)
    torch.testing.assert_close(mm.model[0].bias.detach(), mean_bias)
    assert torch.equal(mm.model[2].bias, base[2].bias)  # unchanged by every task


def test_base_model_is_never_modified(experts):
    base, finetuned, subspaces = experts
    before = {k: v.clone() for k, v in base.state_dict().items()}
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    mm(task_inputs(subspaces, 2)[0])
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(m, nn.Linear) and not isinstance(m, RoutedLinear)
               for m in (base[0], base[2]))


def test_per_layer_mode_routes_every_layer_on_its_own_rows(experts):
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", mode="per_layer",
                             progress=False)
    x, labels = task_inputs(subspaces, 5)
    with torch.no_grad():
        out = mm(x)
    indices, _ = mm.routed["0"].last_routing
    assert torch.equal(indices[:, 0], labels)      # the first layer sees separable inputs
    assert out.shape == (len(labels), D_OUT) and bool(out.isfinite().all())
    # mm.routing: the router layer's per-sample decision, for picking heads.
    assert torch.equal(mm.routing.indices[:, 0], labels)


def _residual_fraction(x, V):
    """Explicit ||x - V^T V x||^2 / ||x||^2 per task: (N, T)."""
    projected = torch.einsum("trd,nd->ntr", V.double(), x.double())
    rebuilt = torch.einsum("trd,ntr->ntd", V.double(), projected)
    return ((x.double()[:, None] - rebuilt) ** 2).sum(-1) / (x.double() ** 2).sum(-1, keepdim=True)


def test_several_router_layers_sum_their_residual_fractions(experts):
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer=["0", "2"], top_k=T,
                             progress=False)
    x, labels = task_inputs(subspaces, 6)
    seen = []
    with torch.no_grad():
        routing = mm.route(x)
        hidden = torch.tanh(base[0](x))
        total = (_residual_fraction(x, mm.routed["0"].V)
                 + _residual_fraction(hidden, mm.routed["2"].V))
        mm.model[2].register_forward_hook(lambda *_: seen.append(1))
        mm.route(x)  # pass 1 stops at the last router layer's input: layer 2 never runs
    assert not seen
    assert torch.equal(routing.indices, total.argsort(dim=-1, stable=True))
    torch.testing.assert_close(routing.residuals.double() ** 2, total, atol=1e-5, rtol=1e-5)
    assert torch.equal(routing.indices[:, 0], labels)  # layer 0's subspaces are disjoint


class _TakesAMask(nn.Module):
    """A token model's call signature (attention_mask=) around an MLP that ignores it."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x, attention_mask=None):
        return self.mlp(x)


def test_token_pooling_averages_each_tokens_residual_fraction_over_valid_tokens(experts, tmp_path):
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(_TakesAMask(base), {k: _TakesAMask(m) for k, m in finetuned.items()},
                             router_layer=["mlp.0", "mlp.2"], pooling="tokens", top_k=T,
                             progress=False)
    x, labels = task_inputs(subspaces, 4)                 # one task per sample ...
    B, L = len(labels), 5
    g = torch.Generator().manual_seed(7)
    tokens = x[:, None] * torch.rand(B, L, 1, generator=g).add(0.5)  # ... on every token
    mask = torch.ones(B, L, dtype=torch.long)
    mask[::2, 3:] = 0
    tokens[mask == 0] = 50 * torch.randn(int((mask == 0).sum()), D_IN, generator=g)  # padding
    with torch.no_grad():
        routing = mm.route(tokens, attention_mask=mask)
        hidden = torch.tanh(base[0](tokens))
        fractions = (_residual_fraction(tokens.reshape(-1, D_IN), mm.routed["mlp.0"].V)
                     + _residual_fraction(hidden.reshape(-1, D_HIDDEN), mm.routed["mlp.2"].V))
        valid = mask.double().reshape(-1, 1)
        expected = ((fractions * valid).reshape(B, L, T).sum(1)
                    / mask.sum(1, keepdim=True).double())
        # Padding never counts: other values there route the same.
        tokens[mask == 0] = -tokens[mask == 0]
        again = mm.route(tokens, attention_mask=mask)
        unmasked = mm.route(tokens)                        # no mask: every token counts
    torch.testing.assert_close(routing.residuals.double() ** 2, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(routing.indices, expected.argsort(dim=-1, stable=True))
    assert torch.equal(routing.indices[:, 0], labels)
    assert torch.equal(again.indices, routing.indices)
    assert not torch.allclose(unmasked.residuals, routing.residuals)
    mm.save(tmp_path / "tokens.safetensors")
    loaded = MASS.load(tmp_path / "tokens.safetensors", _TakesAMask(base))
    assert loaded.pooling == "tokens"
    with torch.no_grad():
        assert torch.equal(loaded.route(tokens, attention_mask=mask).indices, routing.indices)
    # One token per sample: the pooled decision (several layers route residual fractions).
    pooled = MASS(mm.model, mm.task_names, router_layer=["mlp.0", "mlp.2"], pooling="mean",
                  top_k=T)
    with torch.no_grad():
        one = mm.route(x[:, None])
        torch.testing.assert_close(one.residuals, pooled.route(x[:, None]).residuals)
        assert torch.equal(one.indices, pooled.route(x[:, None]).indices)


@pytest.mark.parametrize("options", [dict(), dict(top_k=2, weighting="softmax", threshold=0.2),
                                     dict(top_k=3, weighting="renormalized", temperature=0.5)])
def test_per_layer_bases_route_like_their_block_diagonal_stack(experts, options):
    """MASS routes several router layers against each layer's own V (n times fewer
    multiply-adds than the block-diagonal stack); the routing is the stack's, pooled or
    per token, padding masked."""
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer=["0", "2"], progress=False)
    bases = [mm.routed["0"].V, mm.routed["2"].V]
    g = torch.Generator().manual_seed(11)
    pooled = [torch.randn(9, D_IN, generator=g), torch.randn(9, D_HIDDEN, generator=g)]
    tokens = [torch.randn(9, 4, D_IN, generator=g), torch.randn(9, 4, D_HIDDEN, generator=g)]
    mask = torch.ones(9, 4, dtype=torch.long)
    mask[::2, 2:] = 0
    for features, attention_mask in ((pooled, None), (tokens, None), (tokens, mask)):
        one_by_one = mass_ext.route_features(features, bases, attention_mask=attention_mask,
                                             **options)
        stacked = mass_ext.route_features(features, mass_ext.stack_router_bases(bases),
                                          attention_mask=attention_mask, **options)
        assert torch.equal(one_by_one.indices, stacked.indices)
        torch.testing.assert_close(one_by_one.residuals, stacked.residuals)
        torch.testing.assert_close(one_by_one.weights, stacked.weights)
    with pytest.raises(ValueError, match=r"bases must hold one V per router input, 2, got 1"):
        mass_ext.route_features(pooled, bases[:1])
    with pytest.raises(ValueError, match=rf"bases\[0\] must be the V \(T, r, d\) of router "
                                         rf"input 0, whose width is d = {D_HIDDEN}"):
        mass_ext.route_features(pooled[::-1], bases)
    with pytest.raises(ValueError, match=r"bases must all have the same number of tasks T"):
        mass_ext.route_features(pooled, [bases[0][:1], bases[1]])   # would broadcast
    with pytest.raises(ValueError, match=r"features must all be pooled \(B, d\) or all token"):
        mass_ext.route_features([pooled[0][:1], pooled[1]], bases)  # would broadcast
    with pytest.raises(ValueError, match=r"features must all be pooled \(B, d\) or all token"):
        mass_ext.route_features([], [])


@st.composite
def _router_features(draw):
    """1-3 router layers (T tasks; each its own rank below its width, so that random
    inputs have residuals far from the identity's cancellation error near 0) and their
    inputs, pooled (B, d_l) or per token (B, L, d_l) with a padding mask, float64; some
    rows zero (all tasks tied: the lower id first)."""
    T = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(2, 9), min_size=1, max_size=3))
    B, L = draw(st.integers(1, 5)), draw(st.sampled_from([None, 1, 3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    bases, features = [], []
    for d in widths:
        r = draw(st.integers(1, d - 1))
        bases.append(torch.linalg.qr(torch.randn(T, d, r, generator=g, dtype=torch.float64))
                     .Q.transpose(1, 2).contiguous())
        f = torch.randn(B, *([] if L is None else [L]), d, generator=g, dtype=torch.float64)
        if draw(st.booleans()):
            f[0] = 0
        features.append(f)
    mask = None
    if L is not None and draw(st.booleans()):
        mask = (torch.rand(B, L, generator=g) < 0.7).long()
    top_k = draw(st.integers(1, T))
    options = dict(top_k=top_k, weighting=draw(st.sampled_from(["uniform", "softmax",
                                                                  "renormalized"])),
                   threshold=draw(st.sampled_from([0.0, 0.2])),
                   temperature=draw(st.sampled_from([0.5, 1.0])))
    return features, bases, mask, options


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(case=_router_features())
def test_per_layer_bases_fuzz_against_the_stack(case):
    """Any number of router layers, ranks, widths, poolings and options: routing against
    the layers' own V is routing against their block-diagonal stack."""
    features, bases, mask, options = case
    one_by_one = mass_ext.route_features(features, bases, attention_mask=mask, **options)
    stacked = mass_ext.route_features(features, mass_ext.stack_router_bases(bases),
                                      attention_mask=mask, **options)
    assert torch.equal(one_by_one.indices, stacked.indices)
    torch.testing.assert_close(one_by_one.residuals, stacked.residuals, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(one_by_one.weights, stacked.weights, rtol=1e-9, atol=1e-9)


def test_token_pooling_bad_inputs_are_clear_errors(experts):
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(_TakesAMask(base), {k: _TakesAMask(m) for k, m in finetuned.items()},
                             router_layer="mlp.0", pooling="tokens", progress=False)
    x, _ = task_inputs(subspaces, 2)
    tokens = torch.stack([x, x.roll(1, 0), x.roll(2, 0)], 1)      # tokens of other tasks
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, >= L\) = \(6, >= 3\) "
                                         r"to pool the tokens the router layer 'mlp.0' sees, "
                                         r"got shape \(6, 2\)"):
        mm.route(tokens, attention_mask=torch.ones(6, 2))
    mean = MASS(mm.model, mm.task_names, router_layer="mlp.0", pooling="mean")
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, >= L\) = \(6, >= 3\)"):
        mean.route(tokens, attention_mask=torch.ones(6, 1))   # was silently broadcast
    # A longer mask also covers a KV cache's past tokens: its last L columns pool.
    longer = torch.tensor([[1, 0, 1, 1]]).expand(6, 4)
    for wrapper in (mm, mean):
        torch.testing.assert_close(wrapper.route(tokens, attention_mask=longer).residuals,
                                   wrapper.route(tokens, attention_mask=longer[:, 1:]).residuals)
        assert not torch.allclose(wrapper.route(tokens, attention_mask=longer[:, 1:]).residuals,
                                  wrapper.route(tokens, attention_mask=longer[:, :3]).residuals)
    with pytest.raises(ValueError, match=r"pooling='tokens' needs router-layer inputs"):
        mm.route(x[:, None, None])
    with pytest.raises(ValueError, match=r"features must all be pooled \(B, d\) or all token"):
        mass_ext.route_features([x, x[:, None]], mm.router_bases())


def test_a_deep_copy_or_pickle_of_a_model_routes_on_its_own(experts, tmp_path):
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    x, labels = task_inputs(subspaces, 3)
    with torch.no_grad():
        expected = mm(x)
        torch.save(mm, tmp_path / "mm.pt")
        for twin in (copy.deepcopy(mm), torch.load(tmp_path / "mm.pt", weights_only=False)):
            assert all(layer.state is twin._state for layer in twin.routed.values())
            assert twin._state is not mm._state
            assert torch.equal(twin(x), expected)
            assert torch.equal(twin.routing.indices[:, 0], labels)


def test_top2_with_threshold_and_softmax_runs_and_keeps_the_best_task(experts):
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", top_k=2, threshold=0.2,
                             weighting="renormalized", progress=False)
    x, labels = task_inputs(subspaces, 4)
    mm(x)
    assert torch.equal(mm.routing.indices[:, 0], labels)
    assert mm.routing.indices.shape == (len(labels), 2)


def test_tsvm_first_pass_routes_the_same_separable_inputs(experts):
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="2", first_pass="tsvm",
                             progress=False)
    x, labels = task_inputs(subspaces, 4)
    routing = mm.route(x)
    assert routing.indices.shape == (len(labels), 1)


def test_per_layer_first_pass_routes_on_features_of_the_routed_layers_below(experts, tmp_path):
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="2", first_pass="per_layer",
                             progress=False)
    x, _ = task_inputs(subspaces, 4)
    below = mm.routed["0"]
    expected = torch.tanh(mass_ext.routed_linear(x, below.weight, below.bias, below.U, below.S,
                                                 below.V, below.top_k))
    with torch.no_grad():
        (features,) = mm.router_inputs(x)
        routing = mm.route(x)
    assert torch.equal(features, expected)
    assert torch.equal(routing.indices, mass_ext.route(expected, mm.routed["2"].V).indices)
    path = tmp_path / "per_layer_first_pass.safetensors"
    mm.save(path)
    loaded = MASS.load(path, copy.deepcopy(base))
    assert loaded.first_pass == "per_layer"
    with torch.no_grad():
        assert torch.equal(loaded(x), mm(x))


def test_two_wrappers_over_one_model_each_route_with_their_own_settings(experts):
    """A second MASS over the same model (other router settings) takes the layers' routing
    state; the first still routes, runs and follows later option changes correctly."""
    base, finetuned, subspaces = experts
    first = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    alone = copy.deepcopy(first)
    second = MASS(first.model, first.task_names, router_layer="2", top_k=2)
    x, labels = task_inputs(subspaces, 3)
    with torch.no_grad():
        assert torch.equal(first(x), alone(x))
        second(x)
        first.top_k = alone.top_k = 2
        first.mode = alone.mode = "per_layer"
        assert torch.equal(first(x), alone(x))
    assert first.routing.indices.shape == (len(labels), 2)


def test_save_load_round_trip_is_exact(experts, tmp_path):
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", top_k=2, weighting="softmax",
                             progress=False)
    path = tmp_path / "bundle.safetensors"
    mm.save(path)
    skeleton = nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Linear(D_HIDDEN, D_OUT))
    loaded = MASS.load(path, skeleton)
    x, _ = task_inputs(subspaces, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), mm(x))
    assert loaded.metadata() == mm.metadata()
    a, b = mm.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p for p in os.listdir(tmp_path)] == ["bundle.safetensors"]  # no temp file left


def test_bundle_size_is_about_twice_the_base(experts, tmp_path):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    mm.save(tmp_path / "b.safetensors")
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    ratio = os.path.getsize(tmp_path / "b.safetensors") / base_bytes
    assert 1.5 < ratio < 3.0, ratio


def test_corrupt_or_mismatched_bundles_raise_clear_errors(experts, tmp_path):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    good = tmp_path / "good.safetensors"
    mm.save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    skeleton = copy.deepcopy(base)
    with pytest.raises(ValueError, match="not a readable safetensors bundle"):
        MASS.load(truncated, skeleton)
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a mass_ext bundle"):
        MASS.load(plain, skeleton)
    other = nn.Sequential(nn.Linear(D_IN, D_HIDDEN + 1), nn.Tanh(), nn.Linear(D_HIDDEN + 1, D_OUT))
    with pytest.raises(ValueError, match="weight shape"):
        MASS.load(good, other)


def test_failed_save_leaves_the_existing_bundle_untouched(experts, tmp_path, monkeypatch):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    path = tmp_path / "bundle.safetensors"
    mm.save(path)
    before = path.read_bytes()
    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        mm.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["bundle.safetensors"]


def test_bad_finetuned_checkpoints_and_router_layer(experts):
    base, finetuned, _ = experts
    bad_keys = dict(finetuned, extra={k: v for k, v in base.state_dict().items() if k != "2.bias"})
    with pytest.raises(ValueError, match=r"finetuned\['extra'\].*missing 1 key \['2.bias'\]"):
        MASS.from_finetuned(base, bad_keys, router_layer="0", progress=False)
    wrong = {k: v.clone() for k, v in base.state_dict().items()}
    wrong["0.weight"] = torch.zeros(D_HIDDEN, D_IN + 1)
    with pytest.raises(ValueError, match=r"parameter '0.weight' has shape \(32, 25\)"):
        MASS.from_finetuned(base, dict(finetuned, wrong=wrong), router_layer="0", progress=False)
    with pytest.raises(ValueError, match=r"Linear layers: \['0', '2'\]"):
        MASS.from_finetuned(base, finetuned, router_layer="1", progress=False)


def test_rank_larger_than_a_layer_allows_is_clamped_with_one_warning(experts):
    base, finetuned, subspaces = experts
    with pytest.warns(UserWarning, match=r"rank clamped.*2 \(20 -> 8\)") as record:
        mm = MASS.from_finetuned(base, finetuned, router_layer="0", rank=20, progress=False)
    assert len([w for w in record if "rank clamped" in str(w.message)]) == 1
    assert mm.routed["2"].rank == D_OUT and mm.routed["0"].rank == 20


def test_routed_linear_from_linear_reproduces_exact_low_rank_experts():
    g = torch.Generator().manual_seed(5)
    linear = nn.Linear(40, 30)
    weights = [linear.weight.detach() + torch.randn(30, 3, generator=g) @ torch.randn(3, 40, generator=g)
               for _ in range(4)]
    layer = RoutedLinear.from_linear(linear, weights, rank=3)
    x = torch.randn(5, 40, generator=g)
    for t, w in enumerate(weights):
        out = mass_ext.routed_linear(x, layer.weight, layer.bias, layer.U, layer.S, layer.V,
                                     indices=torch.full((5, 1), t), weights=torch.ones(5, 1))
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, linear.bias),
                                   atol=1e-4, rtol=1e-4)
    assert torch.allclose(layer.V @ layer.V.transpose(1, 2), torch.eye(3).expand(4, 3, 3), atol=1e-5)


def _stacked(U, V):
    """U (T, d_out, r) -> (d_out, T r) and V (T, r, d_in) -> (T r, d_in), tasks side by side."""
    T_, d_out, r = U.shape
    return U.permute(1, 0, 2).reshape(d_out, T_ * r), V.reshape(T_ * r, V.shape[-1])


def test_decorrelate_factors_gives_the_polar_factor_of_the_stacked_factors():
    """decorrelate_factors promises: stacked U has orthonormal columns and stacked V
    orthonormal rows (every task's block orthogonal to every other task's, and each V_t
    still has the orthonormal rows routing needs), and each is the NEAREST such matrix
    (the polar factor: Q^T M symmetric positive semidefinite)."""
    from mass_ext.nn import decorrelate_factors, low_rank_factors

    g = torch.Generator().manual_seed(11)
    T_, d_out, d_in, r = 3, 20, 16, 4
    deltas = torch.randn(T_, d_out, d_in, generator=g, dtype=torch.float64)
    U, _, V = low_rank_factors(deltas, r)
    Ud, Vd = decorrelate_factors(U, V)
    assert Ud.shape == U.shape and Vd.shape == V.shape
    eye = torch.eye(T_ * r, dtype=torch.float64)
    for before, after in ((_stacked(U, V)[0], _stacked(Ud, Vd)[0]),
                          (_stacked(U, V)[1].T, _stacked(Ud, Vd)[1].T)):
        torch.testing.assert_close(after.T @ after, eye, atol=1e-12, rtol=0)
        assert (before.T @ before - eye).abs().max() > 1e-2  # the tasks did overlap
        sym = after.T @ before
        torch.testing.assert_close(sym, sym.T, atol=1e-12, rtol=0)
        assert float(torch.linalg.eigvalsh((sym + sym.T) / 2).min()) >= -1e-12
    # Factors already orthogonal across tasks are left as they are.
    basis = torch.linalg.qr(torch.randn(d_in, T_ * r, generator=g, dtype=torch.float64)).Q.T
    disjoint = basis.reshape(T_, r, d_in)
    U_disjoint = torch.linalg.qr(torch.randn(d_out, T_ * r, generator=g, dtype=torch.float64)).Q
    U_disjoint = U_disjoint.reshape(d_out, T_, r).permute(1, 0, 2)
    Ud, Vd = decorrelate_factors(U_disjoint, disjoint)
    torch.testing.assert_close(Vd, disjoint, atol=1e-12, rtol=0)
    torch.testing.assert_close(Ud, U_disjoint, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="T \\* r <= min"):
        decorrelate_factors(U[..., :1].expand(T_, d_out, 6), V[:, :1].expand(T_, 6, d_in))


def test_decorrelated_model_runs_and_routes(experts):
    """decorrelate=True: every routed layer's stacked factors are orthonormal across
    tasks, and the model still runs both modes and routes the separable inputs (the
    router layer's V_t span disjoint subspaces already, so decorrelation keeps them)."""
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", decorrelate=True,
                             progress=False)
    plain = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    for name, layer in mm.routed.items():
        U_s, V_s = _stacked(layer.U.double(), layer.V.double())
        eye = torch.eye(layer.num_tasks * layer.rank, dtype=torch.float64)
        torch.testing.assert_close(U_s.T @ U_s, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(V_s @ V_s.T, eye, atol=1e-5, rtol=0)
        assert torch.equal(layer.S, plain.routed[name].S)  # the singular values are kept
    torch.testing.assert_close(mm.routed["0"].V, plain.routed["0"].V, atol=1e-5, rtol=0)
    x, labels = task_inputs(subspaces, per_task=5)
    with torch.no_grad():
        out = mm(x)
        assert torch.equal(mm.routing.indices[:, 0], labels)
        assert out.shape == (len(labels), D_OUT) and bool(out.isfinite().all())
        mm.mode = "per_layer"
        assert bool(mm(x).isfinite().all())


def test_pick_head_takes_the_most_confident_selected_head():
    routing = mass_ext.Routing(torch.tensor([[0, 2], [1, -1]]), torch.ones(2, 2), torch.zeros(2, 3))
    heads = [torch.tensor([[5.0, 1.0], [9.0, 0.0]]),          # task 0, 2 classes
             torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]),  # task 1, 3 classes
             torch.tensor([[0.0, 7.0], [0.0, 99.0]])]           # task 2
    task, prediction = mass_ext.pick_head(heads, routing)
    assert task.tolist() == [2, 1] and prediction.tolist() == [1, 1]


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48,
                                     max_position_embeddings=16)
    torch.manual_seed(0)
    base = transformers.BertModel(config).eval()
    g = torch.Generator().manual_seed(1)
    finetuned = {}
    for t in range(3):
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for k, v in state.items():
            if v.is_floating_point() and k.startswith("encoder."):
                v += 0.02 * torch.randn(v.shape, generator=g)
        finetuned[f"task{t}"] = state
    return base, finetuned


@pytest.mark.parametrize("mode", ["two_pass", "per_layer"])
def test_hf_bert_converts_and_runs(tiny_bert, mode):
    base, finetuned = tiny_bert
    mm = MASS.from_finetuned(base, finetuned, router_layer="encoder.layer.1.output.dense",
                             pooling="mean", mode=mode, progress=False).eval()
    assert len(mm.routed) == 2 * 6                     # q, k, v, o, intermediate, output per layer
    ids = torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = mm(input_ids=ids, attention_mask=mask)
        ref = base(input_ids=ids, attention_mask=mask)
    assert type(out) is type(ref)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert bool(out.last_hidden_state.isfinite().all())
    if mode == "two_pass":
        assert mm.routing.indices.shape == (4, 1)


@pytest.mark.parametrize("mode", ["two_pass", "per_layer"])
def test_compiled_hf_bert_routes_on_a_layer_past_the_first_block(tiny_bert, mode):
    """torch.compile(mm) with the router layer in the second BertLayer: compiled code of
    the first block (whose layer has no router hook) must not serve the second (dynamo
    does not guard on hooks), or pass 1 never sees the router input."""
    base, finetuned = tiny_bert
    mm = MASS.from_finetuned(base, finetuned, router_layer="encoder.layer.1.output.dense",
                             pooling="mean", mode=mode, progress=False).eval()
    ids = torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(4, 10, dtype=torch.long)
    with torch.no_grad():
        eager = mm(input_ids=ids, attention_mask=mask).last_hidden_state
        indices = mm.routing.indices.clone()
        compiled = torch.compile(mm, backend="eager")
        for _ in range(2):
            out = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
            assert torch.equal(mm.routing.indices, indices)
    assert all(not layer.router_input_hooks for layer in mm.routed.values())



def test_cli_build_and_info(tmp_path):
    """mass-ext build (factory base + safetensors checkpoints) then mass-ext info."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    base, finetuned, _ = make_experts()
    args = []
    for name, expert in finetuned.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in expert.state_dict().items()}, path)
        args += ["--task", f"{name}={path}"]
    bundle = tmp_path / "cli.safetensors"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    build = subprocess.run(
        [sys.executable, "-m", "mass_ext.cli", "build", "--base", "tests.test_model:make_base",
         *args, "--router-layer", "0", "--top-k", "2", "-o", str(bundle)],
        capture_output=True, text=True, env=env, timeout=300)
    assert build.returncode == 0, build.stderr
    info = subprocess.run([sys.executable, "-m", "mass_ext.cli", "info", str(bundle)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "tasks       3: task0, task1, task2" in info.stdout
    assert "routed      2 Linear layers, rank 2..8" in info.stdout
    assert "top_k=2" in info.stdout
    loaded = MASS.load(bundle, make_base())
    direct = MASS.from_finetuned(base, finetuned, router_layer="0", top_k=2, progress=False)
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        assert torch.equal(loaded(x), direct(x))


def make_base():
    """Factory for the CLI test: the same base as make_experts()."""
    return make_experts()[0]


def _count_checkpoint_reads(monkeypatch):
    """A Counter of (checkpoint path, key) -> tensor reads from checkpoint files, from now on."""
    from collections import Counter

    import mass_ext.model

    reads = Counter()
    original = mass_ext.model._SafetensorsCheckpoint.__getitem__

    def counting(self, key):
        reads[self.path, key] += 1
        return original(self, key)

    monkeypatch.setattr(mass_ext.model._SafetensorsCheckpoint, "__getitem__", counting)
    return reads


def test_checkpoint_files_are_read_once_one_tensor_at_a_time(tmp_path, monkeypatch):
    """From .safetensors paths (and through the CLI, with its prefix stripping), every
    tensor of every checkpoint is read exactly once, when needed: the T experts are never
    all in memory, and the build costs one read of them."""
    from collections import Counter

    from safetensors.torch import save_file

    import mass_ext.cli

    base, finetuned, _ = make_experts()
    paths, prefixed = {}, {}
    for name, expert in finetuned.items():
        state = {k: v.contiguous() for k, v in expert.state_dict().items()}
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(state, paths[name])
        prefixed[name] = tmp_path / f"{name}-prefixed.safetensors"   # a task model's file
        save_file({**{f"encoder.{k}": v for k, v in state.items()},
                   "head.weight": torch.zeros(2, D_OUT)}, prefixed[name])
    reads = _count_checkpoint_reads(monkeypatch)
    direct = MASS.from_finetuned(base, paths, router_layer="0", progress=False)
    keys = list(base.state_dict())
    assert reads == Counter({(str(p), k): 1 for p in paths.values() for k in keys})
    reads.clear()
    bundle = tmp_path / "cli.safetensors"
    mass_ext.cli.main(["build", "--base", "tests.test_model:make_base", "--router-layer", "0",
                       *[a for n, p in prefixed.items() for a in ("--task", f"{n}={p}")],
                       "-o", str(bundle)])
    assert reads == Counter({(str(p), f"encoder.{k}"): 1 for p in prefixed.values() for k in keys})
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        assert torch.equal(MASS.load(bundle, make_base())(x), direct(x))


def test_run_with_known_task_ids_matches_each_expert(experts):
    """Pass 2 alone with a given routing (e.g. known task ids) on inputs the router
    would not separate: each row gets its own expert."""
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(7))
    tasks = torch.arange(9) % T
    routing = mass_ext.Routing(tasks.unsqueeze(1), torch.ones(9, 1))  # known ids: no residuals
    with torch.no_grad():
        out = mm.run(routing, x)
        for t, expert in enumerate(finetuned.values()):
            torch.testing.assert_close(out[tasks == t], expert(x[tasks == t]), atol=2e-5, rtol=2e-5)


def test_bundle_with_wrong_version_or_tensor_shapes_is_rejected(experts, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    good = tmp_path / "good.safetensors"
    mm.save(good)
    with safe_open(good, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["mass_ext"])
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, newer, metadata={"mass_ext": json.dumps(dict(meta, format_version=99))})
    with pytest.raises(ValueError, match="format version 99"):
        MASS.load(newer, copy.deepcopy(base))
    bad_shape = tmp_path / "bad_shape.safetensors"
    broken = dict(tensors, **{"0.S": tensors["0.S"][:, :-1].contiguous()})
    save_file(broken, bad_shape, metadata={"mass_ext": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"records rank 8 .*but 0.S has shape \(3, 7\)"):
        MASS.load(bad_shape, copy.deepcopy(base))


def test_threads_calling_one_model_get_their_own_routing(experts):
    """Two-pass routing state is per thread: concurrent calls with different inputs match
    sequential calls bitwise."""
    from concurrent.futures import ThreadPoolExecutor

    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    batches = [task_inputs(subspaces, 3, seed=s)[0][: 2 + s % 5] for s in range(16)]
    with torch.no_grad():
        expected = [mm(x) for x in batches]
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(8):  # races are rare: many rounds
                got = list(pool.map(lambda x: mm(x), batches))
                assert all(torch.equal(a, b) for a, b in zip(got, expected))

    # Lockstep: a barrier at the top of every forward makes two threads run pass 1 (then
    # pass 2) at the same moment, so each one's router-input hooks see the other's calls.
    barrier = threading.Barrier(2, timeout=20)

    def wait_for_the_other_thread(_module, _inputs):
        barrier.wait()

    hook = mm.model.register_forward_pre_hook(wait_for_the_other_thread)
    try:
        with torch.no_grad(), ThreadPoolExecutor(max_workers=2) as pool:
            for i in range(0, len(batches), 2):
                got = list(pool.map(lambda x: mm(x), batches[i:i + 2]))
                assert all(torch.equal(a, b) for a, b in zip(got, expected[i:i + 2]))
    finally:
        hook.remove()


# Relative error (Frobenius) allowed against the float32 experts: a few units of the
# dtype's rounding, which the merged weight W0 + U S V and every activation incur.
_HALF_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", list(_HALF_TOLERANCE))
def test_half_precision_models_build_route_and_round_trip(experts, dtype, tmp_path):
    """Base and experts in bfloat16 or float16: the factors and averaged parameters keep
    the model's dtype, every sample reaches its own expert, and the bundle restores it."""
    base, finetuned, subspaces = experts
    half_base = copy.deepcopy(base).to(dtype)
    half_experts = {name: copy.deepcopy(m).to(dtype) for name, m in finetuned.items()}
    mm = MASS.from_finetuned(half_base, half_experts, router_layer="0", progress=False)
    assert {v.dtype for v in mm.model.state_dict().values()} == {dtype}
    x, labels = task_inputs(subspaces, 5)
    with torch.no_grad():
        out = mm(x.to(dtype))
        assert out.dtype == dtype and torch.equal(mm.routing.indices[:, 0], labels)
        for t, expert in enumerate(finetuned.values()):
            rows = labels == t
            want = expert(x[rows]).double()
            error = (out[rows].double() - want).norm() / want.norm()
            assert error < _HALF_TOLERANCE[dtype], (t, error.item())
        mm.save(tmp_path / "half.safetensors")
        loaded = MASS.load(tmp_path / "half.safetensors", copy.deepcopy(half_base))
        assert torch.equal(loaded(x.to(dtype)), out)


def test_compiled_models_read_the_routing_at_every_call(experts):
    """torch.compile of the wrapper (both modes) and of the routed model itself (per-layer:
    one graph; two-pass: under mm.applying) computes what eager mode computes, also when
    only the routing changes between calls: no decision is baked in at trace time."""
    import warnings

    base, finetuned, subspaces = experts
    batches = [task_inputs(subspaces, n, seed=s)[0] for n, s in ((4, 1), (4, 2), (3, 3))]
    for mode in ("two_pass", "per_layer"):
        mm = MASS.from_finetuned(base, finetuned, router_layer="0", mode=mode, progress=False)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eager = [(mm(x), mm.routing.indices.clone()) for x in batches]
            compiled = torch.compile(mm, backend="aot_eager")
            for x, (out, indices) in zip(batches, eager):
                torch.testing.assert_close(compiled(x), out, atol=1e-6, rtol=1e-6)
                assert torch.equal(mm.routing.indices, indices)
        # The wrapper's thread bookkeeping runs eagerly, without dynamo's warnings.
        assert not [w for w in caught if "Dynamo" in str(w.message)], mode
    # per-layer mode: the routed model compiles to one graph (no break in RoutedLinear).
    model = torch.compile(mm.model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for x, (out, _) in zip(batches, eager):
            torch.testing.assert_close(model(x), out, atol=1e-6, rtol=1e-6)

    # two-pass: the same input under two different per-sample decisions.
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    model = torch.compile(mm.model, backend="aot_eager")
    x = batches[0]
    tasks = torch.arange(len(x)) % T
    with torch.no_grad():
        for shift in range(T):
            routing = mass_ext.Routing(((tasks + shift) % T).unsqueeze(1), torch.ones(len(x), 1),
                                       torch.zeros(len(x), T))
            with mm.applying(routing):
                got = model(x)
            torch.testing.assert_close(got, mm.run(routing, x), atol=1e-6, rtol=1e-6)


def test_a_router_layer_called_twice_per_forward_routes_on_its_first_call():
    """A layer the forward calls more than once (a shared ALBERT layer; DeBERTa projects
    its position embeddings with the query layer too) routes each sample on its first
    input, in two-pass (pass 1 stops there) and per-layer mode alike."""
    torch.manual_seed(0)

    class SharedTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.out = nn.Linear(D_IN, D_IN), nn.Linear(D_IN, D_OUT)

        def forward(self, x):
            return self.out(self.shared(torch.tanh(self.shared(x))))

    base = SharedTwice()
    g = torch.Generator().manual_seed(5)
    finetuned = {}
    for t in range(T):
        finetuned[f"task{t}"] = expert = copy.deepcopy(base)
        with torch.no_grad():
            expert.shared.weight += torch.randn(D_IN, 2, generator=g) @ torch.randn(2, D_IN, generator=g)
    x = torch.randn(16, D_IN, generator=g)
    two_pass = MASS.from_finetuned(base, finetuned, router_layer="shared", progress=False)
    per_layer = MASS(two_pass.model, two_pass.task_names, router_layer="shared", mode="per_layer")
    with torch.no_grad():
        first_call = mass_ext.route(x, two_pass.routed["shared"].V)
        assert torch.equal(two_pass.route(x).indices, first_call.indices)
        per_layer(x)
        assert torch.equal(per_layer.routing.indices, first_call.indices)


def _save_sharded(state, folder, shards=2):
    """A transformers-style sharded checkpoint in `folder`: the tensors split over
    `shards` files and model.safetensors.index.json mapping each key to its file."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_sharded_checkpoints_build_like_one_file_each_tensor_read_once(experts, tmp_path,
                                                                       monkeypatch):
    """A sharded checkpoint (its folder, or its model.safetensors.index.json) builds the
    model that in-memory experts build, reading each tensor once; a missing or
    incomplete shard and a broken index are errors naming the task and the file."""
    base, finetuned, subspaces = experts
    folders = {name: _save_sharded(expert.state_dict(), tmp_path / name)
               for name, expert in finetuned.items()}
    checkpoints = dict(folders)
    checkpoints["task1"] = folders["task1"] / "model.safetensors.index.json"
    reads = _count_checkpoint_reads(monkeypatch)
    sharded = MASS.from_finetuned(base, checkpoints, router_layer="0", progress=False)
    assert set(reads.values()) == {1} and len(reads) == len(finetuned) * len(base.state_dict())
    in_memory = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    x, _ = task_inputs(subspaces, 3)
    with torch.no_grad():
        assert torch.equal(sharded(x), in_memory(x))

    index = folders["task2"] / "model.safetensors.index.json"
    shard = folders["task2"] / "model-00002-of-00002.safetensors"
    with pytest.raises(ValueError, match=r"finetuned\['task2'\]: the shard .*model-00001-of-"
                                         r"00002.safetensors lacks \['2.bias'\]"):
        text = index.read_text()
        index.write_text(text.replace('"2.bias": "model-00002', '"2.bias": "model-00001'))
        MASS.from_finetuned(base, {**finetuned, "task2": index}, router_layer="0",
                            progress=False)
    index.write_text(text)
    shard.rename(shard.with_suffix(".gone"))
    with pytest.raises(ValueError, match=r"finetuned\['task2'\]: .*model-00002-of-00002."
                                         r"safetensors is not a readable"):
        MASS.from_finetuned(base, {**finetuned, "task2": folders["task2"]}, router_layer="0",
                            progress=False)
    index.write_text("{}")
    with pytest.raises(ValueError, match=r"finetuned\['task2'\]: .*index.json is not a sharded "
                                         r"safetensors checkpoint's index"):
        MASS.from_finetuned(base, {**finetuned, "task2": index}, router_layer="0",
                            progress=False)
    with pytest.raises(ValueError, match=r"finetuned\['task2'\]: the folder .* holds no "
                                         r"model.safetensors \(nor a sharded"):
        MASS.from_finetuned(base, {**finetuned, "task2": tmp_path}, router_layer="0",
                            progress=False)


def test_load_refuses_a_skeleton_of_another_architecture(tiny_bert, tmp_path):
    """Same key names and shapes are not the same model: another activation, head count or
    model class computes something else from the bundle's tensors."""
    base, finetuned = tiny_bert
    mm = MASS.from_finetuned(base, finetuned, router_layer="encoder.layer.1.output.dense",
                             pooling="mean", progress=False).eval()
    path = tmp_path / "bert.safetensors"
    mm.save(path)
    sizes = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                 max_position_embeddings=16)
    others = [
        (transformers.BertModel(transformers.BertConfig(**sizes, num_attention_heads=2,
                                                        hidden_act="relu")),
         r"config.hidden_act 'gelu' / 'relu'"),
        (transformers.BertModel(transformers.BertConfig(**sizes, num_attention_heads=4)),
         r"config.num_attention_heads 2 / 4"),
        (transformers.RobertaModel(transformers.RobertaConfig(**sizes, num_attention_heads=2)),
         r"class BertModel / RobertaModel; config.model_type 'bert' / 'roberta'"),
    ]
    for skeleton, message in others:
        with pytest.raises(ValueError, match=r"saved from another architecture than the base "
                                             r"skeleton's \(bundle / skeleton\): .*" + message):
            MASS.load(path, skeleton)
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(4))
    loaded = MASS.load(path, transformers.BertModel(base.config))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state,
                           mm(input_ids=ids).last_hidden_state)


def test_load_restores_the_bundles_dtypes_and_fills_a_meta_skeleton(experts, tiny_bert,
                                                                     tmp_path):
    """A bfloat16 bundle loaded onto a float32 skeleton is the bfloat16 model (not float32
    layers around bfloat16 routed ones); a skeleton on the meta device is filled from the
    bundle, or refused, naming the buffers the bundle does not hold."""
    base, finetuned, subspaces = experts
    half = MASS.from_finetuned(copy.deepcopy(base).to(torch.bfloat16),
                               {n: copy.deepcopy(m).to(torch.bfloat16) for n, m in finetuned.items()},
                               router_layer="0", progress=False)
    path = tmp_path / "half.safetensors"
    half.save(path)
    x, _ = task_inputs(subspaces, 3)
    with torch.no_grad():
        want = half(x.to(torch.bfloat16))
        loaded = MASS.load(path, copy.deepcopy(base))
        assert {p.dtype for p in loaded.model.state_dict().values()} == {torch.bfloat16}
        assert torch.equal(loaded(x.to(torch.bfloat16)), want)
        with torch.device("meta"):
            skeleton = copy.deepcopy(base).to("meta")
        from_meta = MASS.load(path, skeleton)
        assert not any(t.is_meta for t in from_meta.model.state_dict().values())
        assert torch.equal(from_meta(x.to(torch.bfloat16)), want)
    bert, bert_tasks = tiny_bert
    mm = MASS.from_finetuned(bert, bert_tasks, router_layer="encoder.layer.1.output.dense",
                             pooling="mean", progress=False)
    mm.save(tmp_path / "bert.safetensors")
    with torch.device("meta"):
        skeleton = transformers.BertModel(bert.config)
    with pytest.raises(ValueError, match=r"the base skeleton has 2 keys "
                                         r"\['embeddings.position_ids', .*\] on the meta device"):
        MASS.load(tmp_path / "bert.safetensors", skeleton)


def test_router_settings_set_after_the_build_are_checked(experts, tmp_path):
    """pooling, first_pass and first_pass_scale are plain attributes: a typo set after the
    build is an error at the next call and at save, not another setting."""
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", pooling="mean", progress=False)
    x, _ = task_inputs(subspaces, 2)
    for name, value, message in (("pooling", "CLS", r"pooling must be one of .* got 'CLS'"),
                                 ("first_pass", "TSVM", r"first_pass must be one of .* got 'TSVM'"),
                                 ("first_pass_scale", -1.0,
                                  r"first_pass_scale must be a finite number > 0, got -1.0")):
        good = getattr(mm, name)
        setattr(mm, name, value)
        with pytest.raises(ValueError, match=message):
            mm(x)
        with pytest.raises(ValueError, match=message):
            mm.save(tmp_path / "typo.safetensors")
        assert not (tmp_path / "typo.safetensors").exists()
        setattr(mm, name, good)
    mm(x)


def test_tsvm_first_pass_takes_the_batch_from_the_tokens(tiny_bert):
    """The TSV-M pass applies every task to every sample: its batch size is the tokens'
    (input_ids), whichever tensor argument comes first."""
    base, finetuned = tiny_bert
    mm = MASS.from_finetuned(base, finetuned, router_layer="encoder.layer.1.output.dense",
                             pooling="mean", first_pass="tsvm", progress=False).eval()
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(6)[None]
    with torch.no_grad():
        first = mm(position_ids=positions, input_ids=ids).last_hidden_state
        indices = mm.routing.indices.clone()
        second = mm(input_ids=ids, position_ids=positions).last_hidden_state
    assert torch.equal(first, second) and torch.equal(indices, mm.routing.indices)


def test_a_batch_of_repeated_samples_names_repeat_samples(experts):
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    x, _ = task_inputs(subspaces, 2)
    routing = mm.route(x)
    with pytest.raises(ValueError, match=r"holds B = 6 samples; this input's batch is 2 x B: "
                                         r".*applying\(routing, repeat_samples=True\)"):
        with mm.applying(routing):
            mm.model(x.repeat_interleave(2, 0))
    with mm.applying(routing, repeat_samples=True):
        mm.model(x.repeat_interleave(2, 0))


def test_load_onto_a_task_model_names_the_part_that_fits(tiny_bert, tmp_path):
    base, finetuned = tiny_bert
    mm = MASS.from_finetuned(base, finetuned, router_layer="encoder.layer.1.output.dense",
                             pooling="mean", progress=False)
    mm.save(tmp_path / "bert.safetensors")
    task_model = transformers.BertForSequenceClassification(base.config)
    with pytest.raises(ValueError, match=r"holds the bundle's layers under 'bert.': load onto "
                                         r"its 'bert' part, e.g. skeleton.bert"):
        MASS.load(tmp_path / "bert.safetensors", task_model)
    MASS.load(tmp_path / "bert.safetensors", task_model.bert)


def test_load_takes_a_skeleton_rebuilt_from_the_saved_config(tiny_bert, tmp_path):
    """The architecture record must not refuse a legitimate skeleton: one rebuilt through
    save_pretrained / AutoConfig / from_config, or with a larger position limit in a RoPE
    model (a limit changes nothing below it)."""
    base, finetuned = tiny_bert
    mm = MASS.from_finetuned(base, finetuned, router_layer="encoder.layer.1.output.dense",
                             pooling="mean", progress=False).eval()
    mm.save(tmp_path / "bert.safetensors")
    base.config.save_pretrained(tmp_path / "config")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "config")
    loaded = MASS.load(tmp_path / "bert.safetensors", transformers.AutoModel.from_config(config))
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state,
                           mm(input_ids=ids).last_hidden_state)
    sizes = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    llama = transformers.LlamaModel(transformers.LlamaConfig(**sizes, max_position_embeddings=64))
    tasks = {}
    for t in range(2):
        tasks[f"t{t}"] = {k: v + 0.02 * torch.randn(v.shape) for k, v in llama.state_dict().items()}
    lm = MASS.from_finetuned(llama, tasks, router_layer="layers.0.mlp.down_proj", pooling="mean",
                             progress=False)
    lm.save(tmp_path / "llama.safetensors")
    longer = transformers.LlamaModel(transformers.LlamaConfig(**sizes, max_position_embeddings=4096))
    MASS.load(tmp_path / "llama.safetensors", longer)


def test_a_bundle_with_an_integer_tensor_where_the_skeleton_has_floats_is_refused(tiny_bert,
                                                                                   tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, finetuned = tiny_bert
    mm = MASS.from_finetuned(base, finetuned, router_layer="encoder.layer.1.output.dense",
                             pooling="mean", progress=False)
    mm.save(tmp_path / "good.safetensors")
    with safe_open(tmp_path / "good.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    key = "embeddings.LayerNorm.weight"
    tensors[key] = tensors[key].round().long()
    save_file(tensors, tmp_path / "ints.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=rf"ints.safetensors holds '{key}' as torch.int64, the "
                                         r"base skeleton as torch.float32: only floating"):
        MASS.load(tmp_path / "ints.safetensors", transformers.BertModel(base.config))


def test_routing_options_changed_after_the_build_are_checked_before_a_save(experts, tmp_path):
    """A bundle saved is a bundle that loads: top_k above T is refused at the save."""
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    mm.top_k = 7
    with pytest.raises(ValueError, match=r"top_k must be in 1..T = 1..3, got 7"):
        mm.save(tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


def test_numpy_and_0d_tensor_options_are_taken_as_numbers(experts):
    """What the op's schema takes (numpy scalars, 0-d tensors) works on every path: the
    layer, the wrapper and the reference, as Python numbers."""
    import numpy as np

    base, finetuned, subspaces = experts
    x, _ = task_inputs(subspaces, 2)
    options = dict(top_k=np.int64(2), temperature=np.float32(0.5), threshold=torch.tensor(0.0))
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False, **options)
    assert (type(mm.top_k), type(mm.temperature), type(mm.threshold)) == (int, float, float)
    layer = RoutedLinear.from_linear(base[0], [m[0].weight for m in finetuned.values()],
                                     **options)
    with torch.no_grad():
        want = mass_ext.reference.routed_linear(x, *(t.detach() for t in (
            layer.weight, layer.bias, layer.U, layer.S, layer.V)), **options)
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
        mm(x)


def test_run_compiles_without_a_graph_break(experts):
    """run's check of the routing's values reads data: it is left to the op under
    torch.compile, whose graph must stay whole."""
    base, finetuned, subspaces = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False).eval()
    x, labels = task_inputs(subspaces, 2)
    routing = mass_ext.Routing(labels[:, None], torch.ones(len(labels), 1))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda r, v: mm.run(r, v))(routing, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
