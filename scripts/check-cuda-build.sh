#!/usr/bin/env bash
# Tries to compile `switchyard-worker-gpu --features cuda` with a CUDA toolkit assembled from
# NVIDIA's PyPI wheels (no GPU, no system toolkit needed). NOT part of CI — see the findings.
#
# Findings (2026-11, on the 2-core CI machine kind):
#  * `nvidia-cuda-nvcc-cu12` (every 12.x up to 12.9.86) ships only `ptxas` and headers — no
#    `nvcc` driver, `cicc` or `cudafe++` — so no CUDA 12 toolkit can be assembled from PyPI.
#  * The CUDA 13 wheels (`nvidia-cuda-nvcc`, `nvidia-cuda-crt`, `nvidia-cuda-runtime`,
#    `nvidia-cuda-cccl`, `nvidia-cublas`, `nvidia-curand`, `nvidia-cuda-nvrtc`) do ship `nvcc`.
#    cudarc 0.19.10 knows CUDA versions up to 13.4 (`cuda-13040`); candle 0.11 selects it with
#    `cuda-version-from-build-system`, so the wheels must be pinned to 13.0–13.4.
#  * candle-kernels' build script compiles its 27 .cu files (920 KB: PTX for the elementwise
#    kernels plus heavily templated static MMQ/MoE GGUF kernels) with nvcc. Not completed
#    here within the time budget on 2 shared cores (see the issue-3 report); CI does not run it.
#  * candle 0.11 enables cudarc `dynamic-linking`; cudarc refuses `dynamic-loading` together
#    with it, and `cudarc::driver::sys::is_culib_present()` only exists (as an `unsafe fn`)
#    with `dynamic-loading`. Hence a `cuda` binary links libcuda: it needs libcuda.so.1 (the
#    driver, or the toolkit's stub for linking) to start; worker-gpu falls back to the CPU,
#    logged once, when the driver is present but no device is usable (device.rs).
#
# What an operator's build image needs: a CUDA toolkit 12.x or 13.0–13.4 with nvcc (e.g.
# nvidia/cuda:12.4.1-devel), `CUDA_COMPUTE_CAP` set when building without a GPU (e.g. 80),
# and then `cargo build --release -p switchyard --features switchyard-worker-gpu/cuda`.
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
nvcc --version
# A separate target dir: the cuda build shares nothing with the CPU build.
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda-check}" \
  time cargo check -p switchyard-worker-gpu --features cuda
