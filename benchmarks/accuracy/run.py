"""The main job: MASS on a real model with real data, task identity unknown at inference.

Fine-tunes all-MiniLM-L6-v2 separately on five text-classification tasks (cached), builds
MASS from the experts, chooses the router (first pass, layers, pooling), top-k, threshold
and head rule on the validation split only, and compares on the test split: the experts
themselves, the base encoder, static merges (weight averaging, task arithmetic, TSV-M),
MASS two-pass (top-1 and top-k) and per-layer through mass_ext, and the reference MASS
second pass. Prints the table and writes accuracy.{json,md,png} (and the README table).

    python -m benchmarks.accuracy.run            # the full experiment (6-11 min cold, 2-6 cached)
    python -m benchmarks.accuracy.run --quick    # 2 tasks, tiny splits: a smoke run
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

import mass_ext
from mass_ext import MASS
from mass_ext.model import FORMAT_VERSION

from .. import common
from . import methods as M
from .experts import ExpertCache, Recipe, fingerprint, get_experts, load_base
from .tasks import TASKS, cache_dir, load_task

# Any routed layer will do for the build; the router is chosen on validation afterwards.
BUILD_ROUTER = "encoder.layer.0.attention.self.query"
LAMBDAS = (0.1, 0.2, 0.3, 0.5, 1.0)
THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3)
MAX_TOP_K = 2


_STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", flush=True)


def normalized(outcome: M.Outcome, stream: M.Stream, reference: List[float]) -> float:
    return statistics.fmean(outcome.accuracy(stream, t) / max(reference[t], 1e-9)
                            for t in range(len(reference)))


# ---------------------------------------------------------------- choices on validation

def router_candidates(names: List[str]) -> List[List[str]]:
    """Every routed layer alone, and every run of consecutive blocks' same sublayer
    (e.g. the output.dense inputs of layers 1..4)."""
    kinds: Dict[str, List[str]] = {}
    for name in names:
        kinds.setdefault(re.sub(r"\.\d+\.", ".#.", name), []).append(name)
    candidates = [[n] for n in names]
    for members in kinds.values():
        for a in range(len(members)):
            for b in range(a + 2, len(members) + 1):
                candidates.append(members[a:b])
    return candidates


def best_router(fractions: Dict[str, Dict[str, torch.Tensor]], names: List[str],
                val: M.Stream) -> List[tuple]:
    """Router candidates scored by validation task ID from per-layer residual fractions
    (fractions[pooling][layer] (N, T)), best first: (accuracy, -layers, -last layer
    position, pooling, layers), so ties go to fewer layers, then an earlier exit."""
    order = {n: i for i, n in enumerate(names)}
    scored = []
    for pooling, by_layer in fractions.items():
        for layers in router_candidates(names):
            total = sum(by_layer[n] for n in layers)
            accuracy = (total.argmin(-1) == val.tasks).float().mean().item()
            scored.append((accuracy, -len(layers), -order[layers[-1]], pooling, layers))
    return sorted(scored, reverse=True)


def residual_fractions(x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """||x - V^T V x||^2 / ||x||^2 per row and task, through mass_ext.route: (..., T)."""
    return mass_ext.route(x, V).residuals ** 2 / (x ** 2).sum(-1, keepdim=True).clamp(min=1e-30)


@torch.no_grad()
def choose_router(mm: MASS, val: M.Stream) -> Dict[str, tuple]:
    """Per first pass, the (router layers, pooling, validation task-ID accuracy) that
    identify tasks best on validation (`best_router`). The first passes compared: the base
    model (the paper's) and per-layer MASS (the layers below the router already routed);
    "tsvm" is left out, its summed blocks are not decorrelated in this bundle. The
    poolings: mean, CLS, and tokens (each token's residual fraction averaged over the
    valid tokens, as MASS(pooling="tokens") routes)."""
    names = list(mm.routed)
    poolings = ("mean", "cls", "tokens")
    best = {}
    for first_pass in ("pretrained", "per_layer"):
        # One pass 1 gives every layer's token inputs; every pooling is computed from them.
        probe = MASS(mm.model, mm.task_names, router_layer=names, pooling="tokens",
                     first_pass=first_pass)
        per_layer = {(p, n): [] for p in poolings for n in names}
        for batch in val.batches:
            mask = batch.inputs["attention_mask"]
            for x, name in zip(probe.router_inputs(**batch.inputs), names):
                V = mm.routed[name].V
                per_layer["mean", name].append(residual_fractions(M.mean_pool(x, mask), V))
                per_layer["cls", name].append(residual_fractions(x[:, 0], V))
                per_layer["tokens", name].append(M.mean_pool(residual_fractions(x, V), mask))
        fractions = {p: {n: torch.cat(per_layer[p, n]) for n in names} for p in poolings}
        scored = best_router(fractions, names, val)
        log(f"router candidates, first pass {first_pass} (validation task-ID accuracy), best 3:")
        for accuracy, _, _, pooling, layers in scored[:3]:
            log(f"  {accuracy:.3f}  pooling={pooling}  {layers}")
        accuracy, _, _, pooling, layers = scored[0]
        best[first_pass] = (layers, pooling, accuracy)
    return best


@torch.no_grad()
def choose_routing(mm: MASS, heads, val: M.Stream, expert_val: List[float]):
    """(top_k, threshold, head rule) maximising normalized validation accuracy; ties go
    to top-1, then to the larger threshold (fewer second passes). Also the best threshold
    for top-MAX_TOP_K with that head rule: the table shows top-k even when top-1 wins."""
    per_batch = [M.mass_candidates(mm, heads, b, MAX_TOP_K, 0.0) for b in val.batches]
    scored = []
    for rule in M.HEAD_RULES:
        for k in range(1, MAX_TOP_K + 1):
            for threshold in (THRESHOLDS if k > 1 else (0.0,)):
                tasks, predictions = [], []
                for c in per_batch:
                    keep = (c.probs > threshold) & (torch.arange(MAX_TOP_K) < k)
                    keep[:, 0] = True
                    task, prediction = c.decide(rule, keep)
                    tasks.append(task)
                    predictions.append(prediction)
                outcome = M.Outcome(torch.cat(tasks), torch.cat(predictions), [])
                score = normalized(outcome, val, expert_val)
                scored.append((score, -k, threshold, rule))
    scored.sort(reverse=True)
    score, k, threshold, rule = scored[0]
    log(f"routing chosen on validation: top_k={-k}, threshold={threshold}, head rule={rule} "
        f"(normalized validation accuracy {score:.3f})")
    top_k_score, _, top_k_threshold, _ = next(c for c in scored if c[1] == -MAX_TOP_K and c[3] == rule)
    log(f"  best top-{MAX_TOP_K} with that head rule: threshold={top_k_threshold} "
        f"(normalized validation accuracy {top_k_score:.3f})")
    return -k, threshold, rule, top_k_threshold


@torch.no_grad()
def choose_lambda(base, vector_sum, heads, val: M.Stream, expert_val: List[float], rule: str):
    scores = {}
    for lam in LAMBDAS:
        outcome = M.evaluate(val, M.static_model(M.merged_encoder(base, vector_sum, lam), heads, rule))
        scores[lam] = normalized(M.oracle_head(outcome, val), val, expert_val)
    best = max(scores, key=lambda lam: (scores[lam], -lam))
    log("task arithmetic lambda on validation: "
        + ", ".join(f"{lam}: {s:.3f}" for lam, s in scores.items()) + f" -> {best}")
    return best


# ---------------------------------------------------------------- the run

def build_mass(base, tasks, states, recipe: Recipe, cache: ExpertCache) -> MASS:
    """MASS from the experts (per-task SVD of every layer), or the bundle a previous run
    saved for exactly these experts."""
    key = hashlib.sha1("|".join([*(fingerprint(t, recipe) for t in tasks), BUILD_ROUTER,
                                 str(FORMAT_VERSION)]).encode()).hexdigest()[:16]
    path = cache.root / f"mass-{key}.safetensors"
    if path.exists():
        try:
            mm = MASS.load(path, base)
            log(f"MASS: loaded the bundle {path}")
            return mm
        except ValueError as error:
            log(f"MASS: rebuilding ({error})")
    mm = MASS.from_finetuned(base, {t.name: s for t, s in zip(tasks, states)},
                             router_layer=BUILD_ROUTER, pooling="mean")
    cache.root.mkdir(parents=True, exist_ok=True)
    mm.save(path)
    return mm


def parameter_count(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())


def run(task_names: List[str], scale: float, recipe: Recipe, cache: ExpertCache,
        out_dir: Path, write_readme: bool) -> dict:
    global _STARTED
    started = _STARTED = time.perf_counter()
    torch.manual_seed(0)
    tasks = [load_task(name, scale) for name in task_names]
    for t in tasks:
        log(f"task {t.name}: {t.num_classes} classes, train/val/test "
            f"{len(t.train)}/{len(t.val)}/{len(t.test)}")
    base, tokenizer = load_base()
    experts = get_experts(base, tokenizer, tasks, recipe, cache, log)
    heads = [e.head for e in experts]
    states = [e.encoder_state for e in experts]
    expert_val = [e.val_accuracy for e in experts]
    val = M.make_stream(tasks, "val", tokenizer)
    test = M.make_stream(tasks, "test", tokenizer)

    built = build_mass(base, tasks, states, recipe, cache)
    # Every plain Linear from here on (the base, its copies, the pooler) runs oneDNN's
    # GEMM, as mass_ext's routed layers do: the latencies compare methods, not libraries.
    common.onednn_linears(base)
    common.onednn_linears(built.model)
    routers = choose_router(built, val)
    # The best first pass on validation; a tie goes to the base model (a cheaper pass 1).
    first_pass = max(routers, key=lambda fp: (routers[fp][2], fp == "pretrained"))
    layers, pooling, val_task_id = routers[first_pass]
    log(f"router chosen on validation: first pass {first_pass}, pooling {pooling}, {layers} "
        f"(task ID {val_task_id:.3f})")

    def mass_with(first_pass: str) -> MASS:
        router_layers, router_pooling, _ = routers[first_pass]
        return MASS(built.model, built.task_names, pooling=router_pooling,
                    first_pass=first_pass,
                    router_layer=router_layers if len(router_layers) > 1 else router_layers[0])

    mm = mass_with(first_pass)
    top_k, threshold, rule, top_k_threshold = choose_routing(mm, heads, val, expert_val)
    vector_sum = M.task_vector_sum(base, states)
    lam = choose_lambda(base, vector_sum, heads, val, expert_val, rule)

    rows = []

    def add(name, head, outcome, stream=test, storage=1.0, note=""):
        per_task = [outcome.accuracy(stream, t) for t in range(len(tasks))]
        rows.append({"method": name, "head": head, "accuracy": per_task, "storage": storage,
                     "latency_ms": 1e3 * statistics.median(outcome.seconds),
                     "task_id": outcome.task_identification(stream), "note": note})
        log(f"  {name:<40} avg {statistics.fmean(per_task):.3f}  "
            f"{1e3 * statistics.median(outcome.seconds):7.1f} ms/batch")

    log("evaluating on the test split (batches of 64 mixing all tasks):")
    encoders = []
    for expert in experts:
        encoders.append(copy.deepcopy(base))
        encoders[-1].load_state_dict(expert.encoder_state)
    add("fine-tuned experts (upper bound)", "oracle",
        M.evaluate(test, M.separate_experts(encoders, heads)), storage=float(len(tasks)),
        note="one model per task, the task known")
    expert_acc = rows[-1]["accuracy"]
    del encoders
    statics = [("base encoder + task heads", base),
               ("weight averaging", M.merged_encoder(base, vector_sum, 1 / len(tasks))),
               (f"task arithmetic (lambda {lam})", M.merged_encoder(base, vector_sum, lam)),
               ("TSV-M", M.tsvm_encoder(mm))]
    unknown = []
    for name, enc in statics:
        outcome = M.evaluate(test, M.static_model(enc, heads, rule))
        add(name, "oracle", M.oracle_head(outcome, test))
        unknown.append((name, outcome))
    for name, outcome in unknown[1:]:
        add(name, f"{rule} over all", outcome)

    size = parameter_count(mm.model) / parameter_count(base)
    # Top-1 and top-MAX_TOP_K from the same passes (slot 0 does not depend on the
    # threshold): with top-1 chosen, top-k runs at its own best validation threshold.
    shown_threshold = threshold if top_k > 1 else top_k_threshold
    two_pass = M.evaluate_mass_two_pass(test, mm, heads, MAX_TOP_K, shown_threshold, rule)
    top1 = two_pass[0]
    add("MASS two-pass top-1 (mass_ext)", "routed", top1, storage=size,
        note=f"first pass: {first_pass}")
    if first_pass != "pretrained":
        add("MASS two-pass top-1, base-model first pass (mass_ext)", "routed",
            M.evaluate_mass_two_pass(test, mass_with("pretrained"), heads, 1, 0.0, rule)[0],
            storage=size, note="the paper's first pass, its own best router on validation")
    add(f"MASS two-pass top-{MAX_TOP_K}, threshold {shown_threshold} (mass_ext)",
        f"{rule} of selected", two_pass[-1], storage=size,
        note="chosen on validation" if top_k > 1 else "not chosen on validation (top-1 was)")
    add("MASS, true task routed (diagnostic)", "oracle",
        M.evaluate(test, M.mass_known_task(mm, heads)), storage=size,
        note="pass 2 only, every sample routed to its own task")
    add("MASS per-layer top-1 (mass_ext)", "routed",
        M.evaluate(test, M.mass_per_layer(mm, heads, rule)), storage=size)
    reference = M.evaluate(test, M.reference_two_pass(mm, heads, 1, rule))
    add("reference MASS second pass (top-1)", "routed", reference, storage=size,
        note="plain PyTorch, one merged model per group")
    agreement = (torch.cat(top1.routing) == torch.cat(reference.routing)).all(-1).float().mean().item()
    log(f"routing decisions: mass_ext and the reference agree on {agreement:.2%} of test samples")

    for row in rows:
        row["normalized"] = [a / max(e, 1e-9) for a, e in zip(row["accuracy"], expert_acc)]
        row["avg_accuracy"] = statistics.fmean(row["accuracy"])
        row["avg_normalized"] = statistics.fmean(row["normalized"])
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": common.machine_info(),
        "tasks": [{"name": t.name, "classes": t.classes, "train": len(t.train), "val": len(t.val),
                   "test": len(t.test)} for t in tasks],
        "experts": [{"task": e.task.name, "val_accuracy": e.val_accuracy,
                     "train_seconds": e.train_seconds} for e in experts],
        "choices": {"first_pass": first_pass, "router_layer": layers, "pooling": pooling,
                    "val_task_id": val_task_id,
                    "val_task_id_by_first_pass": {fp: r[2] for fp, r in routers.items()},
                    "top_k": top_k, "threshold": threshold, "head_rule": rule,
                    f"top_{MAX_TOP_K}_threshold": top_k_threshold,
                    "task_arithmetic_lambda": lam},
        "routing_agreement_with_reference": agreement,
        "rows": rows, "seconds": time.perf_counter() - started,
    }
    write(result, out_dir, write_readme)
    return result


# ---------------------------------------------------------------- output

def table(result: dict) -> str:
    names = [t["name"] for t in result["tasks"]]
    head = ("| method | head | " + " | ".join(names) + " | avg | avg normalized | task ID "
            "| storage | ms / batch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in result["rows"]:
        cells = [f"{a:.3f} ({n:.0%})" for a, n in zip(row["accuracy"], row["normalized"])]
        lines.append(f"| {row['method']} | {row['head']} | " + " | ".join(cells)
                     + f" | {row['avg_accuracy']:.3f} | **{row['avg_normalized']:.2%}** "
                     f"| {row['task_id']:.3f} | {row['storage']:.2f}x | {row['latency_ms']:.0f} |")
    c, m = result["choices"], result["machine"]
    lines += [
        "",
        f"Measured {result['date']} on {m['cpu']} ({m['cores']} cores), torch {m['torch']} "
        f"(malloc: {m.get('malloc', 'glibc default')}), "
        f"commit {m['commit']}; {result['seconds'] / 60:.1f} min in all. Accuracy (normalized "
        "to the experts'); task identity unknown except where the head column says oracle. "
        f"Chosen on validation: first pass {c['first_pass']} (validation task ID by first "
        "pass: " + ", ".join(f"{fp} {a:.3f}" for fp, a in c["val_task_id_by_first_pass"].items())
        + f"), router {c['router_layer']} ({c['pooling']} pooling), "
        f"top_k {c['top_k']}, threshold {c['threshold']} (the top-{MAX_TOP_K} row: threshold "
        f"{c[f'top_{MAX_TOP_K}_threshold']}, its best on validation), "
        f"head rule {c['head_rule']}, task arithmetic lambda {c['task_arithmetic_lambda']}. "
        f"mass_ext and the reference agree on {result['routing_agreement_with_reference']:.2%} "
        "of routing decisions. Storage: encoder parameters relative to one model (heads "
        "excluded). Latency: median per batch of 64 on this machine, mixed tasks.",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t["name"] for t in result["tasks"]] + ["average"]
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(14, 5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = row["accuracy"] + [row["avg_accuracy"]]
        ax.bar([x + i * width for x in range(len(names))], values, width,
               color=plt.cm.tab20(i % 20), label=f"{row['method']} [{row['head']}]")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set_ylabel("test accuracy (task unknown unless [oracle])")
    ax.set_ylim(0, 1)
    ax.set_title(f"MASS on all-MiniLM-L6-v2, {len(names) - 1} tasks ({result['date']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: Path, write_readme: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = table(result)
    common.write_json(str(out_dir / "accuracy.json"), result)
    (out_dir / "accuracy.md").write_text(text + "\n")
    plot(result, out_dir / "accuracy.png")
    print("\n" + text + "\n")
    if write_readme:
        common.replace_between_markers(str(Path(common.ROOT) / "README.md"), "bench:accuracy", text)
    log(f"wrote {out_dir / 'accuracy.json'}, accuracy.md and accuracy.png")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 tasks, tiny splits, 2 training steps: checks the pipeline")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=None)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"expert cache (default {cache_dir() / 'experts'}, or $MASS_EXT_CACHE)")
    parser.add_argument("--out", type=Path, default=Path(common.ROOT) / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        names, scale, recipe = args.tasks or ["bbc", "tweets"], 0.05, Recipe(batch_size=8, max_steps=2)
    else:
        names, scale, recipe = args.tasks or list(TASKS), 1.0, Recipe()
    return run(names, scale, recipe, ExpertCache(args.cache_dir), args.out,
               write_readme=not args.quick and args.out == parser.get_default("out"))


if __name__ == "__main__":
    common.retain_freed_memory()
    main(sys.argv[1:])
