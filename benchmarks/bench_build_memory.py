"""Peak memory of MASS.from_finetuned: T fine-tuned checkpoints given as .safetensors files
(read one tensor at a time) against the same checkpoints loaded into memory first.

    python benchmarks/bench_build_memory.py [--layers 48] [--width 512] [--tasks 8]

Each build runs in a fresh process; reported: its resident anonymous memory before the
build and the most the build adds to it, in units of one model's size.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def make_base(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def anonymous_rss_bytes() -> int:
    """Resident anonymous memory (Linux): what must fit in RAM. File pages that safetensors
    maps count in the RSS too, but the kernel can drop them at will."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def child(folder: str, layers: int, width: int, tasks: int, from_files: bool) -> None:
    """One build; prints {"base": bytes, "before": anonymous RSS before the build, "peak":
    its maximum during the build, sampled every 2 ms}."""
    from safetensors.torch import load_file

    import mass_ext

    base = make_base(layers, width)
    paths = {f"task{t}": os.path.join(folder, f"task{t}.safetensors") for t in range(tasks)}
    finetuned = paths if from_files else {
        n: {k: v.clone() for k, v in load_file(p).items()} for n, p in paths.items()}
    before = peak = anonymous_rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, anonymous_rss_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        mass_ext.MASS.from_finetuned(base, finetuned, router_layer="0", progress=False)
    finally:
        done.set()
        sampler.join()
    print(json.dumps({"base": sum(p.numel() * p.element_size() for p in base.parameters()),
                      "before": before, "peak": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--child", choices=["files", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.folder, args.layers, args.width, args.tasks, args.child == "files")
        return
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    base = make_base(args.layers, args.width)
    with tempfile.TemporaryDirectory() as folder:
        g = torch.Generator().manual_seed(1)
        for t in range(args.tasks):
            state = {k: v + 0.01 * torch.randn(v.shape, generator=g)
                     for k, v in base.state_dict().items()}
            save_file(state, os.path.join(folder, f"task{t}.safetensors"))
        print(f"{args.layers} Linear layers {args.width}x{args.width} (float32), "
              f"T = {args.tasks} checkpoints; torch {torch.__version__}")
        # glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in its
        # heap, where blocks still in use pin them: with small tensors the peak then also
        # measures fragmentation. A fixed 64 KiB threshold frees every tensor at once, as
        # tensors of a real model's size always are.
        for allocator, env in (("glibc default", {}),
                               ("MALLOC_MMAP_THRESHOLD_=65536", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
            for mode in ("memory", "files"):
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--child", mode, "--folder",
                     folder, "--layers", str(args.layers), "--width", str(args.width),
                     "--tasks", str(args.tasks)], env=dict(os.environ, **env),
                    check=True, capture_output=True, text=True, cwd=os.path.dirname(HERE)).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{allocator}, checkpoints {'as files' if mode == 'files' else 'in memory'}: "
                      f"{r['before'] / r['base']:.1f}x one model before the build (interpreter, "
                      f"base model{', checkpoints' if mode == 'memory' else ''}), "
                      f"{(r['peak'] - r['before']) / r['base']:.1f}x more at its peak")


if __name__ == "__main__":
    main()
