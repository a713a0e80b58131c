#!/usr/bin/env bash
# The kill test, ours vs NVIDIA Dynamo 1.6.1 (same client, same machine, same session): 2 workers,
# 32 concurrent streams of 400 tokens, `kill -9` one worker process after a second; how many
# streams failed (and how many came back short). Dynamo runs with --migration-limit 3 and two mocker
# processes of one worker each, so one can be killed alone.
#
# usage: hack/bench-kill.sh            env: SKIP_PEER=1, VENV (a venv with the openai package)
# output: one JSON line per system, and docs/results/kill.md
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/hack/bench-lib.sh"
VENV="${VENV:-$(ls -d "${DYNAMO_CACHE:-$HOME/.cache/dynamo-rs}"/venv-* | head -1)}"
PY="$VENV/bin/python"
"$PEER_DIR/setup.sh" > /dev/null
build_release
OUT="$ROOT/docs/results/kill.md"

echo "== dynamo-rs"
mkdir -p "$RUN_DIR"
DYN_LOG=warn "$BIN" serve "$ROOT/manifests/agg.yaml" --host 127.0.0.1 --port "$HTTP_PORT" --workers 2 \
  --speedup-ratio 1 --model-path "$MODEL_DIR" --model-name "$MODEL_NAME" > "$RUN_DIR/dynamo-rs-kill.log" 2>&1 &
SERVE=$!
trap 'kill -INT $SERVE 2>/dev/null || true; "$PEER_DIR/stop.sh" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 100); do curl -sf -m 1 "$BASE_URL/health" | grep -q '"live_workers":2' && break; sleep 0.2; done
VICTIM="$(pgrep -f "^$BIN sidecar" | head -1)"
OURS="$("$PY" "$ROOT/hack/kill_streams.py" "$BASE_URL" "$MODEL_NAME" "$VICTIM")"
echo "$OURS"
kill -INT $SERVE; wait $SERVE 2>/dev/null || true

PEER_LINE="(not run)"; PEER0_LINE="(not run)"
for LIMIT in 3 0; do
  [ "${SKIP_PEER:-0}" = 1 ] && break
  echo "== NVIDIA Dynamo 1.6.1 (--migration-limit $LIMIT)"
  FRONTEND_ARGS="--migration-limit $LIMIT" "$PEER_DIR/run_dynamo.sh" round-robin 1 1 > /dev/null
  # A second mocker process with one worker: the victim.
  setsid "$PEER/dyn/bin/python" -m dynamo.mocker --model-path "$MODEL_DIR" --model-name "$MODEL_NAME" \
    --discovery-backend file --num-workers 1 --speedup-ratio 1 > "$RUN_DIR/mocker2.log" 2>&1 < /dev/null &
  VICTIM=$!
  sleep 8
  LINE="$("$PY" "$ROOT/hack/kill_streams.py" "$BASE_URL" "$MODEL_NAME" "$VICTIM")"
  echo "$LINE"
  if [ "$LIMIT" = 3 ]; then PEER_LINE="$LINE"; else PEER0_LINE="$LINE"; fi
  "$PEER_DIR/stop.sh" > /dev/null 2>&1 || true
done
{
  echo "# Kill test: 2 workers, 32 concurrent 400-token streams, kill -9 one worker after 1 s"
  echo
  echo "Measured $(date -u +%F) on this machine with \`hack/bench-kill.sh\` (same client for both)."
  echo
  echo "| system | result |"
  echo "|---|---|"
  echo "| dynamo-rs (migration limit 3, default) | \`$OURS\` |"
  echo "| NVIDIA Dynamo 1.6.1 (--migration-limit 3) | \`$PEER_LINE\` |"
  echo "| NVIDIA Dynamo 1.6.1 (default: no migration) | \`$PEER0_LINE\` |"
} > "$OUT"
cat "$OUT"
