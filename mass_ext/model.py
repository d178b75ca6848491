"""Model-level MASS: build a routed model from a base model and T fine-tuned copies, route
each sample (two-pass, as in the paper, or every layer on its own rows), pick heads, and
store everything in one safetensors bundle."""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import numbers
import os
import stat
import threading
import uuid
import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import ops, reference
from ._validation import check_index_values, check_routing_options
from .nn import (RoutedLinear, _RouteState, check_rank, default_rank, is_linear, linear_weight,
                 task_factors)
from .routing import Routing

FORMAT_VERSION = 2        # 2: tensors shared under several names stored once ("aliases")
READABLE_VERSIONS = (1, 2)
FIRST_PASSES = ("pretrained", "tsvm", "per_layer")
POOLINGS = ("cls", "mean", "tokens")
MODES = ("two_pass", "per_layer")
# Keyword arguments through which transformers models take a KV cache.
_CACHE_ARGUMENTS = ("past_key_values", "cache", "cache_params", "past_key_value")

_eager_get_ident = None
# Guards RoutedLinear.router_input_hooks, counted up and down by threads' passes.
_ROUTER_HOOKS_LOCK = threading.Lock()


def _thread_id() -> int:
    """The calling thread's id (the router-input hooks count only the calls of the thread
    that registered them), read eagerly under torch.compile, which cannot trace it. The
    wrapper is made at the first call: torch.compiler.disable imports dynamo (~1 s)."""
    global _eager_get_ident
    if _eager_get_ident is None:
        _eager_get_ident = torch.compiler.disable(threading.get_ident)
    return _eager_get_ident()

Checkpoint = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]
RouterLayers = Union[str, Sequence[str]]


def _state_dict(checkpoint: Checkpoint, name: str) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, nn.Module):
        return {k: v.detach() for k, v in checkpoint.state_dict().items()}
    if isinstance(checkpoint, Mapping):
        return checkpoint  # read, never changed: a lazy mapping stays lazy
    if isinstance(checkpoint, (str, os.PathLike)):
        return _SafetensorsCheckpoint(os.fspath(checkpoint), f"finetuned[{name!r}]")
    raise TypeError(f"finetuned[{name!r}] must be an nn.Module, a state dict or a path to a "
                    f".safetensors file, a sharded checkpoint's index or a model folder, got "
                    f"{type(checkpoint).__name__}")


SHARD_INDEX = "model.safetensors.index.json"   # transformers' sharded checkpoints


def checkpoint_path(path: str, argument: str) -> str:
    """The .safetensors file or shard index (model.safetensors.index.json) that `path`
    names, or that the model folder `path` holds; `argument` names it in errors."""
    if os.path.isdir(path):
        for name in ("model.safetensors", SHARD_INDEX):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise ValueError(f"{argument}: the folder {path} holds no model.safetensors (nor a "
                         f"sharded checkpoint's {SHARD_INDEX})")
    if not os.path.isfile(path):
        raise ValueError(f"{argument}: checkpoint {path} does not exist")
    return path


def _shard_map(index: str, argument: str) -> dict:
    """{key: shard file} of a sharded checkpoint's index (its "weight_map")."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(v, str) for v in weight_map.values())):
            raise ValueError("weight_map must map every key to a shard file name")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{argument}: {index} is not a sharded safetensors checkpoint's "
                         f"index ({type(error).__name__}: {error})") from error
    folder = os.path.dirname(index)
    return {key: os.path.join(folder, shard) for key, shard in weight_map.items()}


def checkpoint_files(path: str, argument: str) -> list:
    """Every file a checkpoint reads: the .safetensors file, or the index and its shards."""
    path = checkpoint_path(path, argument)
    if not path.endswith(".json"):
        return [path]
    return [path, *sorted(set(_shard_map(path, argument).values()))]


class _SafetensorsCheckpoint(Mapping):
    """A .safetensors state dict (one file, or the shards of a transformers index, or a
    model folder holding either) read one tensor at a time, when asked: building from T
    checkpoints holds one layer of each in memory, not T whole models."""

    def __init__(self, path: str, argument: str):
        from safetensors import safe_open

        self.argument = argument  # the argument it came from, for errors
        self.path = checkpoint_path(path, argument)
        shards = (_shard_map(self.path, argument) if self.path.endswith(".json")
                  else None)
        self._handles = {}  # file -> open handle
        for file in ([self.path] if shards is None else sorted(set(shards.values()))):
            try:
                self._handles[file] = handle = safe_open(file, framework="pt")
                keys = list(handle.keys())
            except Exception as error:  # safetensors raises several types for a bad file
                raise self._unreadable(file, error) from error
            if shards is not None:
                present = set(keys)
                missing = sorted(k for k, f in shards.items() if f == file and k not in present)
                if missing:
                    raise ValueError(f"{argument}: the shard {file} lacks {missing[:5]}, which "
                                     f"its index {self.path} places there")
        self._file_of = shards if shards is not None else dict.fromkeys(keys, self.path)
        self._keys = list(self._file_of)

    def _unreadable(self, file: str, error: Exception) -> ValueError:
        return ValueError(f"{self.argument}: {file} is not a readable "
                          f".safetensors state dict ({type(error).__name__}: {error})")

    def __getitem__(self, key: str) -> torch.Tensor:
        file = self._file_of.get(key)
        if file is None:
            raise KeyError(key)
        try:
            return self._handles[file].get_tensor(key)
        except Exception as error:
            raise self._unreadable(file, error) from error

    def __contains__(self, key) -> bool:  # Mapping's would read the tensor
        return key in self._file_of

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _keep_output_layer_untied(model: nn.Module) -> None:
    """A routed output layer keeps its own base weight, while the input embeddings it was
    tied to are averaged: a transformers model would re-tie them on tie_weights() unless
    its config says not to."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        output_layer = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return
    if isinstance(output_layer, RoutedLinear):
        config.tie_word_embeddings = False


def _warn_averaged_matrices(base: nn.Module, merged: dict, readers: dict) -> None:
    """One warning naming the weight matrices whose task updates were averaged though
    they are not embeddings (which MASS averages by design)."""
    averaged = []
    for key, value in merged.items():
        owner, _, _ = key.rpartition(".")
        module = base.get_submodule(owner) if owner else base
        if value.dim() < 2 or isinstance(module, nn.Embedding):
            continue
        why = (f"its {readers[owner]} reads the weight without calling the layer"
               if owner in readers else "not in target" if is_linear(module)
               else f"a {type(module).__name__}, not a Linear layer")
        averaged.append(f"{key} ({why})")
    if averaged:
        warnings.warn("not routed, their task updates averaged instead: " + ", ".join(averaged),
                      stacklevel=3)


def _checkpoint_label(name: str, state: Mapping) -> str:
    """How errors name a checkpoint: the argument it came from (e.g. the CLI's --task)."""
    return getattr(state, "argument", f"finetuned[{name!r}]")


def _check_keys(name: str, state: Mapping, base_state: dict) -> None:
    missing = sorted(set(base_state) - set(state))
    extra = sorted(set(state) - set(base_state))
    if missing or extra:
        raise ValueError(f"{_checkpoint_label(name, state)} does not match the base model: "
                         f"{_some_keys('missing', missing)}, {_some_keys('unexpected', extra)}"
                         f"{_prefix_hint(missing, extra)}")


def key_prefix(names, keys) -> tuple:
    """(prefix, found): the prefix (none, or a first name component and ".") under which
    `names` hold the most of `keys`, and those keys. HF checkpoints of a task model (e.g.
    BertForSequenceClassification) hold the encoder's keys under "bert."."""
    names = set(names)
    prefixes = ["", *sorted({k.split(".", 1)[0] + "." for k in names if "." in k})]
    found = {p: {k for k in keys if p + k in names} for p in prefixes}
    prefix = max(prefixes, key=lambda p: len(found[p]))  # ties: the earliest, "" first
    return prefix, found[prefix]


def _prefix_hint(missing: Sequence[str], extra: Sequence[str]) -> str:
    """A hint when the unexpected keys hold most of the missing ones under a prefix."""
    prefix, found = key_prefix(extra, missing)
    if not prefix or 2 * len(found) < len(missing):
        return ""
    return (f" (its keys carry the prefix {prefix!r}: pass the base model's part of the "
            "fine-tuned model, or its state dict without the prefix)")


def _check_tensor(name: str, state: Mapping, key: str, tensor, base_value: torch.Tensor) -> None:
    """The base's shape, floating where the base is, finite."""
    label = _checkpoint_label(name, state)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{label} parameter {key!r} must be a tensor, got "
                        f"{type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(base_value.shape):
        raise ValueError(f"{label} parameter {key!r} has shape {tuple(tensor.shape)}, base "
                         f"has {tuple(base_value.shape)}")
    if base_value.is_floating_point():
        if not tensor.is_floating_point():
            raise TypeError(f"{label} parameter {key!r} must be floating point like the "
                            f"base's ({base_value.dtype}), got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{label} parameter {key!r} holds NaN or inf")


def _linear_names(model: nn.Module) -> list:
    """Layers MASS can route: nn.Linear and transformers' Conv1D (GPT-2)."""
    return [name for name, m in model.named_modules() if is_linear(m)]


_LINEAR_LAYERS = "Linear layer (nn.Linear or transformers' Conv1D)"

# Modules that may read their Linear children's weights without calling them, so a routed
# layer there would never route: nn.MultiheadAttention passes out_proj.weight to
# F.multi_head_attention_forward; nn.TransformerEncoderLayer's inference fast path (eval,
# no grad) reads linear1 and linear2's weights.
_WEIGHT_READERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _weight_readers(model: nn.Module) -> dict:
    """Linear layers whose parent reads their weight without calling them: name -> the
    parent's type."""
    return {f"{parent_name}.{child}" if parent_name else child: type(parent).__name__
            for parent_name, parent in model.named_modules()
            if isinstance(parent, _WEIGHT_READERS)
            for child, m in parent.named_children() if isinstance(m, nn.Linear)}


def _canonical_name(model: nn.Module, name: str) -> str:
    """The first name of the module registered at `name` (a module registered under two
    names is known by its first); `name` itself when there is no such module."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return name
    return next(n for n, m in model.named_modules() if m is module)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts `module` at `name` and at every other name of the module it replaces (a
    module registered twice stays shared)."""
    old = model.get_submodule(name)
    aliases = [a for a, m in model.named_modules(remove_duplicate=False) if m is old]
    for alias in aliases:
        parent_name, _, child = alias.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class _EarlyExit(Exception):
    """Raised by the router layer's hook to stop pass 1 once its input is known."""


class MASS(nn.Module):
    """A base model whose Linear layers carry T routed low-rank task updates.

    Call it like the base model: same arguments, same outputs. `routing` holds the
    per-sample decision of the last call (with several threads, of the last call in any
    thread: use `route` + `run` to keep each thread's); in per-layer mode it is the
    decision the router layer's pooled input would take, for picking heads. `task_names`
    the tasks. Threads may call one model at once: the routing state is per thread.
    Build with `MASS.from_finetuned`, store with `save`, restore with `MASS.load`.

    router_layer names one routed Linear, or several: their pooled inputs are then
    scaled to unit norm and routed together (residual fractions summed over the layers),
    which identifies tasks more reliably than any single layer.

    pooling: "cls" (the first token), "mean" (over valid tokens when an attention_mask is
    passed), "tokens" (every token routed, a sample's residual fractions averaged over its
    valid tokens: see `route_features`), or a callable (router input, forward kwargs) ->
    (B, d), or (B, L, d) to route every token (all L count). In an encoder-decoder model,
    attention_mask describes the encoder's tokens: the built-in poolings need router
    layers in the encoder.
    """

    def __init__(self, model: nn.Module, task_names: Sequence[str], *,
                 router_layer: RouterLayers,
                 pooling: Union[str, Callable] = "cls", top_k: int = 1,
                 temperature: float = 1.0, threshold: float = 0.0,
                 weighting: str = "uniform", mode: str = "two_pass",
                 first_pass: str = "pretrained", first_pass_scale: float = 1.0):
        super().__init__()
        self.mode = mode
        _check_first_pass(first_pass, first_pass_scale)
        _check_pooling(pooling)
        self.model = model
        self.train(model.training)  # the wrapper's mode is the model's
        if pooling == "cls" and _generates_left_to_right(model):
            warnings.warn(
                "pooling='cls' routes each sample on its first token, which in a decoder-only "
                "model has seen no other token: prompts that start alike (a BOS token) all "
                "route alike. Use pooling='mean' or 'tokens'", stacklevel=2)
        self.task_names = list(task_names)
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task_names must be distinct, got {self.task_names}")
        self.routed = {name: m for name, m in model.named_modules() if isinstance(m, RoutedLinear)}
        other_counts = {n: m.num_tasks for n, m in self.routed.items()
                        if m.num_tasks != len(self.task_names)}
        if other_counts:
            raise ValueError(f"every routed layer must hold one block per task "
                             f"({len(self.task_names)} task_names), but these hold another "
                             f"number: {other_counts}")
        options = check_routing_options(top_k, len(self.task_names), temperature, threshold,
                                        weighting)
        self.router_layers = _router_layer_list(router_layer, model)
        for name in self.router_layers:
            if name not in self.routed:
                raise ValueError(
                    f"router_layer must name routed Linear layers; {name!r} is not one. "
                    f"Routed layers: {sorted(self.routed)}")
        self.router_layer, self.pooling = router_layer, pooling
        outside = self._router_layers_outside_encoder()
        if outside and not callable(pooling):
            raise ValueError(
                f"router_layer {outside} is outside the encoder of this encoder-decoder "
                f"model: pooling={pooling!r} pools with attention_mask, which describes the "
                "encoder's tokens, so the router layers must be in the encoder "
                "(model.get_encoder()); a pooling callable (router input, forward kwargs) "
                "may route on any layer")
        self.first_pass, self.first_pass_scale = first_pass, first_pass_scale
        self.top_k, self.temperature, self.threshold, self.weighting = options
        self._state = _RouteState()
        self._bind_layers()
        self.routing: Optional[Routing] = None

    def _bind_layers(self) -> None:
        """Points every routed layer at this wrapper's routing state and options. Called
        on every pass: another MASS over the same model (other router settings) may have
        taken the layers since (so two wrappers over one model must not run at the same
        time), and top_k etc. may have been changed on this one."""
        options = (self.top_k, self.temperature, self.threshold, self.weighting)
        # Called outside a pass (e.g. the model's own generate), a two-pass model's layers
        # refuse: routing each row by itself would silently be per-layer MASS.
        idle = "self" if self.mode == "per_layer" else "refuse"
        for layer in self.routed.values():
            # Reads are cheap, nn.Module's __setattr__ is not: write only what changed.
            if layer.state is not self._state:
                layer.state = self._state
            if (layer.top_k, layer.temperature, layer.threshold, layer.weighting) != options:
                layer.top_k, layer.temperature, layer.threshold, layer.weighting = options
            if layer.idle_mode != idle:
                layer.idle_mode = idle

    @property
    def mode(self) -> str:
        """"two_pass" (the paper: pass 1 routes each sample) or "per_layer" (every routed
        layer routes each of its rows)."""
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        _check_mode(mode)
        self._mode = mode
        if "_state" in self.__dict__:
            self._bind_layers()

    def _check_settings(self) -> None:
        """The router settings held as plain attributes (they may be set after the build):
        checked on every pass and before a save, so a typo is an error, not another
        setting, and a saved bundle always loads."""
        _check_pooling(self.pooling)
        _check_first_pass(self.first_pass, self.first_pass_scale)
        check_routing_options(self.top_k, len(self.task_names), self.temperature,
                              self.threshold, self.weighting)

    @contextlib.contextmanager
    def _pass(self, mode: Optional[str], routing: Optional[Routing] = None,
              repeat_samples: bool = False):
        """This thread's routed layers run in `mode` ("self", "base", "prerouted" with
        `routing`) within the block; the previous instruction is restored after it."""
        self._check_settings()
        self._bind_layers()
        state = self._state
        before = (state.mode, state.indices, state.weights, state.repeat_samples, state.repeated,
                  state.tokens)
        state.mode, state.repeat_samples, state.repeated, state.tokens = (
            mode, repeat_samples, {}, None)
        state.indices, state.weights = (None, None) if routing is None else (
            routing.indices, routing.weights)
        try:
            yield
        finally:
            (state.mode, state.indices, state.weights, state.repeat_samples, state.repeated,
             state.tokens) = before

    # ------------------------------------------------------------------ building
    @classmethod
    def from_finetuned(cls, base: nn.Module, finetuned: Mapping[str, Checkpoint], *,
                       rank: Optional[int] = None, router_layer: RouterLayers,
                       pooling: Union[str, Callable] = "cls", top_k: int = 1,
                       temperature: float = 1.0, threshold: float = 0.0,
                       weighting: str = "uniform", mode: str = "two_pass",
                       target: Optional[Sequence[str]] = None, first_pass: str = "pretrained",
                       first_pass_scale: float = 1.0, decorrelate: bool = False,
                       progress: bool = True) -> "MASS":
        """Builds MASS from `base` (left untouched) and named fine-tuned checkpoints (an
        nn.Module, a state dict, or a path: a .safetensors file, a sharded checkpoint's
        model.safetensors.index.json or a model folder holding either, read one tensor at a
        time).

        Every targeted Linear layer (nn.Linear or transformers' Conv1D; default: every one
        whose weight differs in some task) becomes a RoutedLinear with per-task truncated
        SVD factors of rank `rank` (default min(d_out, d_in) // T, clamped per layer with
        one warning). Every other parameter or buffer that differs (biases, norms,
        embeddings) is averaged over the tasks. Every task must change the router layer(s).
        first_pass: weights of the routing pass, "pretrained" (default: the base model,
        no extra compute or storage, and the features MASS routes on are the base
        model's), "tsvm" (the TSV-M merge: all tasks' blocks summed, with decorrelated
        factors recommended) or "per_layer" (every routed layer below the router routes
        each of its rows itself, as in per-layer mode: the router sees features already
        adapted towards each sample's tasks; pass 1 costs routed layers, not base ones).
        first_pass_scale: the weight of every task's block in the "tsvm" first pass.
        """
        from tqdm.auto import tqdm

        if not isinstance(finetuned, Mapping):
            raise TypeError(f"finetuned must map task names to checkpoints (a dict), got "
                            f"{type(finetuned).__name__}")
        if not finetuned:
            raise ValueError("finetuned must hold at least one task, got none")
        check_rank(rank)
        if isinstance(target, str):
            raise TypeError(f"target must be a list of layer names, got the string {target!r}")
        names, T = list(finetuned), len(finetuned)
        base_state = {k: v.detach() for k, v in base.state_dict().items()}
        tied = _tied_keys(base_state)
        states = [_fill_tied_keys(_state_dict(finetuned[n], n), tied) for n in names]
        for name, state in zip(names, states):
            _check_keys(name, state, base_state)
        linears = _linear_names(base)
        readers = _weight_readers(base)
        if target is not None:
            target = [_canonical_name(base, n) for n in target]
            unknown = [n for n in target if n not in linears]
            if unknown:
                raise ValueError(f"target names layers that are not {_LINEAR_LAYERS}: "
                                 f"{unknown}; Linear layers: {linears}")
            unroutable = [n for n in target if n in readers]
            if unroutable:
                raise ValueError(f"target names layers that cannot be routed: {unroutable} "
                                 "(their parent reads the weight without calling the layer: "
                                 f"{sorted(set(readers[n] for n in unroutable))})")
        # Layers routed if a task changes them (all of target, when given).
        candidates = [n for n in linears if n not in readers] if target is None else target
        router_layers = _router_layer_list(router_layer, base)
        for name in router_layers:
            if name not in linears:
                prefix, found = key_prefix([name], linears)
                hint = (f" (the base model's layer names carry no {prefix!r}: name it "
                        f"{next(iter(found))!r}, or, if the base is the inner model of a "
                        "task model (e.g. AutoModel of a causal LM), build on the whole "
                        "model: the CLI's --base-class AutoModelForCausalLM loads it)"
                        if prefix else "")
                raise ValueError(f"router_layer {name!r} is not a {_LINEAR_LAYERS} of the "
                                 f"base model{hint}; Linear layers: {linears}")
            if name not in candidates:
                raise ValueError(f"router_layer {name!r} cannot be routed (not in target, or "
                                 f"its parent reads the weight directly)")
        check_routing_options(top_k, T, temperature, threshold, weighting)
        _check_mode(mode)
        _check_pooling(pooling)
        _check_first_pass(first_pass, first_pass_scale)
        if first_pass_scale != 1.0 and first_pass != "tsvm":
            warnings.warn(f"first_pass_scale={first_pass_scale} is used only with "
                          f"first_pass='tsvm', not {first_pass!r}", stacklevel=2)

        # One read of every tensor of every checkpoint: checked, then factorised (routed
        # weights) or averaged where tasks differ (everything else, biases and norms of
        # routed layers too). The router layers' weights come first, so that a router
        # layer no task changes fails before the slow part.
        layer_of = {id(base.get_submodule(n)): n for n in candidates}
        router_keys = [f"{n}.weight" for n in router_layers]
        factors, merged, clamped = {}, {}, []
        keys = router_keys + [k for k in base_state if k not in router_keys]
        for key in tqdm(keys, desc="MASS: reading, SVD per routed layer", disable=not progress):
            value = base_state[key]
            tensors = [state[key] for state in states]
            for name, state, tensor in zip(names, states, tensors):
                _check_tensor(name, state, key, tensor, value)
            owner, _, leaf = key.rpartition(".")
            layer = layer_of.get(id(base.get_submodule(owner))) if leaf == "weight" else None
            changed = value.is_floating_point() and any(not torch.equal(t, value) for t in tensors)
            if layer is not None and layer not in factors and (changed or target is not None):
                linear = base.get_submodule(layer)
                d_out, d_in = linear_weight(linear).shape
                r = default_rank(d_out, d_in, T) if rank is None else rank
                if r > min(d_out, d_in):
                    clamped.append(f"{layer} ({r} -> {min(d_out, d_in)})")
                    r = min(d_out, d_in)
                if decorrelate and T * r > min(d_out, d_in):
                    raise ValueError(f"decorrelate=True needs T * rank <= min(d_out, d_in); "
                                     f"layer {layer!r} has {T} * {r} > {min(d_out, d_in)}: "
                                     "pass a smaller rank= or target= without it")
                factors[layer] = task_factors(linear, tensors, rank=r, decorrelate=decorrelate)
            elif layer is None and changed:
                merged[key] = torch.stack(tensors).to(torch.float64).mean(0).to(value.dtype)
            if key in router_keys:
                unchanged = [n for n, t in zip(names, tensors) if torch.equal(t, value)]
                if unchanged:
                    raise ValueError(
                        f"router_layer {owner!r} is not changed by task(s) {unchanged}: their "
                        "subspaces there are arbitrary, so routing could not tell them apart; "
                        "choose a router layer every task changes")
                same = [(names[i], names[j]) for i in range(T) for j in range(i + 1, T)
                        if torch.equal(tensors[i], tensors[j])]
                if same:
                    warnings.warn(
                        f"router_layer {owner!r} has the same weight in tasks {same} (the same "
                        "checkpoint twice?): their subspaces are the same, so routing always "
                        "picks the first of each pair", stacklevel=2)
        _warn_averaged_matrices(base, merged, readers)
        if clamped:
            warnings.warn(f"rank clamped to min(d_out, d_in) for: {', '.join(clamped)}",
                          stacklevel=2)

        # Only what differs is loaded: a weight tied to a routed one (e.g. an embedding tied
        # to an output Linear) keeps its mean, and the routed layer gets its own base copy.
        model = copy.deepcopy(base)
        model.load_state_dict(merged, strict=False)
        for name in (n for n in linears if n in factors):
            linear = model.get_submodule(name)
            _set_submodule(model, name, RoutedLinear(
                linear_weight(base.get_submodule(name)).detach(), linear.bias, *factors[name],
                top_k=top_k, temperature=temperature, threshold=threshold, weighting=weighting))
        _keep_output_layer_untied(model)
        return cls(model, names, router_layer=router_layer, pooling=pooling, top_k=top_k,
                   temperature=temperature, threshold=threshold, weighting=weighting, mode=mode,
                   first_pass=first_pass, first_pass_scale=first_pass_scale)

    # ------------------------------------------------------------------ inference
    def forward(self, *args, **kwargs):
        if self.mode == "per_layer":
            with self._pass("self"), self._capture_router_inputs(early_exit=False) as captured:
                out = self.model(*args, **kwargs)
            named = self._call_arguments(args, kwargs)
            self.routing = self.decide(self._pooled(captured, named), named)
            return out
        return self._run(self.route(*args, **kwargs), args, kwargs)

    def run(self, routing: Routing, *args, **kwargs):
        """Pass 2 only: every routed layer applies `routing` (indices/weights (B, k), one
        row per sample, e.g. from `route`, or known task ids with weight 1) to all rows of
        its sample, in one batched pass whatever mix of tasks the batch holds."""
        _check_per_sample_routing(routing, len(self.task_names))
        return self._run(routing, args, kwargs)

    def _run(self, routing: Routing, args, kwargs):
        """run() of a checked routing (forward's own, from route: no second look at its
        values, which would wait for a GPU)."""
        with self._pass("prerouted", routing):
            self._state.tokens = _token_shape(self._call_arguments(args, kwargs))
            return self.model(*args, **kwargs)

    def applying(self, routing: Routing, repeat_samples: bool = False):
        """Context manager: within it, in this thread, every routed layer applies `routing`
        (B, k) to the rows of each sample, however the model is called (its forward, a
        method of it such as `generate`, a pipeline). Each layer must see the batch first;
        with repeat_samples, a batch of m * B rows holds each sample m times in a row (as
        `generate` expands prompts for beams or several sequences)."""
        _check_per_sample_routing(routing, len(self.task_names))
        return self._pass("prerouted", routing, repeat_samples)

    def cache_merged_weights(self, max_sets: int) -> None:
        """Keep, in every routed layer, the merged weights W + sum_j w_j U_tj diag(S_tj)
        V_tj of up to `max_sets` task sets between calls (least recently used dropped), so
        pass 2 runs one grouped GEMM over them instead of merging again. Speed for memory:
        each cached set costs one copy of the routed layers' weights (merged_cache_bytes;
        float32 for a half-precision model, as the op merges); 0 (the default) turns it
        off. A routing with more distinct task sets (and weights) than max_sets, such as
        softmax weights that differ per sample, runs the op as without the cache. Applies
        on the CPU (the C++ kernel), without autograd (under torch.no_grad() or
        torch.inference_mode(), or with no tensor requiring grad) and outside
        torch.compile (a compiled call keeps the op); the results agree with the op's to
        float rounding. A layer's tensors changed in place start its cache afresh (after
        changes through .data, call it again)."""
        if isinstance(max_sets, bool) or not isinstance(max_sets, int) or max_sets < 0:
            raise ValueError(f"max_sets must be an int >= 0, got {max_sets!r}")
        for layer in self.routed.values():
            layer.merged_cache_size = max_sets
            layer.clear_merged_cache()

    @property
    def merged_cache_bytes(self) -> int:
        """Bytes held by the routed layers' cached merged weights."""
        return sum(layer.merged_cache_bytes() for layer in self.routed.values())

    def _takes_argument(self, name: str) -> bool:
        try:
            return name in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):  # no inspectable signature
            return False

    def _call_arguments(self, args, kwargs) -> dict:
        """The model's forward arguments by name, positional ones included."""
        try:
            signature = inspect.signature(self.model.forward)
            bound = signature.bind_partial(*args, **kwargs).arguments
        except (TypeError, ValueError):  # no signature, or one that does not bind: as given
            return dict(kwargs)
        named = {}
        for name, value in bound.items():  # **kwargs of the forward: by their own names
            kind = signature.parameters[name].kind
            named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        return named

    def generate(self, inputs: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, **kwargs):
        """The model's own `generate` (a transformers generative model) with MASS: in
        two-pass mode, pass 1 routes each prompt once and every token generated for it,
        with the KV cache, beams or several sequences per prompt, uses that decision
        (`self.routing`); per-layer, every token routes itself (`self.routing` is then
        None). inputs: the prompts, as the model's main input (input_ids, or e.g. Whisper's
        input_features; also accepted by that name).

        Pass 1 sees the prompts as generate does: without attention_mask, padding in
        input_ids is inferred from the pad token; with a mask, position ids count valid
        tokens only (where the model takes position_ids), so a left-padded prompt routes
        like the same prompt alone (pooling "mean" or "tokens": "cls" would pool a pad).
        In an encoder-decoder model, the router layers must be in the encoder: the
        decoder has seen no prompt token when the prompt is routed."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if inputs is None:
            inputs = kwargs.pop(main, None)
        elif main in kwargs:
            raise ValueError(f"generate takes the prompts once: as inputs or as {main}=..., "
                             "got both")
        if not isinstance(inputs, torch.Tensor):
            raise ValueError(f"generate needs the prompts as a tensor: inputs or {main}=..., "
                             f"got {type(inputs).__name__}")
        if attention_mask is None and main == "input_ids":
            attention_mask = self._inferred_attention_mask(inputs, kwargs)
        prompts = {main: inputs}
        if attention_mask is not None:
            prompts["attention_mask"] = attention_mask
        if self.mode == "per_layer":
            self.routing = None
            with self._pass("self"):
                return self.model.generate(**prompts, **kwargs)
        outside = self._router_layers_outside_encoder()
        if outside:
            raise ValueError(
                f"generate routes each prompt before decoding, but the router layer(s) "
                f"{outside} are outside the encoder, on the decoder's side, which has seen "
                "no prompt token then: choose router layers in the encoder, or route "
                "yourself (mm.route(..., decoder_input_ids=...)) and generate under `with "
                "mm.applying(routing, repeat_samples=True)`")
        first = dict(prompts)
        if attention_mask is not None and not bool(attention_mask.all()):
            if self.pooling == "cls" and not bool(attention_mask[:, 0].all()):
                raise ValueError("pooling='cls' pools the first token, which is padding in "
                                 "a left-padded prompt: use pooling='mean' or 'tokens' to "
                                 "generate from left-padded prompts")
            if self._takes_argument("position_ids"):
                first["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():  # as generate itself
            routing = self.route(**first)
        with self._pass("prerouted", routing, repeat_samples=True):  # route's own routing
            return self.model.generate(**prompts, **kwargs)

    def _inferred_attention_mask(self, input_ids: torch.Tensor, kwargs) -> Optional[torch.Tensor]:
        """The mask transformers' generate infers: tokens other than the pad token, when the
        prompts hold it and it is not also an end-of-sequence token (then it is text)."""
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
        eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if isinstance(pad, int) and pad not in eos and bool((input_ids == pad).any()):
            return (input_ids != pad).long()
        return None

    def route(self, *args, **kwargs) -> Routing:
        """Pass 1 only: runs the model up to the router layer, pools its input per sample
        and routes it. Sets and returns `self.routing`."""
        # Returned from a local: self.routing is shared, another thread may replace it.
        routing = self.decide(*self._first_pass_inputs(args, kwargs))
        self.routing = routing
        return routing

    def decide(self, router_inputs: Sequence[torch.Tensor], kwargs=None, *,
               top_k: Optional[int] = None, threshold: Optional[float] = None,
               weighting: Optional[str] = None) -> Routing:
        """The routing of `router_inputs` (from `router_inputs`) with this model's options,
        or the top_k / threshold / weighting given; kwargs: the forward call's arguments
        by name (its attention_mask matters for pooling="tokens")."""
        mask = None
        if self.pooling == "tokens" and router_inputs and router_inputs[0].dim() == 3:
            mask = self._padding_mask(self.router_layers[0], router_inputs[0], kwargs)
        return route_features(
            router_inputs, [self.routed[name].V for name in self.router_layers],
            self.top_k if top_k is None else top_k,
            attention_mask=mask, temperature=self.temperature,
            threshold=self.threshold if threshold is None else threshold,
            weighting=self.weighting if weighting is None else weighting)

    def router_inputs(self, *args, **kwargs) -> list:
        """Pass 1 up to the (last) router layer: the pooled input of each router layer,
        (B, d_in) per layer ((B, L, d_in) for pooling="tokens"), in `router_layers` order.
        `decide` turns them into `route`'s decision, for any top_k or threshold."""
        return self._first_pass_inputs(args, kwargs)[0]

    def _first_pass_inputs(self, args, kwargs) -> tuple:
        """(router_inputs, the forward call's arguments by name)."""
        # Pass 1 stops inside the model: a KV cache passed in would keep its entries, and
        # pass 2 would add its own after them.
        named = self._call_arguments(args, kwargs)
        cached = [name for name, value in named.items()
                  if name in _CACHE_ARGUMENTS and value is not None]
        if cached:
            raise ValueError(
                f"two-pass MASS cannot take a KV cache ({cached[0]}=...): pass 1 would add to "
                "it. Route each prompt once and keep the decision for its tokens: "
                f"mm.generate(...), or mm.run(mm.route(...), ..., {cached[0]}=...) for your "
                "own decoding loop")
        with self._pass(*self._first_pass(args, kwargs)), \
                self._capture_router_inputs(early_exit=True) as captured:
            self._state.tokens = _token_shape(named)
            try:
                self.model(*args, **kwargs)
            except _EarlyExit:
                pass
        return self._pooled(captured, named), named

    @contextlib.contextmanager
    def _capture_router_inputs(self, early_exit: bool):
        """Records the input of every router layer's first call; with early_exit, stops the
        forward pass (raises _EarlyExit) once all of them are known."""
        captured = {}
        # Hooks are shared by every thread calling the model: only this thread's calls count.
        owner = _thread_id()

        def hook_for(name):
            def capture(module, inputs):
                # A layer called again in the same pass (a shared ALBERT layer, DeBERTa's
                # projections of its position embeddings) keeps its first input.
                if _thread_id() != owner or name in captured:
                    return
                module.check_input_dtype(inputs[0])
                captured[name] = self._unflattened(inputs[0])
                if early_exit and len(captured) == len(self.router_layers):
                    raise _EarlyExit
            return capture

        layers = [self.routed[name] for name in self.router_layers]
        hooks = [layer.register_forward_pre_hook(hook_for(name))
                 for name, layer in zip(self.router_layers, layers)]
        with _ROUTER_HOOKS_LOCK:
            for layer in layers:
                layer.router_input_hooks += 1
        try:
            yield captured
        finally:
            for hook in hooks:
                hook.remove()
            with _ROUTER_HOOKS_LOCK:
                for layer in layers:
                    layer.router_input_hooks -= 1

    def _unflattened(self, x: torch.Tensor) -> torch.Tensor:
        """x, or as (B, L, d) when it is a (B, L) batch's tokens flattened
        (`_RouteState.flattened_tokens`)."""
        tokens = self._state.flattened_tokens(x)
        return x if tokens is None else x.reshape(*tokens, x.shape[-1])

    def _pooled(self, captured: dict, kwargs) -> list:
        missing = [name for name in self.router_layers if name not in captured]
        if missing:
            raise RuntimeError(f"the router layer(s) {missing} were not reached by the "
                               "forward pass")
        return [self._pool(name, captured[name], kwargs) for name in self.router_layers]

    def router_bases(self) -> torch.Tensor:
        """The router layer's V, or for several layers their block-diagonal stack (cached,
        rebuilt when a layer's V changes): what the router inputs are routed against as one
        tensor (`route_features`; `decide` passes the layers' V one by one instead)."""
        Vs = [self.routed[name].V for name in self.router_layers]
        key = tuple((id(V), V._version) for V in Vs)
        if getattr(self, "_router_bases_key", None) != key:
            self._router_bases, self._router_bases_key = stack_router_bases(Vs), key
        return self._router_bases

    def _first_pass(self, args, kwargs) -> tuple:
        """(mode, routing) of the routed layers in pass 1."""
        if self.first_pass == "pretrained":
            return "base", None
        if self.first_pass == "per_layer":
            return "self", None  # every routed layer routes its own rows
        # TSV-M: every task's block, scaled, for every sample (batch size from the input:
        # the tokens where named, as _token_shape reads them, else the first tensor).
        first = next((kwargs[k] for k in ("input_ids", "inputs_embeds", "attention_mask")
                      if isinstance(kwargs.get(k), torch.Tensor)), None)
        if first is None:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None:
            first = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        T, B = len(self.task_names), first.shape[0]
        indices = torch.arange(T, device=first.device).expand(B, T)
        return "prerouted", Routing(indices, torch.full((B, T), self.first_pass_scale,
                                                        device=first.device), None)

    def _pool(self, name: str, x: torch.Tensor, kwargs) -> torch.Tensor:
        if callable(self.pooling):
            return self.pooling(x, kwargs)
        if x.dim() < 2:
            raise ValueError(f"the router layer {name!r}'s input must have the batch first "
                             f"(B, ..., d), got shape {tuple(x.shape)}")
        if x.dim() == 2:  # one row per sample already
            return x
        if self.pooling == "tokens":
            if x.dim() != 3:
                raise ValueError(f"pooling='tokens' needs router-layer inputs (B, L, d) or "
                                 f"(B, d), got shape {tuple(x.shape)} at {name!r}")
            return x
        if self.pooling == "cls":
            return x[:, 0]
        return _mean_over_tokens(x, self._padding_mask(name, x, kwargs))

    def _router_layers_outside_encoder(self) -> list:
        """The router layers of an encoder-decoder transformers model
        (config.is_encoder_decoder: T5, BART, Whisper...) that lie outside its encoder
        (get_encoder(), else a module path through "encoder"); [] for other models."""
        config = getattr(self.model, "config", None)
        if not getattr(config, "is_encoder_decoder", False):
            return []
        get_encoder = getattr(self.model, "get_encoder", None)
        encoder = get_encoder() if callable(get_encoder) else None
        if isinstance(encoder, nn.Module):
            inside = {id(m) for m in encoder.modules()}
            return [n for n in self.router_layers if id(self.routed[n]) not in inside]
        return [n for n in self.router_layers if "encoder" not in n.split(".")]

    def _padding_mask(self, name: str, x: torch.Tensor, kwargs) -> Optional[torch.Tensor]:
        """The padding mask (B, L) of router layer `name`'s tokens x (B, L, ...): the
        forward's attention_mask (None: every token valid), or its last L columns when it
        is longer (it also covers a KV cache's past tokens)."""
        mask = (kwargs or {}).get("attention_mask")
        if mask is None:
            return None
        B, L = x.shape[:2]
        if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] < L:
            raise ValueError(
                f"attention_mask must be (B, >= L) = ({B}, >= {L}) to pool the tokens the "
                f"router layer {name!r} sees, got shape {tuple(mask.shape)}")
        return mask[:, mask.shape[1] - L:]

    # ------------------------------------------------------------------ storage
    def metadata(self) -> dict:
        self._check_settings()
        return {
            "format": "mass_ext", "format_version": FORMAT_VERSION,
            "task_names": self.task_names,
            "architecture": _architecture(self.model),
            "routed_layers": {n: {"rank": m.rank, "in_features": m.in_features,
                                  "out_features": m.out_features}
                              for n, m in self.routed.items()},
            "router": {"router_layer": self.router_layer,
                       "pooling": self.pooling if isinstance(self.pooling, str) else "callable",
                       "top_k": self.top_k, "temperature": self.temperature,
                       "threshold": self.threshold, "weighting": self.weighting,
                       "mode": self.mode, "first_pass": self.first_pass,
                       "first_pass_scale": self.first_pass_scale},
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """One safetensors file: every tensor of the model (base weights, routed factors,
        averaged parameters) plus the metadata; tensors shared under several names (tied
        weights) are stored once. Written to a temporary file in the same folder and
        renamed, so an existing bundle is never left half-written; it keeps its
        permissions, and a symbolic link is followed, not replaced."""
        from safetensors.torch import save_file

        path = os.path.realpath(os.fspath(path))
        if os.path.isdir(path):
            raise IsADirectoryError(f"path must name a file, got the folder {path}")
        tensors, aliases = _unshared(self.model.state_dict())
        metadata = {**self.metadata(), "aliases": aliases}
        folder, name = os.path.split(path)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"path's folder {folder} does not exist")
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        # Created like any new file, 0o666 less the umask (safetensors writes 0o600).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            mode = stat.S_IMODE(os.stat(path if os.path.exists(path) else tmp).st_mode)
            save_file(tensors, tmp, metadata={"mass_ext": json.dumps(metadata)})
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: Union[str, os.PathLike], base_skeleton: nn.Module,
             pooling: Optional[Callable] = None) -> "MASS":
        """Restores a bundle onto a copy of `base_skeleton` (a model of the base
        architecture; its weights are not used and it is left untouched), in eval mode (a
        skeleton made from a config, e.g. AutoModel.from_config, is in training mode). A
        bundle that is unreadable, incomplete or made for another architecture raises
        ValueError. `pooling`, when given, replaces the bundle's ("cls", "mean", "tokens"
        or a callable); a bundle saved with a callable pooling needs it."""
        from safetensors import safe_open

        if pooling is not None:
            _check_pooling(pooling)
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get("mass_ext")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as error:  # safetensors raises several types for a bad file
            raise ValueError(f"{path} is not a readable safetensors bundle: {error}") from error
        if raw is None:
            raise ValueError(f"{path} is a safetensors file but not a mass_ext bundle "
                             "(no 'mass_ext' metadata)")
        meta = _bundle_metadata(path, raw)
        for alias, key in meta.get("aliases", {}).items():
            if key not in tensors:
                raise ValueError(f"{path} is incomplete: tensor {key!r} (also {alias!r}) is "
                                 "missing")
            tensors[alias] = tensors[key]
        model = copy.deepcopy(base_skeleton)
        linears = set(_linear_names(model))
        for name in meta["routed_layers"]:
            if name not in linears:
                prefix, found = key_prefix(linears, meta["routed_layers"])
                hint = (f" (the skeleton holds the bundle's layers under {prefix!r}: load "
                        f"onto its {prefix[:-1]!r} part, e.g. skeleton.{prefix[:-1]})"
                        if prefix and 2 * len(found) >= len(meta["routed_layers"]) else "")
                raise ValueError(f"{path} routes layer {name!r}, which the base skeleton has "
                                 f"not as a {_LINEAR_LAYERS}{hint}")
            linear = model.get_submodule(name)
            needed = ["weight", "U_t", "S", "V"] + (["bias"] if linear.bias is not None else [])
            missing = [f"{name}.{k}" for k in needed if f"{name}.{k}" not in tensors]
            if missing:
                raise ValueError(f"{path} is incomplete: missing {missing}")
            if linear.bias is None and f"{name}.bias" in tensors:
                raise ValueError(f"{path} has a bias for layer {name!r}, which the base "
                                 "skeleton's layer has not")
            t = {k: tensors.get(f"{name}.{k}") for k in ("weight", "bias", "U_t", "S", "V")}
            _check_factor_ranks(path, name, meta["routed_layers"][name], t)
            try:
                layer = RoutedLinear(t["weight"], t["bias"], t["U_t"].transpose(1, 2), t["S"],
                                     t["V"])
            except (ValueError, TypeError, IndexError, RuntimeError) as error:
                raise ValueError(f"{path}: routed layer {name!r} is invalid: {error}") from error
            if tuple(layer.weight.shape) != tuple(linear_weight(linear).shape):
                raise ValueError(f"{path}: layer {name!r} has weight shape "
                                 f"{tuple(layer.weight.shape)}, the base skeleton "
                                 f"{tuple(linear_weight(linear).shape)}")
            _set_submodule(model, name, layer)
        _check_architecture(path, meta.get("architecture"), base_skeleton)
        _take_bundle_dtypes(path, model, tensors)
        try:
            result = model.load_state_dict(tensors, strict=False)
        except RuntimeError as error:  # shape mismatches
            raise ValueError(f"{path} does not match the base skeleton: {error}") from error
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{path} does not match the base skeleton: "
                             f"{_some_keys('missing', result.missing_keys)}, "
                             f"{_some_keys('unexpected', result.unexpected_keys)}")
        on_meta = [n for n, t in _named_tensors(model) if t.is_meta]
        if on_meta:
            raise ValueError(
                f"{_some_keys('the base skeleton has', on_meta)} on the meta device that "
                f"{path} does not hold (buffers a model computes, not saves): build the "
                "skeleton on the CPU, e.g. AutoModel.from_config(config)")
        _keep_output_layer_untied(model)
        router = dict(meta["router"])
        if pooling is not None:
            router["pooling"] = pooling
        elif router.get("pooling") == "callable":
            raise ValueError(f"{path} was saved with a callable pooling: pass pooling=")
        try:
            return cls(model, meta["task_names"], **router).eval()
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path} holds invalid settings: {error}") from error


# Config fields (transformers' names) that change what a model computes whatever the
# input, without changing a tensor's shape; a bundle records those its model's config has,
# and load compares them. Not limits that change nothing below them
# (max_position_embeddings of a RoPE model, sliding_window).
_ARCHITECTURE_FIELDS = (
    "model_type", "hidden_act", "hidden_activation", "activation_function",
    "num_attention_heads", "num_key_value_heads", "head_dim", "n_head", "hidden_size",
    "n_embd", "intermediate_size", "n_inner", "num_hidden_layers", "n_layer",
    "layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "position_embedding_type",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "attention_bias", "mlp_bias", "scale_attn_weights", "is_decoder", "is_encoder_decoder")


def _architecture(model: nn.Module) -> dict:
    """What `load` checks a skeleton against: the model's class name and the
    _ARCHITECTURE_FIELDS of its config (transformers models), as JSON values."""
    config = getattr(model, "config", None)
    values = config.to_dict() if callable(getattr(config, "to_dict", None)) else {}
    fields = {}
    for key in _ARCHITECTURE_FIELDS:
        if key in values:
            try:
                fields[key] = json.loads(json.dumps(values[key]))
            except (TypeError, ValueError):  # not JSON: not compared
                pass
    return {"class": type(model).__name__, "config": fields}


def _check_architecture(path: str, stored, skeleton: nn.Module) -> None:
    """The skeleton is of the class and config the bundle was saved from (bundles before
    the record have none): same key names and shapes do not make the same model (a
    RoBERTa skeleton takes a BERT bundle's tensors, another activation or head count
    computes something else)."""
    if not isinstance(stored, dict):
        return
    actual = _architecture(skeleton)
    differences = []
    if stored.get("class") != actual["class"]:
        differences.append(f"class {stored.get('class')} / {actual['class']}")
    for key, value in (stored.get("config") or {}).items():
        if key in actual["config"] and actual["config"][key] != value:
            differences.append(f"config.{key} {value!r} / {actual['config'][key]!r}")
    if differences:
        raise ValueError(f"{path} was saved from another architecture than the base "
                         f"skeleton's (bundle / skeleton): {'; '.join(differences)}")


def _named_tensors(model: nn.Module):
    """(name, tensor) of every parameter and buffer, shared ones under each name."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _take_bundle_dtypes(path: str, model: nn.Module, tensors: dict) -> None:
    """Every parameter or buffer of `model` that the bundle holds in another floating
    dtype, or that is on the meta device, is swapped (once for a tensor shared under
    several names, so ties stay ties) for an empty one of the bundle's dtype on the CPU,
    which load_state_dict then fills: the tensors the bundle holds load as saved, not cast
    to the skeleton's dtype around routed layers that keep the bundle's. (Buffers it does
    not hold, computed ones such as RoPE's inv_freq, keep the skeleton's dtype.)"""
    replaced = {}
    for name, old in list(_named_tensors(model)):
        saved = tensors.get(name)
        if saved is None or (old.dtype == saved.dtype and not old.is_meta):
            continue
        if old.dtype != saved.dtype and not (old.is_floating_point() and saved.is_floating_point()):
            raise ValueError(f"{path} holds {name!r} as {saved.dtype}, the base skeleton as "
                             f"{old.dtype}: only floating dtypes may differ")
        new = replaced.get(id(old))
        if new is None:
            data = torch.empty(old.shape, dtype=saved.dtype,
                               device="cpu" if old.is_meta else old.device)
            new = (nn.Parameter(data, requires_grad=old.requires_grad)
                   if isinstance(old, nn.Parameter) else data)
            replaced[id(old)] = new
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if isinstance(new, nn.Parameter):
            module._parameters[leaf] = new
        else:
            module._buffers[leaf] = new


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_first_pass(first_pass, scale) -> None:
    if first_pass not in FIRST_PASSES:
        raise ValueError(f"first_pass must be one of {FIRST_PASSES}, got {first_pass!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) \
            or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"first_pass_scale must be a finite number > 0, got {scale!r}")


def _check_pooling(pooling) -> None:
    if not callable(pooling) and pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS} or a callable, got {pooling!r}")


def _generates_left_to_right(model: nn.Module) -> bool:
    """A decoder-only generative model (transformers' causal LMs)."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    try:
        return (callable(can_generate) and bool(can_generate())
                and not getattr(config, "is_encoder_decoder", False))
    except Exception:  # noqa: BLE001 - a model's own can_generate may fail; then say nothing
        return False


def _some_keys(what: str, keys: Sequence[str], shown: int = 5) -> str:
    """'missing 2 keys [...]' with at most `shown` of them named."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{what} {len(keys)} key{'s' * (len(keys) != 1)} {list(keys[:shown])}{more}"


def _tied_keys(state: Mapping[str, torch.Tensor]) -> dict:
    """{key: first key} for every key whose tensor another key already holds (the same
    view: tied weights, a module registered twice)."""
    first, aliases = {}, {}
    for key, value in state.items():
        if value.numel() == 0:
            continue
        view = (value.untyped_storage().data_ptr(), value.storage_offset(),
                tuple(value.shape), tuple(value.stride()), value.dtype)
        if view in first:
            aliases[key] = first[view]
        else:
            first[view] = key
    return aliases


def _unshared(state: Mapping[str, torch.Tensor]):
    """(tensors, aliases): the state without its tied keys (`_tied_keys`), and any other
    memory overlap copied (safetensors refuses shared memory)."""
    aliases = _tied_keys(state)
    tensors, storages = {}, set()
    for key, value in state.items():
        if key in aliases:
            continue
        value = value.detach()
        storage = value.untyped_storage().data_ptr() if value.numel() else None
        tensors[key] = value.clone() if storage in storages else value.contiguous()
        if storage is not None:
            storages.add(storage)
    return tensors, aliases


class _TiedKeysFilled(Mapping):
    """A checkpoint whose tied keys that were left out (transformers' save_pretrained
    stores a tied tensor once) read as their partner."""

    def __init__(self, state: Mapping, fill: dict):
        self.state, self.fill = state, fill
        if hasattr(state, "argument"):
            self.argument = state.argument

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.state[self.fill.get(key, key)]

    def __contains__(self, key) -> bool:
        return key in self.fill or key in self.state

    def __iter__(self):
        return iter([*self.state, *self.fill])

    def __len__(self) -> int:
        return len(self.state) + len(self.fill)


def _fill_tied_keys(state: Mapping, tied: dict) -> Mapping:
    """`state`, with each key tied in the base (tied: {key: first key}) that it lacks read
    from the key it is tied to."""
    fill = {}
    for key, first in tied.items():
        if key not in state and first in state:
            fill[key] = first
        elif first not in state and key in state:
            fill[first] = key
    return _TiedKeysFilled(state, fill) if fill else state


_ROUTER_SETTINGS = ("router_layer", "pooling", "top_k", "temperature", "threshold",
                    "weighting", "mode", "first_pass", "first_pass_scale")


def _bundle_metadata(path: str, raw: str) -> dict:
    """The bundle's metadata, checked for what `load` reads."""
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} has corrupt mass_ext metadata (not JSON: {error})") from error
    if not isinstance(meta, dict):
        raise ValueError(f"{path} has corrupt mass_ext metadata (not a JSON object)")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path} has bundle format version {meta.get('format_version')}; "
                         f"this mass_ext reads versions {list(READABLE_VERSIONS)}")
    expected = {"task_names": list, "routed_layers": dict, "router": dict}
    if meta.get("format_version", 0) >= 2:
        expected["aliases"] = dict
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path} has corrupt mass_ext metadata: {key!r} must be a JSON "
                             f"{'array' if kind is list else 'object'}, got "
                             f"{type(meta.get(key)).__name__}")
    unknown = sorted(set(meta["router"]) - set(_ROUTER_SETTINGS))
    if unknown:
        raise ValueError(f"{path} has unknown router settings {unknown}")
    return meta


def _check_factor_ranks(path: str, name: str, layer_meta, factors: dict) -> None:
    """Each factor's rank (dim 1 of U_t (T, r, d_out), S (T, r), V (T, r, d_in)) is the
    rank the metadata records for the layer: the factor cut or swapped is named (the
    layer's own check would take V's rank as r and blame U)."""
    rank = layer_meta.get("rank") if isinstance(layer_meta, dict) else None
    if isinstance(rank, bool) or not isinstance(rank, int):
        return
    wrong = [f"{name}.{k} has shape {tuple(factors[k].shape)}" for k in ("U_t", "S", "V")
             if factors[k].dim() < 2 or factors[k].shape[1] != rank]
    if wrong:
        raise ValueError(f"{path}: routed layer {name!r} is invalid: the bundle records rank "
                         f"{rank} (dim 1 of U_t (T, r, d_out), S (T, r) and V (T, r, d_in)), "
                         f"but {' and '.join(wrong)}")


def stack_router_bases(bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Block-diagonal (T, sum r, sum d_in) stack of per-layer bases V (T, r_l, d_l); one
    layer's V is returned as is."""
    if len(bases) == 0:
        raise ValueError("bases must hold at least one layer's V, got none")
    if len(bases) == 1:
        return bases[0]
    T = bases[0].shape[0]
    stacked = bases[0].new_zeros(T, sum(V.shape[1] for V in bases), sum(V.shape[2] for V in bases))
    row = col = 0
    for V in bases:
        stacked[:, row:row + V.shape[1], col:col + V.shape[2]] = V
        row, col = row + V.shape[1], col + V.shape[2]
    return stacked


def _token_shape(named: dict) -> Optional[tuple]:
    """(B, L) of a call's tokens, from its input_ids, inputs_embeds or attention_mask: how
    a routed layer that sees (B * L, d) rows before any (B, L, d) one reads them."""
    for key, dims in (("input_ids", 2), ("inputs_embeds", 3), ("attention_mask", 2)):
        value = named.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == dims:
            return value.shape[0], value.shape[1]
    return None


def _unit_rows(f: torch.Tensor) -> torch.Tensor:
    return f / f.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(f.dtype).tiny)


def _mean_over_tokens(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of x (B, L, ...) over dim 1, over the valid tokens (mask (B, L) nonzero) when a
    mask is given."""
    if mask is None:
        return x.mean(dim=1)
    valid = (mask != 0).to(x.dtype).reshape(*mask.shape[:2], *([1] * (x.dim() - 2)))
    return (x * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def route_features(features: Sequence[torch.Tensor],
                   bases: Union[torch.Tensor, Sequence[torch.Tensor]], top_k: int = 1, *,
                   temperature: float = 1.0, threshold: float = 0.0,
                   weighting: str = "uniform",
                   attention_mask: Optional[torch.Tensor] = None) -> Routing:
    """Routes router-layer inputs (one tensor per layer) against the layers' bases, with
    the options of `mass_ext.route`. bases: the layers' V (T, r_l, d_l), one per feature
    tensor, or one tensor: the single layer's V, or the layers' block-diagonal stack
    (`stack_router_bases`; the same routing, but its GEMM also multiplies the zero blocks:
    n layers cost n times the multiply-adds).

    Pooled inputs (B, d_l): with several layers each input is scaled to unit norm and they
    are routed side by side, so the residual is sqrt(sum over layers of the layer's
    residual fraction ||x - V^T V x||^2 / ||x||^2); one layer is routed as it is.

    Token inputs (B, L, d_l) (pooling="tokens"): every token is scaled to unit norm per
    layer and routed; a sample's residual is sqrt(mean over its valid tokens of the
    token's residual fraction summed over the layers), and the decision is taken on those
    residuals by the usual rule. attention_mask (B, L), nonzero = valid: padding never
    counts (all tokens count without it).
    """
    options = dict(temperature=temperature, threshold=threshold, weighting=weighting)
    dims = {f.dim() for f in features}
    if dims not in ({2}, {3}) or len({tuple(f.shape[:-1]) for f in features}) != 1:
        raise ValueError("features must all be pooled (B, d) or all token features (B, L, d) "
                         f"of one (B, L), got shapes {[tuple(f.shape) for f in features]}")
    per_layer = not isinstance(bases, torch.Tensor)
    if per_layer:
        _check_layer_bases(features, bases)
    if dims == {2} and len(features) == 1:
        return ops.route(features[0], bases[0] if per_layer else bases, top_k, **options)
    if dims == {2} and not per_layer:
        return ops.route(torch.cat([_unit_rows(f) for f in features], -1), bases, top_k,
                         **options)
    if (dims == {3} and attention_mask is not None
            and tuple(attention_mask.shape) != tuple(features[0].shape[:2])):
        raise ValueError(f"attention_mask must have shape (B, L) = "
                         f"{tuple(features[0].shape[:2])}, got {tuple(attention_mask.shape)}")
    # Each residual fraction, summed over the layers (the op validates bases and options;
    # its per-row decision is not needed).
    if per_layer:
        fractions = sum(ops.route(_unit_rows(f), V, top_k, **options).residuals.square()
                        for f, V in zip(features, bases))
    else:
        x = torch.cat([_unit_rows(f) for f in features], dim=-1)
        fractions = ops.route(x, bases, top_k, **options).residuals.square()
    if dims == {3}:
        fractions = _mean_over_tokens(fractions, attention_mask)   # (B, L, T) -> (B, T)
    residuals = fractions.sqrt()
    indices, weights = reference.select_tasks(residuals, top_k, temperature, threshold, weighting)
    return Routing(indices, weights, residuals)


def _check_layer_bases(features: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    """One V (T, r_l, d_l) per router input (..., d_l), all of one T: the per-layer
    residuals are summed per task, and would broadcast otherwise."""
    if len(bases) != len(features):
        raise ValueError(f"bases must hold one V per router input, {len(features)}, got "
                         f"{len(bases)}")
    for i, (f, V) in enumerate(zip(features, bases)):
        if not isinstance(V, torch.Tensor) or V.dim() != 3 or V.shape[2] != f.shape[-1]:
            got = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"bases[{i}] must be the V (T, r, d) of router input {i}, whose "
                             f"width is d = {f.shape[-1]}; got {got}")
    if len({V.shape[0] for V in bases}) != 1:
        raise ValueError(f"bases must all have the same number of tasks T, got shapes "
                         f"{[tuple(V.shape) for V in bases]}")


def _router_layer_list(router_layer: RouterLayers, model: nn.Module) -> list:
    """The router layers' names, each by its module's first name in `model`."""
    names = ([router_layer] if isinstance(router_layer, str)
             else list(router_layer) if isinstance(router_layer, (list, tuple)) else [])
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"router_layer must be a layer name or a non-empty list of names, "
                         f"got {router_layer!r}")
    canonical = [_canonical_name(model, n) for n in names]
    repeated = sorted({n for n in canonical if canonical.count(n) > 1})
    if repeated:
        raise ValueError(f"router_layer must name each layer once, got {names!r}, which "
                         f"names {repeated} more than once (a module registered under two "
                         "names is one layer)")
    return canonical


def _check_per_sample_routing(routing: Routing, T: Optional[int] = None) -> None:
    """A Routing of int64 indices (B, k), one row per sample, and weights of their shape;
    with T, task ids in [-1, T) (named by sample here: the op names a layer's row)."""
    indices, weights = getattr(routing, "indices", None), getattr(routing, "weights", None)
    if not (isinstance(indices, torch.Tensor) and isinstance(weights, torch.Tensor)):
        raise TypeError(f"routing must be a Routing (indices, weights, residuals), got "
                        f"{type(routing).__name__}")
    if indices.dim() != 2 or indices.dtype != torch.int64 or weights.shape != indices.shape:
        raise ValueError(f"routing must hold int64 indices (B, k), one row per sample, and "
                         f"weights of their shape; got indices {tuple(indices.shape)} "
                         f"{indices.dtype}, weights {tuple(weights.shape)}")
    # On the CPU and eager only: reading the values would wait for a GPU, and break a
    # compiled graph (the op checks them too, by row).
    if T is not None and indices.device.type == "cpu" and not torch.compiler.is_compiling():
        check_index_values(indices, T, "routing.indices", "sample")


def pick_head(head_logits: Sequence[torch.Tensor], routing: Routing):
    """Task-unknown classification with per-task heads (the paper's rule): among the tasks
    a sample selected, use the head whose max logit is largest.

    head_logits: T tensors (B, C_t) (each task's head on the routed features).
    Returns (task (B,) int64, prediction (B,) int64 class index within that task's head);
    both -1 for a sample that selected no task (every slot -1, e.g. a routing built by
    hand: `route` always keeps the first slot).
    """
    if isinstance(head_logits, Mapping):
        raise TypeError("head_logits must be one (B, C_t) tensor per task, in task order "
                        "(a list), got a mapping: for heads by task name, pass "
                        "[heads[name] for name in mm.task_names]")
    head_logits = list(head_logits)
    _check_per_sample_routing(routing)
    indices = routing.indices
    B = indices.shape[0]
    shapes = [tuple(logits.shape) for logits in head_logits]
    if not shapes or any(len(s) != 2 or s[0] != B or s[1] < 1 for s in shapes):
        raise ValueError(f"head_logits must be one (B, C_t) tensor per task with B = {B} "
                         f"(the routing's samples), got shapes {shapes}")
    if indices.numel() and int(indices.max()) >= len(shapes):
        raise ValueError(f"routing selects task {int(indices.max())}, but head_logits holds "
                         f"only {len(shapes)} heads")
    best = torch.stack([logits.max(dim=-1).values.float() for logits in head_logits], dim=-1)
    kept = indices >= 0
    candidate_scores = torch.where(kept, best.gather(-1, indices.clamp(min=0)), float("-inf"))
    choice = candidate_scores.argmax(dim=-1)
    task = torch.where(kept.any(-1), indices.gather(-1, choice.unsqueeze(-1)).squeeze(-1), -1)
    predictions = torch.stack([logits.argmax(dim=-1) for logits in head_logits], dim=-1)
    return task, torch.where(task >= 0, predictions[torch.arange(B), task.clamp(min=0)], -1)
