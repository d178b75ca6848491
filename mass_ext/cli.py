"""mass-ext: build a MASS bundle from fine-tuned checkpoints, or describe one.

    mass-ext build --base MODEL --task NAME=CHECKPOINT [--task ...] --router-layer LAYER \\
                   [--rank R] [--pooling cls|mean|tokens] [--top-k K] ... -o bundle.safetensors
    mass-ext info bundle.safetensors

MODEL is a Hugging Face model folder (config.json + weights, loaded offline with
transformers.AutoModel, or the class --base-class names, e.g. AutoModelForCausalLM to keep
a language model's head) or `package.module:function`, a factory returning the nn.Module.
CHECKPOINT is a .safetensors state dict of the same architecture, a sharded checkpoint's
model.safetensors.index.json, or a model folder holding either.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping

import torch

from .model import FIRST_PASSES, MODES, POOLINGS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _finite_float(text: str) -> float:
    value = _float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def load_base(spec: str, base_class: str | None = None) -> torch.nn.Module:
    if os.path.isdir(spec):
        try:
            import transformers
        except ImportError as error:
            raise ValueError(f"--base {spec} is a model folder, which needs transformers: "
                             f"{error}") from error
        loader = getattr(transformers, base_class or "AutoModel", None)
        if not callable(getattr(loader, "from_pretrained", None)):
            raise ValueError(f"--base-class must name a transformers model class with "
                             f"from_pretrained (AutoModel, AutoModelForCausalLM, ...), got "
                             f"{base_class!r}")
        return loader.from_pretrained(spec, local_files_only=True).eval()
    if base_class is not None:
        raise ValueError(f"--base-class applies to a model folder, not to the factory {spec!r}")
    module_name, sep, function = spec.partition(":")
    if not (sep and module_name and function):
        raise ValueError(f"--base must be a model folder or package.module:function, got {spec!r}")
    # The console script, unlike python -m, does not put the working folder on sys.path.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--base {spec}: cannot import module {module_name!r}: {error}") from error
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ValueError(f"--base {spec}: module {module_name!r} has no function {function!r}"
                         + ("" if factory is None else f" (it is a {type(factory).__name__})"))
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--base {spec} must return a torch.nn.Module, got "
                        f"{type(model).__name__}")
    return model


def load_checkpoint(spec: str, name: str) -> str:
    """The .safetensors file or shard index of --task NAME=SPEC (SPEC one of them, or a
    model folder holding one)."""
    from .model import checkpoint_path

    return checkpoint_path(spec, f"--task {name}")


def parse_tasks(items: list) -> dict:
    """--task NAME=CHECKPOINT items -> {name: .safetensors file or shard index}, in the
    order given."""
    tasks = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not (sep and name and spec):
            raise ValueError(f"--task must be NAME=CHECKPOINT, got {item!r}")
        if name in tasks:
            # A dict would silently keep the last one: the bundle would lack a task.
            raise ValueError(f"--task name {name!r} is given twice; task names must be unique")
        tasks[name] = load_checkpoint(spec, name)
    return tasks


def check_output(output: str, inputs: list) -> None:
    """Fails before the slow build on an output that cannot be written, and never lets the
    bundle replace an input (a checkpoint, a file of the base folder) or a file that is
    not a mass_ext bundle."""
    if os.path.isdir(output) or not os.path.basename(output):
        raise ValueError(f"-o must name a bundle file, got the folder {output!r}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ValueError(f"-o {output}: the folder {folder} does not exist")
    for path in inputs:
        if os.path.realpath(path) == os.path.realpath(output) or (
                os.path.exists(output) and os.path.samefile(path, output)):
            raise ValueError(f"-o {output} is an input of this build ({path}); "
                             "choose another output file")
    if os.path.isfile(output) and os.path.getsize(output) > 0 and not _is_bundle(output):
        raise ValueError(f"-o {output} exists and is not a mass_ext bundle; refusing to "
                         "overwrite it (remove it or choose another output file)")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"-o {output}: cannot write to the folder {folder}: {error}") from error


def _is_bundle(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return "mass_ext" in (f.metadata() or {})
    except Exception:  # safetensors raises several types for a bad file
        return False


class _BaseKeys(Mapping):
    """The base model's keys of a checkpoint, read lazily: key -> checkpoint[prefix + key]."""

    def __init__(self, checkpoint: Mapping, prefix: str, keys: set):
        self.checkpoint, self.prefix, self.base_keys = checkpoint, prefix, set(keys)
        self.argument = getattr(checkpoint, "argument", None)  # how errors name it

    def __getitem__(self, key: str):
        if key not in self.base_keys:
            raise KeyError(key)
        return self.checkpoint[self.prefix + key]

    def __contains__(self, key) -> bool:  # Mapping's would read the tensor
        return key in self.base_keys

    def __iter__(self):
        return iter(sorted(self.base_keys))

    def __len__(self) -> int:
        return len(self.base_keys)


def _strip_prefix(state: Mapping, keys: set) -> Mapping:
    """A task model's checkpoint adds heads and may prefix the base model's keys: keep
    the base model's keys, under the prefix that holds the most of them (key_prefix).
    Keys still missing are for the build to fill (tied ones) or to report (no tensor is
    read here)."""
    from .model import key_prefix

    prefix, found = key_prefix(state, keys)
    if prefix == "" and set(state) <= keys:
        return state
    return _BaseKeys(state, prefix, found)


def build(args) -> None:
    from .model import MASS, _SafetensorsCheckpoint, checkpoint_files

    # Every check that needs no model first: a mistake costs seconds, not a build.
    tasks = parse_tasks(args.task)
    if args.top_k > len(tasks):
        raise ValueError(f"--top-k must be at most the number of tasks ({len(tasks)}), "
                         f"got {args.top_k}")
    twice = sorted({name for name in args.router_layer if args.router_layer.count(name) > 1})
    if twice:
        raise ValueError(f"--router-layer names each layer once; given more than once: {twice}")
    inputs = [file for name, path in tasks.items()
              for file in checkpoint_files(path, f"--task {name}")]
    if os.path.isdir(args.base):
        inputs += [entry.path for entry in os.scandir(args.base) if entry.is_file()]
    check_output(args.output, inputs)

    base = load_base(args.base, args.base_class)
    keys = set(base.state_dict())
    # Read tensor by tensor during the build: T checkpoints are never all in memory.
    finetuned = {name: _strip_prefix(_SafetensorsCheckpoint(path, f"--task {name}"), keys)
                 for name, path in tasks.items()}
    router_layer = args.router_layer[0] if len(args.router_layer) == 1 else args.router_layer
    mm = MASS.from_finetuned(
        base, finetuned, rank=args.rank, router_layer=router_layer, pooling=args.pooling,
        top_k=args.top_k, temperature=args.temperature, threshold=args.threshold,
        weighting=args.weighting, mode=args.mode, first_pass=args.first_pass,
        first_pass_scale=args.first_pass_scale,
        decorrelate=args.decorrelate, progress=True)
    mm.save(args.output)
    print(describe(args.output))


def describe(path: str) -> str:
    from safetensors import safe_open

    from .model import _bundle_metadata

    if not os.path.isfile(path):
        raise ValueError(f"{path} is a folder, not a bundle file" if os.path.isdir(path)
                         else f"{path}: no such file")
    try:
        handle = safe_open(path, framework="pt")
    except Exception as error:  # safetensors raises several types for a bad file
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    with handle as f:
        raw = (f.metadata() or {}).get("mass_ext")
        if raw is None:
            raise ValueError(f"{path} is not a mass_ext bundle (no 'mass_ext' metadata)")
        meta = _bundle_metadata(path, raw)  # what MASS.load checks, with its messages
        factor_bytes = base_bytes = 0
        shapes = {}
        for key in f.keys():
            tensor_slice = f.get_slice(key)
            shapes[key] = list(tensor_slice.get_shape())
            nbytes = _BYTES.get(tensor_slice.get_dtype(), 8)
            for size in shapes[key]:
                nbytes *= size
            if key.rsplit(".", 1)[-1] in ("U_t", "S", "V"):
                factor_bytes += nbytes
            else:
                base_bytes += nbytes
    # The metadata is a file's content, not ours: a missing key or a wrong type is bad input.
    try:
        ranks = {v["rank"] for v in meta["routed_layers"].values()}
        _check_layers_against_tensors(path, meta, shapes)
        router = meta["router"]
        lines = [
            f"bundle      {path} (format version {meta['format_version']})",
            f"tasks       {len(meta['task_names'])}: {', '.join(meta['task_names'])}",
            *_model_line(meta.get("architecture")),
            f"routed      {len(meta['routed_layers'])} Linear layers, rank "
            f"{min(ranks)}..{max(ranks)}" if ranks else "routed      none",
            "router      " + ", ".join(f"{k}={v}" for k, v in router.items()),
        ]
    except (KeyError, TypeError, AttributeError) as error:
        problem = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"{path}: bad mass_ext metadata ({problem})") from error
    lines.append(
        f"size        {os.path.getsize(path) / 2**20:.1f} MiB = base {base_bytes / 2**20:.1f} MiB"
        f" + task factors {factor_bytes / 2**20:.1f} MiB "
        f"({(base_bytes + factor_bytes) / max(base_bytes, 1):.2f}x the base model)")
    return "\n".join(lines)


def _model_line(architecture) -> list:
    """The line naming the model a bundle was saved from (bundles that record it)."""
    if not isinstance(architecture, dict) or not isinstance(architecture.get("class"), str):
        return []
    config = architecture.get("config") if isinstance(architecture.get("config"), dict) else {}
    fields = ", ".join(f"{k}={v}" for k, v in config.items())
    return [f"model       {architecture['class']}" + (f" ({fields})" if fields else "")]


def _check_layers_against_tensors(path: str, meta: dict, shapes: dict) -> None:
    """Each routed layer's rank and task count in the metadata are its U_t's (T, r, d_out),
    as MASS.load would find: `info` does not print what load refuses."""
    T = len(meta["task_names"])
    for name, layer in meta["routed_layers"].items():
        rank = layer["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{path}: bad mass_ext metadata (layer {name!r} has rank "
                             f"{rank!r}, not a positive int)")
        shape = shapes.get(f"{name}.U_t")
        if shape is None or len(shape) != 3 or shape[:2] != [T, rank]:
            raise ValueError(f"{path}: layer {name!r}'s U_t has shape {shape}, the metadata "
                             f"says {T} task(s) of rank {rank}")


_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
          "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mass-ext", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="base + fine-tuned checkpoints -> one bundle")
    b.add_argument("--base", required=True, help="model folder or package.module:function")
    b.add_argument("--base-class", default=None, metavar="CLASS",
                   help="transformers class that loads a --base folder (default AutoModel; "
                        "AutoModelForCausalLM keeps a language model's head)")
    b.add_argument("--task", action="append", required=True, metavar="NAME=CHECKPOINT",
                   help="a fine-tuned checkpoint: .safetensors, shard index or model "
                        "folder; repeat it for every task")
    b.add_argument("--router-layer", required=True, action="append",
                   help="name of the Linear whose input routes; repeat it to route on "
                        "several layers together")
    b.add_argument("--rank", type=_positive_int, default=None,
                   help="per-task rank (default min(d_out, d_in) // T per layer)")
    b.add_argument("--pooling", default="cls", choices=POOLINGS,
                   help="how the router input is pooled per sample (default cls)")
    b.add_argument("--top-k", type=_positive_int, default=1, help="tasks per sample")
    b.add_argument("--temperature", type=_positive_float, default=1.0,
                   help="softmax temperature over the routing logits")
    b.add_argument("--threshold", type=_finite_float, default=0.0,
                   help="a selected task other than the best is dropped at p <= threshold")
    b.add_argument("--weighting", default="uniform", choices=["uniform", "softmax", "renormalized"],
                   help="weights of the selected tasks")
    b.add_argument("--mode", default="two_pass", choices=list(MODES),
                   help="two_pass (route each sample once) or per_layer")
    b.add_argument("--first-pass", default="pretrained", choices=list(FIRST_PASSES),
                   help="the weights pass 1 runs to route")
    b.add_argument("--first-pass-scale", type=_finite_float, default=1.0,
                   help="the weight of every task's block in the tsvm first pass")
    b.add_argument("--decorrelate", action="store_true",
                   help="TSV-style decorrelation of the stacked factors")
    b.add_argument("-o", "--output", required=True, help="the bundle to write (.safetensors)")
    i = sub.add_parser("info", help="tasks, ranks, sizes and router settings of a bundle")
    i.add_argument("bundle")
    args = parser.parse_args(argv)

    def one_line(message, category, filename, lineno, file=None, line=None):
        # A warning (a rank clamped, layers averaged) as the command's own line, not as the
        # library source line that raised it.
        print(f"{parser.prog}: warning: {message}", file=sys.stderr if file is None else file)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            if args.command == "build":
                build(args)
            else:
                print(describe(args.bundle))
    except (ValueError, TypeError, KeyError, OSError) as error:
        # Bad input (the model code raises ValueError/TypeError with full sentences): one
        # line, as argparse does. Other exceptions are bugs and keep their traceback.
        problem = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        parser.exit(2, f"{parser.prog}: error: {problem}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
