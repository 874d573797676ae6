#!/usr/bin/env bash
# Embedding throughput side by side, one run, one machine (`switchyard-bench embeddings`):
#   switchyard    switchyard up --engine candle (1 GPU worker, no wse worker), /v1/embeddings
#   llama-server  llama.cpp's llama-server --embeddings --pooling mean on the same GGUF
# both up at once, measured in alternating rounds (only one is loaded at a time). The workload
# is code-search indexing of this repository's own Rust sources. Every process gets free
# loopback ports and is stopped on exit.
#
#   bench/embeddings.sh [extra switchyard-bench embeddings flags, e.g. --inputs-per-request 16]
# Env: THREADS (2: the machine's cores, given to each system), SLOTS (llama-server parallel
# slots, 4), MODEL (models/SmolLM2-135M-Instruct.Q4_1.gguf), LLAMA_SERVER (a llama-server
# binary; default: built by bench/anchors/setup.sh), OUT (target/embeddings/<UTC time>),
# PACKS (`--prefill-pack` values, one Switchyard each: "auto"; e.g. "auto 1" adds one that
# prefills one input per pass, named switchyard-pack1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
THREADS="${THREADS:-2}"
SLOTS="${SLOTS:-4}"
MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUT="${OUT:-target/embeddings/$(date -u +%Y%m%dT%H%M%SZ)}"
MODEL_NAME="$(basename "$MODEL" .gguf)"
mkdir -p "$OUT"

scripts/fetch-model.sh >/dev/null
. scripts/protoc.sh
ensure_protoc
cargo build --release -q -p switchyard -p switchyard-bench
if [ -z "${LLAMA_SERVER:-}" ]; then
  bench/anchors/setup.sh >/dev/null
  LLAMA_SERVER="$ROOT/target/anchors/bin/llama-server"
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
SWITCHYARD="$TARGET_DIR/release/switchyard"
BENCH="$TARGET_DIR/release/switchyard-bench"

. bench/processes.sh

targets=()
for pack in ${PACKS:-auto}; do
  name=switchyard; [ "$pack" = auto ] || name="switchyard-pack$pack"
  grpc=$(free_port); http=$(free_port); cp=$(free_port); dash=$(free_port)
  start "$OUT/$name.log" env RAYON_NUM_THREADS="$THREADS" "$SWITCHYARD" up --engine candle \
    --model-path "$MODEL" --gpu-workers 1 --wse-workers 0 --prefill-pack "$pack" \
    --router-listen "127.0.0.1:$grpc" --http-listen "127.0.0.1:$http" \
    --control-plane-listen "127.0.0.1:$cp" --dashboard-listen "127.0.0.1:$dash"
  targets+=(--target "$name=http://127.0.0.1:$http")
done
llama=$(free_port)
# A physical batch as large as the context: llama.cpp refuses an embedding input longer than it.
start "$OUT/llama-server.log" "$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$llama" \
  -t "$THREADS" -tb "$THREADS" -np "$SLOTS" -c $((SLOTS * 2048)) -b 2048 -ub 2048 \
  --embeddings --pooling mean --alias "$MODEL_NAME" --no-webui
wait_http "http://127.0.0.1:$llama/health" 120 "$OUT/llama-server.log"
for target in "${targets[@]}"; do
  [ "$target" = --target ] && continue
  url="${target#*=}"
  for _ in $(seq 600); do
    if curl -sf "$url/v1/models" 2>/dev/null | grep -q '"ready_workers":[1-9]'; then
      break
    fi
    sleep 0.2
  done
done
"$BENCH" embeddings --model "$MODEL_NAME" \
  "${targets[@]}" --target "llama-server=http://127.0.0.1:$llama" \
  "$@" | tee "$OUT/result.txt"
