"""Model-level MASS on awkward architectures and bad input: layers that cannot be routed,
shared and tied modules, routings that do not fit a layer's input, corrupt bundles,
bad checkpoints and options. Each either works as documented or raises a clear error
naming what is wrong; nothing is silently wrong, nothing is lost."""
import copy
import json
import math
import os
import stat

import pytest
import torch
from torch import nn

import mass_ext
from mass_ext import MASS, RoutedLinear, Routing

from .small_models import D_IN, D_OUT, make_experts


@pytest.fixture(scope="module")
def experts():
    return make_experts()


def _perturbed(model: nn.Module, seed: int, only=None) -> nn.Module:
    """A 'fine-tuned' copy: every floating parameter (or those named in `only`) moved."""
    g = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if only is None or name in only:
                p += 0.1 * torch.randn(p.shape, generator=g)
    return tuned


def _bundle(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["mass_ext"])


def _write_bundle(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"mass_ext": meta if isinstance(meta, str) else json.dumps(meta)})
    return path


# ------------------------------------------------------------------ layers that cannot be routed

def test_layers_whose_weights_torch_reads_directly_are_averaged_not_silently_ignored():
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj, and
    nn.TransformerEncoderLayer's inference fast path (eval, no grad) reads linear1 and
    linear2's weights: routed layers there would never apply their task updates. MASS
    averages them instead, with one warning naming every averaged matrix (also
    in_proj_weight, which is no Linear layer), and refuses them as explicit targets."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8),
                         nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)).eval()
    names = ["0.weight", "1.self_attn.in_proj_weight", "1.self_attn.out_proj.weight",
             "1.linear1.weight"]
    finetuned = {f"t{t}": _perturbed(base, t, only=names) for t in range(2)}
    with pytest.warns(UserWarning) as record:
        mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    message = "\n".join(str(w.message) for w in record)
    assert "1.self_attn.in_proj_weight (a MultiheadAttention, not a Linear layer)" in message
    assert "1.self_attn.out_proj.weight (its MultiheadAttention reads the weight" in message
    assert "1.linear1.weight (its TransformerEncoderLayer reads the weight" in message
    assert list(mm.routed) == ["0"]
    for name in names[1:]:
        average = (finetuned["t0"].get_parameter(name) + finetuned["t1"].get_parameter(name)) / 2
        torch.testing.assert_close(mm.model.get_parameter(name), average)
    x = torch.randn(3, 5, 8)
    routing = Routing(torch.tensor([[0], [1], [0]]), torch.ones(3, 1), None)
    with torch.no_grad():   # the fast path
        fast = mm.run(routing, x)
    torch.testing.assert_close(fast, mm.run(routing, x).detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"cannot be routed: \['1.self_attn.out_proj'\]"):
        MASS.from_finetuned(base, finetuned, router_layer="0", progress=False,
                            target=["0", "1.self_attn.out_proj"])


class _FlattensTokens(nn.Module):
    """Its second Linear sees the tokens of all samples as one (B * L, d) batch,
    sample-major (as OPT's MLP does), or with `keep` only the first `keep` of those rows
    (a subset, as a mixture-of-experts expert gets)."""

    def __init__(self, keep=None):
        super().__init__()
        self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 4)
        self.keep = keep

    def forward(self, x):
        h = self.first(x)
        flat = h.reshape(-1, h.shape[-1])
        if self.keep is not None:
            return self.second(flat[:self.keep])
        return self.second(flat).reshape(*x.shape[:-1], 4)


def _flattening_mass(keep=None):
    torch.manual_seed(0)
    base = _FlattensTokens(keep)
    return MASS.from_finetuned(base, {f"t{t}": _perturbed(base, t) for t in range(2)},
                               router_layer="first", pooling="mean", progress=False)


def test_a_layer_that_sees_the_tokens_flattened_routes_each_row_by_its_sample():
    """(B * L, d) rows of the last (B, L, d) input seen, flattened sample-major, take
    their sample's decision: a mixed batch computes what each sample's task alone does."""
    mm = _flattening_mass()
    x = torch.randn(3, 2, 6)
    tasks = torch.tensor([1, 0, 1])
    with torch.no_grad():
        mixed = mm.run(Routing(tasks[:, None], torch.ones(3, 1), None), x)
        for t in range(2):
            alone = mm.run(Routing(torch.full((3, 1), t), torch.ones(3, 1), None), x)
            torch.testing.assert_close(mixed[tasks == t], alone[tasks == t], atol=1e-6, rtol=1e-6)
        assert mm(x).shape == (3, 2, 4)


def test_a_layer_that_does_not_see_the_batch_first_is_a_clear_error_in_two_pass():
    mm = _flattening_mass(keep=5)            # 5 of the 6 tokens: not one row per sample
    with torch.no_grad(), pytest.raises(ValueError, match=r"B = 3 samples.*batch first.*\(5, 6\)"):
        mm(torch.randn(3, 2, 6))
    with torch.no_grad(), pytest.raises(ValueError, match=r"B = 2 samples.*batch first.*\(4, 6\)"):
        mm.run(Routing(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), None),
               torch.randn(4, 6))
    mm.mode = "per_layer"  # every layer routes its own rows: no per-sample decision
    with torch.no_grad():
        assert mm(torch.randn(3, 2, 6)).shape == (5, 4)


def test_empty_batch_and_unbatched_input(experts):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    with torch.no_grad():
        assert mm(torch.randn(0, D_IN)).shape == (0, D_OUT)
        assert mm.routing.indices.shape == (0, 1)
        with pytest.raises(ValueError, match=r"batch first \(B, \.\.\., d\), got shape \(24,\)"):
            mm(torch.randn(D_IN))


# ------------------------------------------------------------------ shared and tied modules

class _SharedLinear(nn.Module):
    """One Linear registered under two names (applied twice)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_linear_registered_under_two_names_is_routed_under_both(tmp_path):
    torch.manual_seed(0)
    base = _SharedLinear()
    finetuned = {f"t{t}": _perturbed(base, t, only=["a.weight"]) for t in range(2)}
    mm = MASS.from_finetuned(base, finetuned, router_layer="a", rank=5, progress=False)
    assert isinstance(mm.model.a, RoutedLinear) and mm.model.b is mm.model.a
    x = torch.randn(4, 5)
    with torch.no_grad():
        for t, expert in enumerate(finetuned.values()):
            known = Routing(torch.full((4, 1), t), torch.ones(4, 1), None)
            torch.testing.assert_close(mm.run(known, x), expert(x), atol=1e-5, rtol=1e-5)
    by_second_name = MASS(mm.model, mm.task_names, router_layer="b")
    assert by_second_name.router_layers == ["a"]
    mm.save(tmp_path / "shared.safetensors")
    loaded = MASS.load(tmp_path / "shared.safetensors", _SharedLinear())
    assert loaded.model.b is loaded.model.a
    with torch.no_grad():
        assert torch.equal(loaded(x), mm(x))


class _TiedHead(nn.Module):
    """A token embedding tied to the output Linear (as in language models)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_tied_weights_fine_tuned_embedding_is_averaged_and_head_routed_from_the_base():
    torch.manual_seed(0)
    base = _TiedHead()
    finetuned = {f"t{t}": _perturbed(base, t) for t in range(2)}
    mm = MASS.from_finetuned(base, finetuned, router_layer="mix", progress=False)
    assert set(mm.routed) == {"mix", "head"}
    average = (finetuned["t0"].embed.weight + finetuned["t1"].embed.weight) / 2
    torch.testing.assert_close(mm.model.embed.weight, average)
    assert torch.equal(mm.model.head.weight, base.head.weight)   # deltas from the base


def test_tied_weights_left_tied_are_saved_once_and_restored(tmp_path):
    torch.manual_seed(0)
    base = _TiedHead()
    finetuned = {f"t{t}": _perturbed(base, t, only=["mix.weight"]) for t in range(2)}
    mm = MASS.from_finetuned(base, finetuned, router_layer="mix", progress=False)
    path = tmp_path / "tied.safetensors"
    mm.save(path)
    tensors, meta = _bundle(path)
    assert meta["aliases"] == {"head.weight": "embed.weight"} and "head.weight" not in tensors
    loaded = MASS.load(path, _TiedHead())
    ids = torch.randint(0, 11, (3, 4))
    with torch.no_grad():
        assert torch.equal(loaded(ids), mm(ids))
    assert loaded.model.head.weight is loaded.model.embed.weight


# ------------------------------------------------------------------ options and checkpoints

@pytest.mark.parametrize("options,message", [
    (dict(top_k=99), r"top_k must be in 1..T = 1..3, got 99"),
    (dict(temperature=-1.0), r"temperature must be a finite number > 0, got -1.0"),
    (dict(threshold=math.nan), r"threshold must be a finite number, got nan"),
    (dict(weighting="max"), r"weighting must be one of"),
    (dict(rank=0), r"rank must be a positive int or None \(default\), got 0"),
    (dict(rank=2.5), r"rank must be a positive int or None \(default\), got 2.5"),
    (dict(router_layer=0), r"router_layer must be a layer name or a non-empty list"),
    (dict(mode="two-pass"), r"mode must be one of \('two_pass', 'per_layer'\), got 'two-pass'"),
    (dict(pooling="CLS"), r"pooling must be one of .* got 'CLS'"),
    (dict(first_pass="TSVM"), r"first_pass must be one of .* got 'TSVM'"),
    (dict(first_pass="tsvm", first_pass_scale=0.0),
     r"first_pass_scale must be a finite number > 0, got 0.0"),
    (dict(router_layer="model.0"), r"router_layer 'model.0' is not a Linear layer .* names "
                                   r"carry no 'model.': name it '0', or"),
])
def test_bad_build_options_fail_before_the_factorisation(experts, options, message):
    base, finetuned, _ = experts
    options = dict(dict(router_layer="0", progress=False), **options)
    with pytest.raises(ValueError, match=message):
        MASS.from_finetuned(base, finetuned, **options)


@pytest.mark.parametrize("options,message", [
    (dict(top_k="2"), r"top_k must be an int, got str '2'"),
    (dict(top_k=True), r"top_k must be an int, got bool True"),
    (dict(temperature="1"), r"temperature must be a number \(float\), got str '1'"),
    (dict(threshold=None), r"threshold must be a number \(float\), got NoneType None"),
    (dict(weighting=3), r"weighting must be a str, got int 3"),
])
def test_routing_options_of_the_wrong_type_are_named(experts, options, message):
    """At the build, in the drop-in layer, and set on a layer afterwards (the op's
    dispatcher would otherwise raise its generic RuntimeError quoting the schema)."""
    base, finetuned, _ = experts
    with pytest.raises(TypeError, match=message):
        MASS.from_finetuned(base, finetuned, router_layer="0", progress=False, **options)
    linear = base[0]
    weights = [model[0].weight for model in finetuned.values()]
    with pytest.raises(TypeError, match=message):
        RoutedLinear.from_linear(linear, weights, **options)
    layer = RoutedLinear.from_linear(linear, weights)
    for name, value in options.items():
        setattr(layer, name, value)
    with pytest.raises(TypeError, match=message):
        layer(torch.randn(3, linear.in_features))


def test_from_linear_checks_the_rank_as_the_build_does(experts):
    base, finetuned, _ = experts
    weights = [model[0].weight for model in finetuned.values()]
    for rank in ("2", 2.0, True, 0):
        with pytest.raises(ValueError, match=r"rank must be a positive int or None \(default\), "
                                             f"got {rank!r}"):
            RoutedLinear.from_linear(base[0], weights, rank=rank)


def test_target_as_a_string_is_refused(experts):
    base, finetuned, _ = experts
    with pytest.raises(TypeError, match=r"target must be a list of layer names, got the string '0'"):
        MASS.from_finetuned(base, finetuned, router_layer="0", target="0", progress=False)


def test_bad_checkpoint_values_and_files_name_the_task(experts, tmp_path):
    base, finetuned, _ = experts
    nan = {k: v.clone() for k, v in finetuned["task1"].state_dict().items()}
    nan["2.weight"][0, 0] = math.nan
    with pytest.raises(ValueError, match=r"finetuned\['task1'\] parameter '2.weight' holds NaN or inf"):
        MASS.from_finetuned(base, dict(finetuned, task1=nan), router_layer="0", progress=False)
    ints = {k: v.round().long() for k, v in finetuned["task1"].state_dict().items()}
    with pytest.raises(TypeError, match=r"finetuned\['task1'\] parameter '0.weight' must be "
                                        r"floating point .*got torch.int64"):
        MASS.from_finetuned(base, dict(finetuned, task1=ints), router_layer="0", progress=False)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"finetuned\['task1'\]: .*corrupt.safetensors is not a "
                                         r"readable .safetensors state dict"):
        MASS.from_finetuned(base, dict(finetuned, task1=str(corrupt)), router_layer="0",
                            progress=False)


def test_routed_linear_checks_its_options_and_factors_when_built():
    g = torch.Generator().manual_seed(0)
    W, U, S = torch.randn(4, 6, generator=g), torch.randn(2, 4, 3, generator=g), torch.rand(2, 3)
    V = torch.linalg.qr(torch.randn(2, 6, 3, generator=g)).Q.transpose(1, 2)
    with pytest.raises(ValueError, match=r"top_k must be in 1..T = 1..2, got 0"):
        RoutedLinear(W, None, U, S, V, top_k=0)
    bad = U.clone()
    bad[1, 2, 0] = math.inf
    with pytest.raises(ValueError, match=r"U must be finite: it holds NaN or inf in task\(s\) \[1\]"):
        RoutedLinear(W, None, bad, S, V)
    # V scaled by S (task 0), or a V whose columns, not rows, are orthonormal (task 1).
    skewed = V.clone()
    skewed[0] *= S[0][:, None]
    skewed[1] = torch.linalg.qr(torch.randn(6, 3, generator=g)).Q.T * torch.tensor([[1.0], [1.0], [0.5]])
    with pytest.raises(ValueError, match=r"V must have orthonormal rows in every task .* "
                                         r"task\(s\) \[0, 1\] do not"):
        RoutedLinear(W, None, U, S, skewed)
    RoutedLinear(W, None, U, S, V.to(torch.bfloat16).float())   # rounding passes


def test_stack_router_bases_of_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match="bases must hold at least one layer's V"):
        mass_ext.stack_router_bases([])


# ------------------------------------------------------------------ pick_head

def test_pick_head_checks_its_inputs_and_marks_samples_without_a_task():
    routing = Routing(torch.tensor([[1, -1], [-1, -1]]), torch.ones(2, 2), None)
    heads = [torch.randn(2, 3), torch.tensor([[0.0, 4.0], [1.0, 0.0]])]
    task, prediction = mass_ext.pick_head(heads, routing)
    assert task.tolist() == [1, -1] and prediction.tolist() == [1, -1]
    with pytest.raises(ValueError, match=r"B = 2 .*got shapes \[\(2, 3\), \(3, 2\)\]"):
        mass_ext.pick_head([torch.randn(2, 3), torch.randn(3, 2)], routing)
    with pytest.raises(ValueError, match=r"got shapes \[\]"):
        mass_ext.pick_head([], routing)
    with pytest.raises(ValueError, match=r"selects task 1, but head_logits holds only 1 heads"):
        mass_ext.pick_head(heads[:1], routing)


# ------------------------------------------------------------------ bundles

@pytest.fixture
def saved(experts, tmp_path):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    mm.save(tmp_path / "good.safetensors")
    tensors, meta = _bundle(tmp_path / "good.safetensors")
    return base, tensors, meta


def _corrupt(tensors, meta, tweak):
    tensors, meta = dict(tensors), copy.deepcopy(meta)
    tweak(tensors, meta)
    return tensors, meta


@pytest.mark.parametrize("tweak,message", [
    (lambda t, m: t.pop("2.bias"), r"incomplete: missing \['2.bias'\]"),
    (lambda t, m: t.pop("0.U_t"), r"incomplete: missing \['0.U_t'\]"),
    (lambda t, m: t.update({"2.U_t": t["2.U_t"][:2].clone(), "2.S": t["2.S"][:2].clone(),
                            "2.V": t["2.V"][:2].clone()}),
     r"invalid settings: every routed layer must hold one block per task \(3 task_names\).*'2': 2"),
    (lambda t, m: m.update(task_names=["a", "b"]), r"one block per task \(2 task_names\)"),
    (lambda t, m: m.update(task_names=["a", "a", "b"]), r"task_names must be distinct"),
    (lambda t, m: m.pop("routed_layers"), r"'routed_layers' must be a JSON object, got NoneType"),
    (lambda t, m: m["router"].update(colour="red"), r"unknown router settings \['colour'\]"),
    (lambda t, m: m["router"].update(top_k=7), r"top_k must be in 1..T = 1..3, got 7"),
    (lambda t, m: t.update({"0.S": t["0.S"].double()}),
     r"routed layer '0' is invalid: S must have the dtype of x \(float32\), got float64"),
    (lambda t, m: t.update({"0.U_t": t["0.U_t"][0].clone()}), r"routed layer '0' is invalid"),
    (lambda t, m: t.update({"2.V": t["2.V"] * torch.tensor([1.0, 3.0, 1.0])[:, None, None]}),
     r"routed layer '2' is invalid: V must have orthonormal rows .* task\(s\) \[1\]"),
    (lambda t, m: t.update({"2.V": t["2.V"][:, :1].clone()}),
     r"routed layer '2' is invalid: the bundle records rank 2 .*but 2.V has shape \(3, 1, 32\)"),
], ids=["no bias", "no U", "fewer tasks in one layer", "fewer task names", "repeated task names",
        "no routed_layers", "unknown setting", "bad top_k", "float64 factor", "2-D U",
        "V not orthonormal", "V of a smaller rank"])
def test_incomplete_or_inconsistent_bundles_are_refused(saved, tmp_path, tweak, message):
    base, tensors, meta = saved
    path = _write_bundle(tmp_path / "bad.safetensors", *_corrupt(tensors, meta, tweak))
    with pytest.raises(ValueError, match=message):
        MASS.load(path, copy.deepcopy(base))


def test_bundle_with_metadata_that_is_not_json_is_refused(saved, tmp_path):
    base, tensors, _ = saved
    path = _write_bundle(tmp_path / "bad.safetensors", tensors, "{not json")
    with pytest.raises(ValueError, match="corrupt mass_ext metadata \\(not JSON"):
        MASS.load(path, copy.deepcopy(base))


def test_version_1_bundles_still_load(saved, tmp_path):
    base, tensors, meta = saved
    meta = dict(meta, format_version=1)
    del meta["aliases"]
    path = _write_bundle(tmp_path / "v1.safetensors", tensors, meta)
    assert MASS.load(path, copy.deepcopy(base)).task_names == meta["task_names"]


def test_save_keeps_permissions_and_follows_symbolic_links(experts, tmp_path):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    fresh = tmp_path / "fresh.safetensors"
    mm.save(fresh)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    fresh.chmod(0o640)
    mm.save(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    link = tmp_path / "link.safetensors"
    link.symlink_to(fresh)
    fresh.write_bytes(b"old")
    mm.save(link)
    assert link.is_symlink() and fresh.stat().st_size > 3
    assert sorted(os.listdir(tmp_path)) == ["fresh.safetensors", "link.safetensors"]
    with pytest.raises(IsADirectoryError, match="path must name a file"):
        mm.save(tmp_path)


def test_first_pass_scale_is_a_build_option(experts):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", first_pass="tsvm",
                             first_pass_scale=0.5, progress=False)
    assert mm.first_pass_scale == 0.5 and mm.metadata()["router"]["first_pass_scale"] == 0.5


def test_the_same_checkpoint_twice_warns(experts):
    """Two tasks with the same router-layer weight have the same subspaces: routing always
    picks the first of them."""
    base, finetuned, _ = experts
    twice = dict(finetuned, again=finetuned["task0"])
    with pytest.warns(UserWarning, match=r"router_layer '0' has the same weight in tasks "
                                         r"\[\('task0', 'again'\)\] \(the same checkpoint twice\?\)"):
        MASS.from_finetuned(base, twice, router_layer="0", progress=False)


@pytest.mark.parametrize("scale", [math.nan, -1.0, 0.0, "x", None])
def test_first_pass_scale_must_be_a_positive_number(experts, scale):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    with pytest.raises(ValueError, match="first_pass_scale must be a finite number > 0"):
        MASS(mm.model, mm.task_names, router_layer="0", first_pass="tsvm",
             first_pass_scale=scale)


def test_run_and_applying_check_the_routing(experts):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    x = torch.randn(2, D_IN)
    with pytest.raises(TypeError, match="routing must be a Routing .* got tuple"):
        mm.run((torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)), x)
    with pytest.raises(ValueError, match=r"int64 indices \(B, k\).*got indices \(2,\)"):
        mm.run(Routing(torch.zeros(2, dtype=torch.long), torch.ones(2), None), x)
    with pytest.raises(ValueError, match=r"weights of their shape.*weights \(2, 2\)"):
        mm.run(Routing(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 2), None), x)
    # A task id out of range is named by sample (the op would name a row of the layer).
    for bad in (3, -2):
        routing = Routing(torch.tensor([[0], [1], [bad]]), torch.ones(3, 1), None)
        with pytest.raises(IndexError, match=r"routing.indices must hold task ids in \[-1, T\) "
                                             rf"= \[-1, 3\), got {bad} at sample 2, slot 0"):
            mm.run(routing, torch.randn(3, D_IN))
        with pytest.raises(IndexError, match=rf"got {bad} at sample 2"):
            with mm.applying(routing):
                pass


def test_router_layer_named_twice_is_refused(experts):
    """Twice the same layer (or a module under both its names) would count its residuals
    twice and keep pass 1 from stopping early."""
    base, finetuned, _ = experts
    with pytest.raises(ValueError, match=r"router_layer must name each layer once, got "
                                         r"\['0', '0'\], which names \['0'\] more than once"):
        MASS.from_finetuned(base, finetuned, router_layer=["0", "0"], progress=False)


def test_pick_head_refuses_heads_keyed_by_name():
    routing = Routing(torch.tensor([[0], [1]]), torch.ones(2, 1), None)
    heads = {"a": torch.randn(2, 3), "b": torch.randn(2, 3)}
    with pytest.raises(TypeError, match=r"in task order \(a list\), got a mapping: .*"
                                        r"\[heads\[name\] for name in mm.task_names\]"):
        mass_ext.pick_head(heads, routing)


def test_pick_head_takes_any_iterable_and_refuses_float_indices():
    routing = Routing(torch.tensor([[1], [0]]), torch.ones(2, 1), None)
    heads = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0], [1.0, 0.0]])]
    task, prediction = mass_ext.pick_head(iter(heads), routing)
    assert task.tolist() == [1, 0] and prediction.tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"int64 indices \(B, k\).*torch.float32"):
        mass_ext.pick_head(heads, Routing(routing.indices.float(), routing.weights, None))


def test_router_layer_every_task_must_change(experts):
    """A task that leaves the router layer unchanged has an arbitrary subspace there
    (S = 0): routing could not pick it, so the build refuses, even with target= given."""
    base, finetuned, _ = experts
    lazy = dict(finetuned, task1={**finetuned["task1"].state_dict(), "0.weight": base[0].weight})
    for target in (None, ["0", "2"]):
        with pytest.raises(ValueError, match=r"router_layer '0' is not changed by task\(s\) \['task1'\]"):
            MASS.from_finetuned(base, lazy, router_layer="0", target=target, progress=False)


def test_decorrelate_too_many_directions_names_the_layer(experts):
    base, finetuned, _ = experts
    with pytest.raises(ValueError, match=r"layer '2' has 3 \* 8 > 8: pass a smaller rank="):
        MASS.from_finetuned(base, finetuned, router_layer="0", rank=8, decorrelate=True,
                            progress=False)


def test_linear_layers_left_out_of_target_are_averaged_with_that_reason(experts):
    base, finetuned, _ = experts
    with pytest.warns(UserWarning, match=r"2\.weight \(not in target\)"):
        mm = MASS.from_finetuned(base, finetuned, router_layer="0", target=["0"], progress=False)
    assert list(mm.routed) == ["0"]


def test_finetuned_must_be_a_mapping_and_from_linear_needs_a_task(experts):
    base, finetuned, _ = experts
    with pytest.raises(TypeError, match=r"finetuned must map task names to checkpoints "
                                        r"\(a dict\), got list"):
        MASS.from_finetuned(base, list(finetuned.values()), router_layer="0", progress=False)
    with pytest.raises(ValueError, match=r"deltas_or_weights must hold at least one task"):
        RoutedLinear.from_linear(nn.Linear(4, 3), [])


def test_a_prefixed_checkpoint_is_named_with_its_prefix_and_counts(experts):
    """A task model's state dict around the base (keys under 'body.'): the error counts the
    keys and names the prefix."""
    base, finetuned, _ = experts
    state = {f"body.{k}": v for k, v in finetuned["task1"].state_dict().items()}
    count = len(state)
    with pytest.raises(ValueError, match=rf"missing {count} keys \[.*\].*unexpected {count} keys "
                                         rf".*carry the prefix 'body.'"):
        MASS.from_finetuned(base, dict(finetuned, task1=state), router_layer="0", progress=False)


def test_save_into_a_missing_folder_names_the_folder(experts, tmp_path):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    with pytest.raises(FileNotFoundError, match=rf"folder {tmp_path / 'nowhere'} does not exist"):
        mm.save(tmp_path / "nowhere" / "bundle.safetensors")
    assert not (tmp_path / "nowhere").exists()


def test_load_takes_the_pooling_given(saved, tmp_path):
    """pooling= replaces the bundle's setting (a string one too), as it does for a
    callable."""
    base, tensors, meta = saved
    assert meta["router"]["pooling"] == "cls"
    path = tmp_path / "good.safetensors"
    assert MASS.load(path, base).pooling == "cls"
    assert MASS.load(path, base, pooling="mean").pooling == "mean"
    with pytest.raises(ValueError, match=r"pooling must be one of .* got 'max'"):
        MASS.load(path, base, pooling="max")


def test_the_wrapper_takes_the_models_mode(experts):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(copy.deepcopy(base).eval(), finetuned, router_layer="0",
                             progress=False)
    assert not mm.training and not mm.model.training
    assert MASS(mm.model.train(), mm.task_names, router_layer="0").training


def test_an_input_of_another_dtype_than_the_model_is_named(experts):
    base, finetuned, _ = experts
    mm = MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    half = MASS.from_finetuned(copy.deepcopy(base).to(torch.bfloat16), finetuned, router_layer="0",
                               progress=False)
    x = torch.randn(3, D_IN)
    for mode in ("two_pass", "per_layer"):
        half.mode = mode
        with torch.no_grad(), pytest.raises(TypeError, match=r"weights are torch.bfloat16, its "
                                                             r"input torch.float32: cast"):
            half(x)
    assert mm(x).dtype == torch.float32
