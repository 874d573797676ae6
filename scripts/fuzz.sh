#!/usr/bin/env bash
# Long runs of the property/fuzz harnesses (issue 12; proptest on stable Rust). The same
# harnesses run in every `cargo test` with a small case count; this runs them with many more
# cases and fresh random seeds, round after round, until FUZZ_DURATION seconds have passed.
#
#   scripts/fuzz.sh                          # one round, 200 000 cases per property
#   FUZZ_DURATION=3600 scripts/fuzz.sh       # rounds until an hour has passed
#   PROPTEST_CASES=20000 scripts/fuzz.sh sse # fewer cases, only test names matching "sse"
#
# A failure is shrunk to a minimal case and recorded by proptest in the crate's
# proptest-regressions/ directory (commit it: it is replayed first from then on); turn it into
# a named regression test next to the harness and fix the bug.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/protoc.sh
ensure_protoc

export PROPTEST_CASES="${PROPTEST_CASES:-200000}"
duration="${FUZZ_DURATION:-0}"
filter="${1:-fuzz}"
crates=(-p switchyard-proto -p switchyard-worker-wse -p switchyard-router -p switchyard-policy)

# Build once, then run; the harnesses live in each crate's library tests, named *fuzz*.
cargo test "${crates[@]}" --lib --no-run
start=$(date +%s)
round=1
while :; do
  echo "fuzz round $round: PROPTEST_CASES=$PROPTEST_CASES, tests matching '$filter'"
  cargo test -q "${crates[@]}" --lib --no-fail-fast -- "$filter"
  elapsed=$(( $(date +%s) - start ))
  if [ "$elapsed" -ge "$duration" ]; then
    echo "fuzz: $round round(s) clean in ${elapsed}s"
    break
  fi
  round=$((round + 1))
done
