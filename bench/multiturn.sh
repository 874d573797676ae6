#!/usr/bin/env bash
# Prefix reuse side by side, one run, one machine, one workload (`switchyard-bench multiturn`):
#   on     switchyard up --engine candle (2 GPU workers, no wse worker), engine prefix cache on
#   off    the same with --prefix-cache off
#   step   the same as on with --step-target STEP_TARGET (250ms; not run by default)
#   pack1  the same as on with --prefill-pack 1: one prompt per prefill pass (not run by default)
#   anchor SMG (--policy cache_aware) in front of two llama.cpp llama-server processes
# in alternating rounds (on, off, anchor, on, off, anchor, ...), each system started fresh
# (cold caches) for its round and stopped after it. Every process gets free loopback ports and
# is stopped on exit. Prints one table: later-turn (turn >= 2) TTFT p50, its ratios (off/on,
# anchor/on), turn-1 TTFT, tokens/s and prefix hit rates. Per-run JSON and logs go to OUT.
#
#   bench/multiturn.sh [extra switchyard-bench multiturn flags, e.g. --conversations 8 --turns 4]
# Env: ROUNDS (2), THREADS (2: the machine's cores, shared by both Switchyard workers, split
# between the two llama-servers), SLOTS (llama-server parallel slots each, 4),
# MODEL (models/SmolLM2-135M-Instruct.Q4_1.gguf), OUT (target/multiturn/<UTC time>),
# SYSTEMS ("on off anchor"; "step" and "pack1" too on request), STEP_TARGET (250ms), LLAMA_SERVER_ARGS (extra llama-server flags, e.g. "--no-repack"
# on a host where llama.cpp's weight repacking crashes at start-up, as its AMX kernel did on one
# of our VMs; note it in the results, repacking is faster where it works), LLAMA_SERVER and SMG
# (binaries to use instead of building the anchors with bench/anchors/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
ROUNDS="${ROUNDS:-2}"
THREADS="${THREADS:-2}"
SLOTS="${SLOTS:-4}"
MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
SYSTEMS="${SYSTEMS:-on off anchor}"
OUT="${OUT:-target/multiturn/$(date -u +%Y%m%dT%H%M%SZ)}"
MODEL_NAME="$(basename "$MODEL" .gguf)"
mkdir -p "$OUT"

scripts/fetch-model.sh >/dev/null
. scripts/protoc.sh
ensure_protoc
cargo build --release -q -p switchyard -p switchyard-bench
if [[ " $SYSTEMS " == *" anchor "* ]] && [ -z "${LLAMA_SERVER:-}${SMG:-}" ]; then
  bench/anchors/setup.sh >/dev/null
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
SWITCHYARD="$TARGET_DIR/release/switchyard"
BENCH="$TARGET_DIR/release/switchyard-bench"
LLAMA_SERVER="${LLAMA_SERVER:-$ROOT/target/anchors/bin/llama-server}"
SMG="${SMG:-$ROOT/target/anchors/venv/bin/smg}"

. bench/processes.sh

# `up` passes --prefix-cache to its GPU workers; a build without it can only run one variant.
HAS_PREFIX_FLAG=0
if "$SWITCHYARD" up --help | grep -q -- '--prefix-cache'; then HAS_PREFIX_FLAG=1; fi

run_switchyard() {  # run_switchyard on|off|step|pack1 ROUND [multiturn flags]
  local mode="$1" round="$2" log="$OUT/switchyard-$1-$2.log"
  shift 2
  local grpc http cp dash flag=()
  grpc=$(free_port); http=$(free_port); cp=$(free_port); dash=$(free_port)
  if [ "$mode" = step ]; then flag=(--step-target "${STEP_TARGET:-250ms}")
  elif [ "$mode" = pack1 ]; then flag=(--prefill-pack 1)
  elif [ "$HAS_PREFIX_FLAG" = 1 ]; then flag=(--prefix-cache "$mode"); fi
  start "$log" env RAYON_NUM_THREADS="$THREADS" "$SWITCHYARD" up --engine candle \
    --model-path "$MODEL" --gpu-workers 2 --wse-workers 0 "${flag[@]}" \
    --router-listen "127.0.0.1:$grpc" --http-listen "127.0.0.1:$http" \
    --control-plane-listen "127.0.0.1:$cp" --dashboard-listen "127.0.0.1:$dash"
  wait_line "$log" "router http" 120
  "$BENCH" multiturn --url "http://127.0.0.1:$http/v1" --model "$MODEL_NAME" \
    --metrics-url "http://127.0.0.1:$http/metrics" --label "switchyard-$mode" --json "$@" \
    >"$OUT/$mode-$round.json"
  stop_all
}

run_anchor() {  # run_anchor ROUND [multiturn flags]
  local round="$1" a b gw prom
  shift
  a=$(free_port); b=$(free_port); gw=$(free_port); prom=$(free_port)
  local per=$((THREADS / 2)); [ "$per" -ge 1 ] || per=1
  for port in "$a" "$b"; do
    start "$OUT/llama-server-$port-$round.log" "$LLAMA_SERVER" -m "$MODEL" \
      --host 127.0.0.1 --port "$port" -t "$per" -tb "$per" -np "$SLOTS" -c $((SLOTS * 4096)) \
      --alias "$MODEL_NAME" --metrics --no-webui ${LLAMA_SERVER_ARGS:-}
  done
  wait_http "http://127.0.0.1:$a/health" 120 "$OUT/llama-server-$a-$round.log"
  wait_http "http://127.0.0.1:$b/health" 120 "$OUT/llama-server-$b-$round.log"
  start "$OUT/smg-$round.log" "$SMG" launch --host 127.0.0.1 --port "$gw" \
    --worker-urls "http://127.0.0.1:$a" "http://127.0.0.1:$b" --policy cache_aware \
    --prometheus-host 127.0.0.1 --prometheus-port "$prom" --log-level warn
  wait_http "http://127.0.0.1:$gw/v1/models" 120 "$OUT/smg-$round.log"
  "$BENCH" multiturn --url "http://127.0.0.1:$gw/v1" --model "$MODEL_NAME" \
    --label "smg-cache_aware+llama-server" --json "$@" >"$OUT/anchor-$round.json"
  stop_all
}

for round in $(seq "$ROUNDS"); do
  for system in $SYSTEMS; do
    case "$system" in
      on|off|step|pack1)
        if [ "$HAS_PREFIX_FLAG" = 0 ] && [ "$system" = off ]; then continue; fi
        echo "round $round: switchyard $system" >&2
        run_switchyard "$system" "$round" "$@" ;;
      anchor)
        echo "round $round: smg cache_aware + 2 llama-server" >&2
        run_anchor "$round" "$@" ;;
      *) echo "unknown system $system (on, off, step, pack1, anchor)" >&2; exit 2 ;;
    esac
  done
done

python3 - "$OUT" "$HAS_PREFIX_FLAG" <<'PY'
import glob, json, os, statistics, sys
out, has_flag = sys.argv[1], sys.argv[2] == "1"
names = {"on": "switchyard, prefix cache on" if has_flag else "switchyard (no --prefix-cache flag)",
         "off": "switchyard, prefix cache off",
         "step": "switchyard, cache on, step target",
         "pack1": "switchyard, one prompt per pass",
         "anchor": "SMG cache_aware + 2x llama-server"}
runs = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    system = os.path.basename(path).rsplit("-", 1)[0]
    runs.setdefault(system, []).append(json.load(open(path)))
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)
rows = {}
for system, rs in runs.items():
    rows[system] = {
        "rounds": len(rs),
        "later": med([r["later_turns_ttft_p50_ms"] for r in rs]),
        "later90": med([r["later_turns_ttft_p90_ms"] for r in rs]),
        "first": med([r["per_turn"][0]["ttft_p50_ms"] for r in rs]),
        "tps": med([r["tokens_per_s"] for r in rs]),
        "hit": med([r["prefix_hit_rate"] for r in rs]),
        "engine_hit": med([r["engine_prefix_hit_rate"] for r in rs]),
        "same": med([r["same_worker_share"] for r in rs]),
    }
r0 = next(iter(runs.values()))[0]
print(f"\n{r0['conversations']} conversations x {r0['turns']} turns, {r0['concurrency']} in flight, "
      f"max_tokens {r0['max_tokens']}, seed {r0['seed']}; medians over rounds; results in {out}")
head = f"{'system':<36}{'rounds':>7}{'turn>=2 TTFT p50':>18}{'p90':>9}{'turn 1 p50':>12}{'tok/s':>8}{'hit (usage)':>13}{'hit (engine)':>14}{'same worker':>13}"
print(head)
for system in ("on", "off", "step", "pack1", "anchor"):
    if system not in rows:
        continue
    r = rows[system]
    pct = lambda v: "n/a" if v is None else f"{v * 100:.1f}%"
    print(f"{names[system]:<36}{r['rounds']:>7}{fmt(r['later'], '.0f') + ' ms':>18}{fmt(r['later90'], '.0f'):>9}"
          f"{fmt(r['first'], '.0f') + ' ms':>12}{fmt(r['tps'], '.1f'):>8}{pct(r['hit']):>13}{pct(r['engine_hit']):>14}{pct(r['same']):>13}")
on = rows.get("on", {}).get("later")
if on:
    for system, label in (("off", "off/on"), ("step", "step/on"), ("pack1", "pack1/on"), ("anchor", "anchor/on")):
        v = rows.get(system, {}).get("later")
        if v is not None:
            print(f"turn>=2 TTFT p50 ratio {label}: {v / on:.2f}x")
PY
