#!/usr/bin/env bash
# Compiles `switchyard-worker-gpu --features cuda` with a CUDA toolkit assembled from NVIDIA's
# PyPI wheels (no GPU, no system toolkit needed). Run by .ci/run after the tests.
#
# Findings (2026-11, on the 2-core CI machine kind):
#  * `nvidia-cuda-nvcc-cu12` (every 12.x up to 12.9.86) ships only `ptxas` and headers — no
#    `nvcc` driver, `cicc` or `cudafe++` — so no CUDA 12 toolkit can be assembled from PyPI.
#  * The CUDA 13 wheels (`nvidia-cuda-nvcc`, `nvidia-nvvm`, `nvidia-cuda-crt`,
#    `nvidia-cuda-runtime`, `nvidia-cuda-cccl`) do ship a working `nvcc` (13.0.88 here).
#    cudarc 0.19.10 knows CUDA versions up to 13.4 (`cuda-13040`); candle 0.11 selects it with
#    `cuda-version-from-build-system`, so the wheels must be pinned to 13.0–13.4.
#  * Result (2026-11-30): `cargo check` and `cargo build --lib` of switchyard-worker-gpu with
#    `--features cuda` pass with this toolkit and CUDA_COMPUTE_CAP=80. Most of the time is
#    candle-kernels' build script compiling its 27 .cu files with nvcc (PTX for the elementwise
#    kernels, then 15 heavily templated static MMQ/MoE GGUF kernels at -O3, ~1.1 min each on
#    one core); the build took 20.5 min with cudaforge's default of one nvcc at a time, so this
#    script runs one per core (CUDAFORGE_THREADS). Re-checking our crates afterwards: 8 s.
#  * candle 0.11 enables cudarc `dynamic-linking`; cudarc refuses `dynamic-loading` together
#    with it, and `cudarc::driver::sys::is_culib_present()` only exists (as an `unsafe fn`)
#    with `dynamic-loading`. Hence a `cuda` binary links libcuda: it needs libcuda.so.1 (the
#    driver, or the toolkit's stub for linking) to start; worker-gpu falls back to the CPU,
#    logged once, when the driver is present but no device is usable (device.rs).
#
# What an operator's build image needs: a CUDA toolkit 12.x or 13.0–13.4 with nvcc (e.g.
# nvidia/cuda:12.4.1-devel), `CUDA_COMPUTE_CAP` set when building without a GPU (e.g. 80),
# and then `cargo build --release -p switchyard --features switchyard-worker-gpu/cuda`
# (deploy/docker/Dockerfile.cuda does this).
set -euo pipefail
cd "$(dirname "$0")/.."
VER="${CUDA_WHEEL_VERSION:-13.0.*}"
ROOT="${CUDA_PYPI_ROOT:-/tmp/cuda-pypi}"
if [ ! -x "$ROOT/nvidia/cu13/nvvm/bin/cicc" ]; then
  # The wheels share the nvidia/cu13 tree; `pip install --target` will not merge them, so
  # download and unpack each one. nvcc needs cicc from nvidia-nvvm.
  dl="$(mktemp -d)"
  python3 -m pip download -q --disable-pip-version-check --no-deps -d "$dl" \
    "nvidia-cuda-nvcc==$VER" "nvidia-nvvm==$VER" "nvidia-cuda-crt==$VER" \
    "nvidia-cuda-runtime==$VER" "nvidia-cuda-cccl==$VER"
  python3 - "$dl" "$ROOT" <<'PY'
import glob, sys, zipfile
for w in glob.glob(sys.argv[1] + "/*.whl"):
    zipfile.ZipFile(w).extractall(sys.argv[2])
PY
  chmod +x "$ROOT"/nvidia/cu13/bin/* "$ROOT"/nvidia/cu13/nvvm/bin/*
fi
CUDA="$ROOT/nvidia/cu13"
export CUDA_ROOT="$CUDA" CUDA_PATH="$CUDA" CUDA_TOOLKIT_ROOT_DIR="$CUDA"
export PATH="$CUDA/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export LIBRARY_PATH="$CUDA/lib:$CUDA/lib64:${LIBRARY_PATH:-}"
# candle-kernels' build (cudaforge) runs half the cores' worth of nvcc jobs by default.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
nvcc --version
# A separate target dir: the cuda build shares nothing with the CPU build.
start=$SECONDS
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda-check}" \
  cargo check -p switchyard-worker-gpu --features cuda
echo "cuda feature check: $((SECONDS - start)) s"
