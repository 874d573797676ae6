#!/usr/bin/env bash
# Runs the whole local cluster (README "The two commands"); extra arguments go to
# `switchyard up` (e.g. --etcd http://127.0.0.1:2379).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/protoc.sh
ensure_protoc
exec cargo run --quiet --release -p switchyard -- up "$@"
