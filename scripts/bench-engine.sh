#!/usr/bin/env bash
# Side-by-side engine benchmark (issue 3): `switchyard-bench engine` against llama.cpp
# (llama-cpp-python, built here from PyPI into .venv-bench if missing — slow, minutes; never in
# CI), same GGUF, same machine, same thread count. Prints both results and the ratios.
#   scripts/bench-engine.sh [extra switchyard-bench engine flags]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
VENV="${SWITCHYARD_BENCH_VENV:-.venv-bench}"
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$VENV"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    "$VENV/bin/pip" install -q "llama-cpp-python==0.3.*"
fi
THREADS="$(nproc)"
cargo build --release -q -p switchyard-bench
ours="$(RAYON_NUM_THREADS=$THREADS target/release/switchyard-bench engine --json "$@")"
theirs="$("$VENV/bin/python" bench/scripts/llamacpp_bench.py --threads "$THREADS")"
python3 - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{'metric':<28}{'switchyard':>14}{'llama.cpp':>14}{'ratio':>10}")
def row(name, x, y, higher_better=True):
    r = (x / y) if higher_better else (y / x)
    print(f"{name:<28}{x:>14.2f}{y:>14.2f}{r:>9.2f}x")
row("decode tok/s, 1 stream", a["decode_tok_s"], b["decode_tok_s"])
for k in a["aggregate_tok_s"]:
    row(f"aggregate tok/s, {k} streams", a["aggregate_tok_s"][k], b["aggregate_tok_s"][k])
for k in a["ttft_s"]:
    row(f"TTFT s, {k}-token prompt", a["ttft_s"][k], b["ttft_s"][k], higher_better=False)
row("peak RSS MiB", a["peak_rss_bytes"] / 2**20, b["peak_rss_bytes"] / 2**20, higher_better=False)
print("(ratio > 1 means switchyard is better; TTFT and RSS ratios are llama.cpp / switchyard)")
PY
