"""Every method of the comparison, evaluated on one mixed stream of all tasks' examples.

A method maps a batch to (chosen task, predicted class) per example; an example counts as
correct only if both are right, so picking the wrong task's head is an error. Methods with
an "oracle head" are given the true task instead of choosing it.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

import mass_ext
from mass_ext import MASS, Routing
from mass_ext.nn import decorrelate_factors

from .. import common
from .experts import MAX_LENGTH, batches, encode, mean_pool, tokenize
from .tasks import Task

HEAD_RULES = ("max_logit", "max_prob")


@dataclass
class Batch:
    inputs: Dict[str, torch.Tensor]
    labels: torch.Tensor
    tasks: torch.Tensor


@dataclass
class Stream:
    """Examples of several tasks in batches, as a server would see them: shuffled together
    (fixed seed), then bucketed by token length (less padding; tasks stay mixed within a
    batch, nothing tells a method which is which) and the batches shuffled."""
    labels: torch.Tensor
    tasks: torch.Tensor
    batches: List[Batch]


def make_stream(tasks: Sequence[Task], split: str, tokenizer, batch_size=64, seed=0,
                only: int = None) -> Stream:
    examples = [(text, label, t) for t, task in enumerate(tasks) if only in (None, t)
                for text, label in getattr(task, split)]
    g = torch.Generator().manual_seed(seed)
    examples = [examples[i] for i in torch.randperm(len(examples), generator=g)]
    lengths = [len(ids) for ids in tokenizer([e[0] for e in examples], truncation=True,
                                             max_length=MAX_LENGTH)["input_ids"]]
    examples = [examples[i] for i in sorted(range(len(examples)), key=lengths.__getitem__)]
    chunks = list(batches(examples, batch_size))
    examples = [e for i in torch.randperm(len(chunks), generator=g) for e in chunks[i]]
    out = []
    for chunk in batches(examples, batch_size):
        texts, labels, task_ids = zip(*chunk)
        out.append(Batch(tokenize(tokenizer, texts), torch.tensor(labels), torch.tensor(task_ids)))
    return Stream(torch.cat([b.labels for b in out]), torch.cat([b.tasks for b in out]), out)


@dataclass
class Outcome:
    task: torch.Tensor            # chosen task per example
    prediction: torch.Tensor      # predicted class within that task
    seconds: List[float]          # per batch
    routing: List[torch.Tensor] = field(default_factory=list)  # per batch: a method's extra output

    def accuracy(self, stream: Stream, t: int) -> float:
        rows = stream.tasks == t
        correct = (self.task[rows] == t) & (self.prediction[rows] == stream.labels[rows])
        return correct.float().mean().item()

    def task_identification(self, stream: Stream) -> float:
        return (self.task == stream.tasks).float().mean().item()


Method = Callable[[Batch], Tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def evaluate(stream: Stream, method: Method) -> Outcome:
    tasks, predictions, seconds, routing = [], [], [], []
    for batch in stream.batches:
        start = time.perf_counter()
        result = method(batch)
        seconds.append(time.perf_counter() - start)
        tasks.append(result[0])
        predictions.append(result[1])
        if len(result) > 2:
            routing.append(result[2])
    return Outcome(torch.cat(tasks), torch.cat(predictions), seconds, routing)


def head_scores(heads: Sequence[nn.Linear], features: torch.Tensor, rule: str):
    """(scores (B, T), predictions (B, T)): every head's confidence and class."""
    logits = [head(features) for head in heads]
    if rule == "max_logit":
        scores = [l.max(-1).values for l in logits]
    elif rule == "max_prob":
        scores = [l.softmax(-1).max(-1).values for l in logits]
    else:
        raise ValueError(f"rule must be one of {HEAD_RULES}, got {rule!r}")
    return torch.stack(scores, -1), torch.stack([l.argmax(-1) for l in logits], -1)


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, index.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- static models

def static_model(encoder: nn.Module, heads, rule: str) -> Method:
    """One encoder for every example. Returns (the most confident of all heads: task
    unknown), plus the true task's head (oracle) as the third element."""
    def method(batch: Batch):
        scores, predictions = head_scores(heads, encode(encoder, batch.inputs), rule)
        guessed = scores.argmax(-1)
        return guessed, _take(predictions, guessed), _take(predictions, batch.tasks)
    return method


def oracle_head(outcome: Outcome, stream: Stream) -> Outcome:
    """The static model's oracle-head readout (the same forward passes as `outcome`)."""
    return Outcome(stream.tasks, torch.cat(outcome.routing), outcome.seconds)


def separate_experts(encoders: Sequence[nn.Module], heads) -> Method:
    """The upper bound: every example goes through its own task's fine-tuned model (the
    task is known; a batch is split by task, one model per task)."""
    def method(batch: Batch):
        prediction = torch.empty_like(batch.labels)
        for t in batch.tasks.unique().tolist():
            rows = (batch.tasks == t).nonzero().squeeze(1)
            inputs = {k: v[rows] for k, v in batch.inputs.items()}
            prediction[rows] = heads[t](encode(encoders[t], inputs)).argmax(-1)
        return batch.tasks, prediction
    return method


def task_vector_sum(base: nn.Module, states: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Sum over tasks of (fine-tuned - base), per floating-point tensor (float64)."""
    return {key: sum(s[key].double() for s in states) - len(states) * value.double()
            for key, value in base.state_dict().items() if value.is_floating_point()}


def merged_encoder(base: nn.Module, vector_sum: Dict[str, torch.Tensor], scale: float) -> nn.Module:
    """base + scale * (sum of task vectors): task arithmetic; scale 1/T is weight averaging."""
    merged = {key: value if key not in vector_sum
              else (value.double() + scale * vector_sum[key]).to(value.dtype)
              for key, value in base.state_dict().items()}
    encoder = copy.deepcopy(base)
    encoder.load_state_dict(merged)
    return encoder.eval()


def plain_copy(mm: MASS) -> nn.Module:
    """mm's model with every RoutedLinear back to an nn.Linear (base weight and bias):
    the base encoder with the averaged 1-D parameters MASS uses."""
    plain = copy.deepcopy(mm.model)
    for name, layer in mm.routed.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight.data.copy_(layer.weight)
        if layer.bias is not None:
            linear.bias.data.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, linear)
    return common.onednn_linears(plain).eval()


def tsvm_encoder(mm: MASS) -> nn.Module:
    """TSV-M: per layer, every task's rank-r block with the stacked factors decorrelated
    (orthogonalised across tasks), all summed into the base weight."""
    encoder = plain_copy(mm)
    for name, layer in mm.routed.items():
        U, V = decorrelate_factors(layer.U.double(), layer.V.double())
        delta = torch.einsum("tor,tr,tri->oi", U, layer.S.double(), V)
        encoder.get_submodule(name).weight.data += delta.to(layer.weight.dtype)
    return encoder


# ---------------------------------------------------------------- MASS through mass_ext

@dataclass
class Candidates:
    """Pass-2 results of every candidate slot: (B, k) each; -1 / -inf where a slot was
    dropped by the threshold."""
    indices: torch.Tensor
    probs: torch.Tensor
    scores: Dict[str, torch.Tensor]   # per head rule
    predictions: torch.Tensor
    seconds: List[float]              # pass 1 + routing, then pass 2 of each slot

    def decide(self, rule: str, keep: torch.Tensor = None):
        """The kept candidate whose own head is most confident: (task, prediction)."""
        scores = self.scores[rule]
        if keep is not None:
            scores = torch.where(keep, scores, float("-inf"))
        choice = scores.argmax(-1)  # slot 0 is always kept, so never all -inf
        return _take(self.indices, choice), _take(self.predictions, choice)


def mass_candidates(mm: MASS, heads, batch: Batch, top_k: int, threshold: float) -> Candidates:
    """Pass 1 routes each sample (top_k slots, threshold); pass 2 runs the model once per
    slot, on the samples that kept it, each with its one selected task's update."""
    start = time.perf_counter()
    routing = mm.decide(mm.router_inputs(**batch.inputs), batch.inputs, top_k=top_k,
                        threshold=threshold, weighting="softmax")
    seconds = [time.perf_counter() - start]
    B = routing.indices.shape[0]
    scores = {rule: torch.full((B, top_k), float("-inf")) for rule in HEAD_RULES}
    predictions = torch.zeros(B, top_k, dtype=torch.long)
    for j in range(top_k):
        start = time.perf_counter()
        rows = (routing.indices[:, j] >= 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            seconds.append(0.0)
            continue
        tasks = routing.indices[rows, j]
        inputs = {k: v[rows] for k, v in batch.inputs.items()}
        one = Routing(tasks.unsqueeze(1), torch.ones(len(rows), 1), routing.residuals[rows])
        features = mean_pool(mm.run(one, **inputs).last_hidden_state, inputs["attention_mask"])
        for rule in HEAD_RULES:
            rule_scores, rule_predictions = head_scores(heads, features, rule)
            scores[rule][rows, j] = _take(rule_scores, tasks)
        predictions[rows, j] = _take(rule_predictions, tasks)
        seconds.append(time.perf_counter() - start)
    return Candidates(routing.indices, routing.weights, scores, predictions, seconds)


@torch.no_grad()
def evaluate_mass_two_pass(stream: Stream, mm: MASS, heads, top_k: int, threshold: float,
                           rule: str) -> List[Outcome]:
    """MASS two-pass through mass_ext, top-1 (the paper's) and top-1..top_k from the same
    runs: top-j keeps slots < j, and its time is pass 1 plus those slots' pass 2."""
    results = [([], [], [], []) for _ in range(top_k)]
    for batch in stream.batches:
        candidates = mass_candidates(mm, heads, batch, top_k, threshold)
        for j, (tasks, predictions, seconds, routing) in enumerate(results):
            keep = (candidates.indices >= 0) & (torch.arange(top_k) <= j)
            task, prediction = candidates.decide(rule, keep)
            tasks.append(task)
            predictions.append(prediction)
            seconds.append(sum(candidates.seconds[:j + 2]))
            routing.append(torch.where(keep, candidates.indices, -1)[:, :j + 1])
    return [Outcome(torch.cat(t), torch.cat(p), s, r) for t, p, s, r in results]


def mass_known_task(mm: MASS, heads) -> Method:
    """Diagnostic: pass 2 with every sample routed to its true task (no pass 1), so the
    gap to the experts is what the rank-r blocks and averaged parameters lose."""
    def method(batch: Batch):
        known = Routing(batch.tasks.unsqueeze(1), torch.ones(len(batch.tasks), 1), None)
        features = mean_pool(mm.run(known, **batch.inputs).last_hidden_state,
                             batch.inputs["attention_mask"])
        _, predictions = head_scores(heads, features, "max_logit")
        return batch.tasks, _take(predictions, batch.tasks)
    return method


def mass_per_layer(mm: MASS, heads, rule: str) -> Method:
    """Single pass: every routed layer routes its own rows (top-1); the head is the one
    the router layer's pooled input selects (mm.routing)."""
    def method(batch: Batch):
        mm.mode = "per_layer"
        try:
            hidden = mm(**batch.inputs).last_hidden_state
        finally:
            mm.mode = "two_pass"
        logits = [head(mean_pool(hidden, batch.inputs["attention_mask"])) for head in heads]
        task, prediction = mass_ext.pick_head(logits, mm.routing)
        return task, prediction, mm.routing.indices
    return method


# ---------------------------------------------------------------- the reference approach

def reference_two_pass(mm: MASS, heads, top_k: int, rule: str) -> Method:
    """The paper's reference implementation of MASS inference, in plain PyTorch: pass 1 on
    the plain model with explicit residuals (mass_ext.reference), then samples grouped by
    their selected task set, one merged model materialised per group (TSV-M over the
    selected tasks' blocks) and each group run through its own copy. With a per-layer
    first pass, pass 1 runs every Linear as mass_ext.reference.per_task_loop (each row
    routed by its own layer with explicit residuals, then one masked update per task)."""
    if mm.first_pass not in ("pretrained", "per_layer"):
        raise ValueError(f"the reference covers the pretrained and per_layer first passes, "
                         f"got {mm.first_pass!r}")
    plain = plain_copy(mm)
    layers = {name: (layer.weight.detach(), layer.U.double(), layer.S.double(), layer.V.double())
              for name, layer in mm.routed.items()}
    router_layers = mm.router_layers
    if mm.first_pass == "per_layer":
        def self_routed(layer):
            def hook(module, inputs, _output):
                return mass_ext.reference.per_task_loop(
                    inputs[0], module.weight, module.bias, layer.U, layer.S, layer.V,
                    mm.top_k, temperature=mm.temperature, threshold=mm.threshold,
                    weighting=mm.weighting)
            return hook
        first_pass = plain_copy(mm)
        for name, layer in mm.routed.items():
            first_pass.get_submodule(name).register_forward_hook(self_routed(layer))
    else:
        first_pass = plain

    class Stop(Exception):
        pass

    def router_fractions(x, mask, V):
        """Explicit ||x - V^T V x||^2 / ||x||^2 per sample and task (B, T), in float64;
        pooling "tokens": per token, then averaged over the valid ones."""
        x = (x if mm.pooling == "tokens" else mean_pool(x, mask) if mm.pooling == "mean"
             else x[:, 0]).double()
        rebuilt = torch.einsum("trd,...tr->...td", V, torch.einsum("trd,...d->...tr", V, x))
        fractions = ((x.unsqueeze(-2) - rebuilt) ** 2).sum(-1) / (x ** 2).sum(-1, keepdim=True)
        return mean_pool(fractions, mask) if mm.pooling == "tokens" else fractions

    def method(batch: Batch):
        captured = {}

        def capture(name):
            def hook(_module, inputs):
                captured[name] = inputs[0]
                if len(captured) == len(router_layers):
                    raise Stop
            return hook

        hooks = [first_pass.get_submodule(n).register_forward_pre_hook(capture(n))
                 for n in router_layers]
        try:
            first_pass(**batch.inputs)
        except Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        fractions = sum(router_fractions(captured[name], batch.inputs["attention_mask"],
                                         layers[name][3]) for name in router_layers)
        indices, _ = mass_ext.reference.select_tasks(fractions.sqrt(), top_k, mm.temperature,
                                                     0.0, "uniform")
        B = indices.shape[0]
        task = torch.empty(B, dtype=torch.long)
        prediction = torch.empty(B, dtype=torch.long)
        for selected in torch.unique(indices, dim=0):
            rows = (indices == selected).all(-1).nonzero().squeeze(1)
            chosen = selected[selected >= 0]
            weights = {}
            for name, (W0, U, S, V) in layers.items():
                Ug, Vg = U[chosen], V[chosen]
                if len(chosen) > 1:
                    Ug, Vg = decorrelate_factors(Ug, Vg)
                delta = torch.einsum("tor,tr,tri->oi", Ug, S[chosen], Vg)
                weights[f"{name}.weight"] = W0 + delta.to(W0.dtype)
            inputs = {k: v[rows] for k, v in batch.inputs.items()}
            hidden = functional_call(plain, weights, args=(), kwargs=inputs).last_hidden_state
            scores, predictions = head_scores(heads, mean_pool(hidden, inputs["attention_mask"]), rule)
            pick = chosen[scores[:, chosen].argmax(-1)]  # the most confident selected head
            task[rows] = pick
            prediction[rows] = _take(predictions, pick)
        return task, prediction, indices
    return method
