#!/usr/bin/env bash
# Proves the CUDA sources compile, link and register on a machine without a GPU: creates
# .venv-cuda (torch 2.14.1+cu130, which runs on the CPU), builds the extension with nvcc
# in a copy of the tree (build/cuda/: the in-place CPU build is untouched), checks that
# the compiled library registers a CUDA kernel for every routed op, and runs the CPU tests
# against that build. Nothing built here can run on a GPU; the GPU machine rebuilds
# (benchmarks/gpu_check.sh).
#
#   bash scripts/cuda_build_check.sh                   # build + checks + CPU tests
#   bash scripts/cuda_build_check.sh tests/test_backend.py   # arguments go to pytest
#   MASS_EXT_CUDA_TORCH=2.11.0 bash scripts/cuda_build_check.sh   # against another torch
#
# MASS_EXT_CUDA_TORCH picks the torch (a +cu130 wheel; 2.14.1 lies on local disk, others
# come from PyPI, ~3 GB): the GPU machine has torch 2.11.0, so CI also builds against
# that one (in .venv-cuda-2.11.0 and build/cuda-2.11.0), and an ATen or torch.library
# API it lacks fails here instead of on the GPU machine's few minutes.
#
# Needs nvcc (CUDA_HOME, default /usr/local/cuda-13.0); exits 0 with a note without it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_build_check: no nvcc at $CUDA_HOME/bin/nvcc; skipped"
  exit 0
fi
TORCH_VERSION=${MASS_EXT_CUDA_TORCH:-2.14.1}
SUFFIX=$([ "$TORCH_VERSION" = 2.14.1 ] || echo "-$TORCH_VERSION")
VENV=.venv-cuda$SUFFIX
PY=$ROOT/$VENV/bin/python
if [ ! -x "$PY" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
"$PY" -m pip install --quiet --upgrade pip wheel
# setuptools in the same install, so pip picks one this torch accepts (2.11: < 82).
"$PY" -m pip install --quiet "torch==$TORCH_VERSION" setuptools numpy ninja pytest hypothesis expecttest safetensors tqdm
"$PY" -c "import sys, torch; v = torch.__version__; sys.exit(f'cuda_build_check: torch {v} is not a CUDA build' if not torch.version.cuda else 0)"

COPY=$ROOT/build/cuda$SUFFIX
mkdir -p "$COPY"
# Tracked files and untracked ones git does not ignore, mtimes kept (incremental build).
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$COPY"
cd "$COPY"
echo "cuda_build_check: building with nvcc ($CUDA_HOME) against torch $TORCH_VERSION in $COPY ..."
start=$(date +%s)
if ! PATH=$CUDA_HOME/bin:$PATH TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace > build_ext.log 2>&1; then
  tail -n 60 build_ext.log
  exit 1
fi
echo "cuda_build_check: built in $(( $(date +%s) - start )) s"
if grep "CPU kernels only" build_ext.log; then exit 1; fi

# The dispatcher check runs on the library alone (torch.ops.load_library, without the
# mass_ext package): mass_ext/ops.py registers the Python reference for CUDA when the
# library has no CUDA kernel, which would make the same check pass on a CPU-only build.
"$PY" - <<'EOF'
import glob, torch
lib, = glob.glob("mass_ext/_C*.so")
torch.ops.load_library(lib)
ops = ("route", "routed_linear", "routed_linear_prerouted")
for name in ops:
    for key in ("CPU", "CUDA", "Autograd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mass_ext::{name}", key), (name, key)
import mass_ext
assert mass_ext.backend("cuda") == "cuda" and mass_ext.backend("cpu") == "cpp", mass_ext.backend("cuda")
print("cuda_build_check: CUDA, CPU and Autograd kernels registered for", ", ".join(ops))
EOF
# The negative control: the same check on the CPU-only build (if there is one) finds no
# CUDA kernel, so the check above does tell the compiled kernels apart.
if [ -x "$ROOT/.venv/bin/python" ] && compgen -G "$ROOT/mass_ext/_C*.so" > /dev/null; then
  (cd "$ROOT" && .venv/bin/python - <<'EOF'
import glob, torch
lib, = glob.glob("mass_ext/_C*.so")
torch.ops.load_library(lib)
assert not torch._C._dispatch_has_kernel_for_dispatch_key("mass_ext::routed_linear", "CUDA")
print("cuda_build_check: the CPU-only build registers no CUDA kernel (negative control)")
EOF
  )
fi
echo "cuda_build_check: CPU tests against the CUDA build"
exec "$PY" -m pytest -q -p no:cacheprovider "${@:-tests}"
