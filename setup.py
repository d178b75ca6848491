"""Builds mass_ext._C: a CPU-only C++ extension, plus CUDA kernels when a CUDA toolkit
and a CUDA build of torch are present and csrc/cuda/ holds sources.

MASS_EXT_FORCE_CPU=1 forces the CPU-only build (never needs nvcc).
MASS_EXT_DEBUG=1 builds with -O0 -g.
MASS_EXT_SANITIZE=1 builds the C++ code with AddressSanitizer and UndefinedBehaviorSanitizer
(-O1 -g); scripts/sanitize.sh builds it so, in a copy of the tree, and runs the tests.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
# Oldest torch each build was checked against (2026-11-28): the CPU build compiles and
# passes the tests on torch 2.4.1; the CUDA sources compile against 2.11 and 2.14 (CI)
# and need ATen APIs of 2.8 (at::mm with an output dtype).
CUDA_MIN_TORCH = (2, 8)


def _torch_version():
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def _flag(name):
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _nvidia_wheel_dirs():
    """(include dirs, lib dirs) of the NVIDIA wheels a CUDA build of torch installs
    (site-packages/nvidia/cu13/...): ATen's CUDA headers include cuBLAS / cuSPARSE headers
    that a bare CUDA toolkit may lack."""
    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    roots = sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*")))
    includes = [os.path.join(p, "include") for p in roots if os.path.isdir(os.path.join(p, "include"))]
    libs = [os.path.join(p, "lib") for p in roots if os.path.isdir(os.path.join(p, "lib"))]
    return includes, libs


def extension():
    debug = _flag("MASS_EXT_DEBUG")
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is a header template that runs serially without it.
    # The loader then shares torch's own libgomp (same soname), so there is one pool.
    cxx_flags += ["-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    link_flags = ["-fopenmp"]
    if _flag("MASS_EXT_SANITIZE"):
        # vptr is left out: it needs the RTTI of torch's own classes, which torch's
        # (uninstrumented) libraries do not export to it, and reports false positives.
        sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize=vptr"]
        # -fno-wrapv: Python's CFLAGS carry -fwrapv, which defines signed overflow and so
        # turns off UBSan's check of it (an index product overflowing int64 is a bug).
        cxx_flags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-wrapv"] + sanitizers
        link_flags += sanitizers
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = (
        not _flag("MASS_EXT_FORCE_CPU")
        and bool(cuda_sources)
        and torch.version.cuda is not None
        and CUDA_HOME is not None
    )
    if use_cuda and _torch_version() < CUDA_MIN_TORCH:
        print(f"mass_ext: torch {torch.__version__} is older than "
              f"{'.'.join(map(str, CUDA_MIN_TORCH))}, which the CUDA kernels need: building "
              "the CPU kernels only (CUDA tensors will run the pure-PyTorch reference)")
        use_cuda = False
    if use_cuda:
        # No --use_fast_math: the routing relies on IEEE isnan / isinf, ldexp and exact
        # division. -lineinfo lets compute-sanitizer name source lines.
        nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        wheel_includes, wheel_libs = _nvidia_wheel_dirs()
        return CUDAExtension(
            "mass_ext._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + wheel_includes,
            library_dirs=wheel_libs,
            extra_compile_args={"cxx": cxx_flags + ["-DMASS_EXT_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return CppExtension(
        "mass_ext._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


setup(
    name="mass_ext",
    version="0.1.0",
    description="MASS model merging as a fused routed low-rank linear op (C++/CUDA)",
    packages=find_packages(include=["mass_ext", "mass_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "safetensors", "tqdm"],
    extras_require={"hf": ["transformers"]},
    entry_points={"console_scripts": ["mass-ext=mass_ext.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
