# Process helpers the side-by-side bench scripts share (sourced, not run): every system they
# start runs in its own process group on free loopback ports and is stopped on exit.
#   start LOG CMD...        runs CMD in its own session (process group = its pid), output to LOG
#   stop_all                stops every group started (TERM, then KILL after 5 s); also on exit
#   free_port               a free loopback TCP port
#   wait_http URL SECS LOG  until URL answers 2xx (LOG's tail is shown when it never does)
#   wait_line LOG PATTERN SECS  until PATTERN appears in LOG

GROUPS_STARTED=()
stop_all() {
  for g in "${GROUPS_STARTED[@]}"; do
    kill -TERM -- "-$g" 2>/dev/null || true
  done
  for g in "${GROUPS_STARTED[@]}"; do
    for _ in $(seq 50); do kill -0 -- "-$g" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$g" 2>/dev/null || true
  done
  GROUPS_STARTED=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

start() {
  local log="$1"; shift
  setsid "$@" >"$log" 2>&1 &
  GROUPS_STARTED+=("$!")
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() {
  local url="$1" secs="$2" log="$3"
  for _ in $(seq $((secs * 5))); do
    if curl -sf -o /dev/null "$url"; then return 0; fi
    sleep 0.2
  done
  echo "timed out waiting for $url; log $log:" >&2
  tail -20 "$log" >&2
  return 1
}

wait_line() {
  local log="$1" pattern="$2" secs="$3"
  for _ in $(seq $((secs * 5))); do
    if grep -q "$pattern" "$log" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "timed out waiting for '$pattern' in $log:" >&2
  tail -20 "$log" >&2
  return 1
}
