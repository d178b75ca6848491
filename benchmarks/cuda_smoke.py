"""A small run of every CUDA kernel, for compute-sanitizer (gpu_check.sh): all three ops,
both paths (decode and large N), odd sizes and sizes of whole 16-byte vectors (the
kernels' vector and scalar branches), a dropped slot, row- and column-major U, and a CUDA
graph replay. Checks the outputs loosely against the reference and prints "ok".

    compute-sanitizer --tool memcheck python benchmarks/cuda_smoke.py
"""
import os

import torch

import mass_ext
from mass_ext import reference

PATHS = {
    "decode": ("1000000", "1000000"),
    "large": ("0", "0"),
}


# (T, r, d_in, d_out, k): odd sizes (scalar loads), then rows of whole 16-byte vectors.
SHAPES = [(3, 5, 33, 17, 2), (3, 16, 64, 40, 2)]


def main():
    torch.manual_seed(0)
    for shape in SHAPES:
        check_shape(*shape)
    torch.cuda.synchronize()
    print("ok")


def check_shape(T, r, d_in, d_out, k):
    dev = "cuda"
    W, b = torch.randn(d_out, d_in, device=dev), torch.randn(d_out, device=dev)
    U, S = torch.randn(T, d_out, r, device=dev), torch.rand(T, r, device=dev)
    # QR on the CPU: the sanitizer then checks this project's kernels, not cuSOLVER's.
    V = torch.linalg.qr(torch.randn(T, d_in, r)).Q.transpose(1, 2).contiguous().to(dev)
    U_cm = U.transpose(1, 2).contiguous().transpose(1, 2)
    for name, (project_max, selected_max) in PATHS.items():
        os.environ["MASS_EXT_CUDA_PROJECT_MAX_ROWS"] = project_max
        os.environ["MASS_EXT_CUDA_SELECTED_MAX_ROWS"] = selected_max
        for n in (1, 3, 70):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(n, d_in, device=dev).to(dtype)
                p = [t.to(dtype) for t in (W, b, U, S, V)]
                routing = mass_ext.route(x, p[4], k, threshold=0.3, weighting="renormalized")
                for U_ in (p[2], U_cm.to(dtype)):
                    out = mass_ext.routed_linear(x, p[0], p[1], U_, p[3], p[4], k, threshold=0.3,
                                                 weighting="renormalized")
                    pre = mass_ext.routed_linear(x, p[0], p[1], U_, p[3], p[4],
                                                 indices=routing.indices, weights=routing.weights)
                    ref = reference.routed_linear(x, p[0], p[1], U_, p[3], p[4],
                                                  indices=routing.indices, weights=routing.weights)
                    tol = 1e-4 if dtype == torch.float32 else 5e-2
                    scale = 1 + ref.float().abs().max()
                    assert (out.float() - ref.float()).abs().max() <= tol * scale, (name, n, dtype)
                    assert (pre.float() - ref.float()).abs().max() <= tol * scale, (name, n, dtype)
        x = torch.randn(4, d_in, device=dev)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            mass_ext.routed_linear(x, W, b, U, S, V, k)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = mass_ext.routed_linear(x, W, b, U, S, V, k)
        x.copy_(torch.randn(4, d_in, device=dev))
        graph.replay()
        torch.testing.assert_close(out, mass_ext.routed_linear(x, W, b, U, S, V, k))


if __name__ == "__main__":
    main()
