#!/usr/bin/env bash
# Tool calls and JSON answers side by side (`bench/scripts/tool_calls_anchor.py`): a Switchyard
# cluster (`switchyard up --engine candle`, one GPU worker, no wse worker) and llama.cpp's
# llama-server (`--jinja`, its tool-call and JSON-schema support), both on the same GGUF model
# and the machine's threads, both started here on free loopback ports and stopped on exit. The
# requests alternate one at a time between the two, so each system has the cores to itself
# while it answers.
#
#   bench/tool-calls.sh [ROUNDS]
# Env: THREADS (2), MODEL (models/SmolLM2-135M-Instruct.Q4_1.gguf), OUT
# (target/tool-calls/<UTC time>), SWITCHYARD (a built switchyard binary; default: build
# target/release/switchyard), LLAMA_SERVER_ARGS (extra llama-server flags).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
THREADS="${THREADS:-2}"
MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUT="${OUT:-target/tool-calls/$(date -u +%Y%m%dT%H%M%SZ)}"
MODEL_NAME="$(basename "$MODEL" .gguf)"
mkdir -p "$OUT"

scripts/fetch-model.sh >/dev/null
if [ -z "${SWITCHYARD:-}" ]; then
  . scripts/protoc.sh
  ensure_protoc
  cargo build --release -q -p switchyard
  SWITCHYARD="$ROOT/target/release/switchyard"
fi
bench/anchors/setup.sh >/dev/null
LLAMA_SERVER="$ROOT/target/anchors/bin/llama-server"

. bench/processes.sh

grpc=$(free_port); http=$(free_port); cp=$(free_port); dash=$(free_port); llama=$(free_port)
start "$OUT/switchyard.log" env RAYON_NUM_THREADS="$THREADS" "$SWITCHYARD" up --engine candle \
  --model-path "$MODEL" --gpu-workers 1 --wse-workers 0 \
  --router-listen "127.0.0.1:$grpc" --http-listen "127.0.0.1:$http" \
  --control-plane-listen "127.0.0.1:$cp" --dashboard-listen "127.0.0.1:$dash"
start "$OUT/llama-server.log" "$LLAMA_SERVER" -m "$MODEL" --jinja --host 127.0.0.1 \
  --port "$llama" -t "$THREADS" -tb "$THREADS" -np 1 -c 4096 --alias "$MODEL_NAME" \
  --no-webui ${LLAMA_SERVER_ARGS:-}
wait_http "http://127.0.0.1:$llama/health" 120 "$OUT/llama-server.log"
wait_http "http://127.0.0.1:$http/v1/models" 120 "$OUT/switchyard.log"
python3 bench/scripts/tool_calls_anchor.py "http://127.0.0.1:$http/v1" \
  "http://127.0.0.1:$llama/v1" "$MODEL_NAME" "${1:-2}" | tee "$OUT/results.txt"
