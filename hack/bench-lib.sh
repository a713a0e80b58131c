# Shared by hack/bench-*.sh (sourced): start/stop our graph for the peer harness in ../shared/peer,
# and sample a process's peak RSS.
PEER_DIR="${PEER_DIR:-$ROOT/../shared/peer}"
[ -d "$PEER_DIR" ] || { echo "peer harness not found at $PEER_DIR (set PEER_DIR)" >&2; exit 1; }
# shellcheck source=/dev/null
source "$PEER_DIR/env.sh"
# DYNAMO_BIN: benchmark another build (e.g. an older commit's) instead of this checkout's release build.
BIN="${DYNAMO_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/dynamo}"

build_release() {
  [ -n "${DYNAMO_BIN:-}" ] && return 0
  (cd "$ROOT" && cargo build --release --locked --bin dynamo)
}

# start_ours MODE WORKERS SPEEDUP: runs `dynamo serve` on $HTTP_PORT with the peer's tiny model
# (same tokenizer and name as the Dynamo runs), sets OURS_PID and FRONTEND_PID.
start_ours() {
  local mode="$1" workers="$2" speedup="$3"
  mkdir -p "$RUN_DIR"
  DYN_LOG=warn "${NICE[@]}" "$BIN" serve "$ROOT/manifests/agg.yaml" --host 127.0.0.1 --port "$HTTP_PORT" \
    --workers "$workers" --speedup-ratio "$speedup" --router-mode "$mode" \
    --model-path "$MODEL_DIR" --model-name "$MODEL_NAME" > "$RUN_DIR/dynamo-rs.log" 2>&1 &
  OURS_PID=$!
  for _ in $(seq 1 100); do
    if curl -sf -m 1 "$BASE_URL/health" 2>/dev/null | grep -q "\"live_workers\":$workers"; then break; fi
    sleep 0.2
  done
  curl -sf -m 1 "$BASE_URL/health" >/dev/null || { echo "dynamo serve did not become healthy:"; tail -20 "$RUN_DIR/dynamo-rs.log"; exit 1; } >&2
  FRONTEND_PID="$(pgrep -f "^$BIN frontend" | head -1)"
  ENGINE_PID="$(pgrep -f "^$BIN sidecar" | head -1)"
  export FRONTEND_PID ENGINE_PID
}

stop_ours() {
  [ -n "${OURS_PID:-}" ] && kill -INT "$OURS_PID" 2>/dev/null && wait "$OURS_PID" 2>/dev/null
  OURS_PID=
}

# rss_watch PIDFILE_OR_PID OUTFILE: records the peak VmHWM (kB) seen, until killed.
rss_watch() {
  local src="$1" out="$2" peak=0 pid v
  echo 0 > "$out"
  while :; do
    if [ -f "$src" ]; then pid="$(cat "$src" 2>/dev/null)"; else pid="$src"; fi
    v="$(awk '/^VmHWM/{print $2}' "/proc/$pid/status" 2>/dev/null || true)"
    if [ -n "$v" ] && [ "$v" -gt "$peak" ]; then peak="$v"; echo "$peak" > "$out"; fi
    sleep 0.5
  done
}

# run_pair HARNESS MODE WORKERS SPEEDUP OURS_LABEL PEER_LABEL: runs the peer harness script
# (bench_overhead.sh or bench_trace.sh) against `dynamo serve`, then (unless SKIP_PEER=1) against
# Dynamo itself, recording each frontend's peak RSS next to the harness's results.
run_pair() {
  local harness="$1" mode="$2" workers="$3" speedup="$4" ours="$5" peer="$6"
  trap 'stop_ours; kill ${RSSW:-} 2>/dev/null || true' EXIT
  echo "== dynamo-rs ($mode)"
  start_ours "$mode" "$workers" "$speedup"
  rss_watch "$FRONTEND_PID" "$RUN_DIR/rss_ours" & RSSW=$!
  EXTERNAL=1 LABEL="$ours" "$PEER_DIR/$harness" "$mode"
  kill "$RSSW"; cp "$RUN_DIR/rss_ours" "$RESULTS/$ours/rss_kb"
  stop_ours
  if [ "${SKIP_PEER:-0}" != 1 ]; then
    echo "== NVIDIA Dynamo 1.6.1 ($mode)"
    # The harness reads FRONTEND_PID/ENGINE_PID before its own pid files: drop ours.
    unset FRONTEND_PID ENGINE_PID
    rm -f "$RUN_DIR/frontend.pid"
    rss_watch "$RUN_DIR/frontend.pid" "$RUN_DIR/rss_peer" & RSSW=$!
    LABEL="$peer" "$PEER_DIR/$harness" "$mode"
    kill "$RSSW"; cp "$RUN_DIR/rss_peer" "$RESULTS/$peer/rss_kb"
  fi
}
