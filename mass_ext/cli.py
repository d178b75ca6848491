"""mass-ext: build a MASS bundle from fine-tuned checkpoints, or describe one.

    mass-ext build --base MODEL --task NAME=CHECKPOINT [--task ...] --router-layer LAYER \\
                   [--rank R] [--pooling cls|mean|tokens] [--top-k K] ... -o bundle.safetensors
    mass-ext info bundle.safetensors

MODEL is a Hugging Face model folder (config.json + weights, loaded offline with
transformers.AutoModel) or `package.module:function`, a factory returning the nn.Module.
CHECKPOINT is a .safetensors state dict of the same architecture, or a model folder.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch

from .model import FIRST_PASSES, MODES, POOLINGS


def load_base(spec: str) -> torch.nn.Module:
    if os.path.isdir(spec):
        import transformers

        return transformers.AutoModel.from_pretrained(spec, local_files_only=True).eval()
    module_name, sep, function = spec.partition(":")
    if not sep:
        raise SystemExit(f"--base must be a model folder or package.module:function, got {spec!r}")
    return getattr(importlib.import_module(module_name), function)()


def load_checkpoint(spec: str):
    if os.path.isdir(spec):
        path = os.path.join(spec, "model.safetensors")
        if not os.path.exists(path):
            raise SystemExit(f"{spec} holds no model.safetensors")
        return path
    if not os.path.exists(spec):
        raise SystemExit(f"checkpoint {spec} does not exist")
    return spec


def _strip_prefix(state: dict, keys: set) -> dict:
    """HF checkpoints of a task model (e.g. BertForSequenceClassification) prefix the
    encoder's keys ("bert.") and add heads: keep the base model's keys only."""
    if set(state) >= keys:
        return {k: state[k] for k in keys}
    prefixes = {k.split(".", 1)[0] + "." for k in state if "." in k}
    for prefix in sorted(prefixes):
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if set(stripped) >= keys:
            return {k: stripped[k] for k in keys}
    return state


def build(args) -> None:
    from safetensors.torch import load_file

    from .model import MASS

    base = load_base(args.base)
    keys = set(base.state_dict())
    finetuned = {}
    for item in args.task:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--task must be NAME=CHECKPOINT, got {item!r}")
        finetuned[name] = _strip_prefix(load_file(load_checkpoint(spec)), keys)
    mm = MASS.from_finetuned(
        base, finetuned, rank=args.rank, router_layer=(args.router_layer[0] if len(args.router_layer) == 1 else args.router_layer),
        pooling=args.pooling,
        top_k=args.top_k, temperature=args.temperature, threshold=args.threshold,
        weighting=args.weighting, mode=args.mode, first_pass=args.first_pass,
        decorrelate=args.decorrelate, progress=True)
    mm.save(args.output)
    print(describe(args.output))


def describe(path: str) -> str:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file")
    try:
        handle = safe_open(path, framework="pt")
    except Exception as error:  # safetensors raises several types for a bad file
        raise SystemExit(f"{path} is not a readable safetensors file: {error}") from error
    with handle as f:
        raw = (f.metadata() or {}).get("mass_ext")
        if raw is None:
            raise SystemExit(f"{path} is not a mass_ext bundle")
        meta = json.loads(raw)
        factor_bytes = base_bytes = 0
        for key in f.keys():
            tensor_slice = f.get_slice(key)
            nbytes = _BYTES.get(tensor_slice.get_dtype(), 8)
            for size in tensor_slice.get_shape():
                nbytes *= size
            if key.rsplit(".", 1)[-1] in ("U_t", "S", "V"):
                factor_bytes += nbytes
            else:
                base_bytes += nbytes
    ranks = {v["rank"] for v in meta["routed_layers"].values()}
    router = meta["router"]
    lines = [
        f"bundle      {path} (format version {meta['format_version']})",
        f"tasks       {len(meta['task_names'])}: {', '.join(meta['task_names'])}",
        f"routed      {len(meta['routed_layers'])} Linear layers, rank "
        f"{min(ranks)}..{max(ranks)}" if ranks else "routed      none",
        "router      " + ", ".join(f"{k}={v}" for k, v in router.items()),
        f"size        {os.path.getsize(path) / 2**20:.1f} MiB = base {base_bytes / 2**20:.1f} MiB"
        f" + task factors {factor_bytes / 2**20:.1f} MiB "
        f"({(base_bytes + factor_bytes) / max(base_bytes, 1):.2f}x the base model)",
    ]
    return "\n".join(lines)


_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
          "U8": 1, "BOOL": 1}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mass-ext", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="base + fine-tuned checkpoints -> one bundle")
    b.add_argument("--base", required=True, help="model folder or package.module:function")
    b.add_argument("--task", action="append", required=True, metavar="NAME=CHECKPOINT")
    b.add_argument("--router-layer", required=True, action="append",
                   help="name of the Linear whose input routes; repeat it to route on "
                        "several layers together")
    b.add_argument("--rank", type=int, default=None)
    b.add_argument("--pooling", default="cls", choices=POOLINGS)
    b.add_argument("--top-k", type=int, default=1)
    b.add_argument("--temperature", type=float, default=1.0)
    b.add_argument("--threshold", type=float, default=0.0)
    b.add_argument("--weighting", default="uniform", choices=["uniform", "softmax", "renormalized"])
    b.add_argument("--mode", default="two_pass", choices=list(MODES))
    b.add_argument("--first-pass", default="pretrained", choices=list(FIRST_PASSES))
    b.add_argument("--decorrelate", action="store_true")
    b.add_argument("-o", "--output", required=True)
    i = sub.add_parser("info", help="tasks, ranks, sizes and router settings of a bundle")
    i.add_argument("bundle")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args)
    else:
        print(describe(args.bundle))


if __name__ == "__main__":
    main(sys.argv[1:])
