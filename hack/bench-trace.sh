#!/usr/bin/env bash
# Long prompts: the Mooncake conversation trace (first N requests, ~12k-token prompts, ~340
# generated tokens each) replayed by aiperf at SPEEDUP x, against ours and NVIDIA Dynamo 1.6.1 in
# the same session. Reports frontend CPU-ms per request (tokenization dominates), TTFT, ITL, hit rate.
#
# usage: hack/bench-trace.sh [ROUTER_MODE=round-robin]
# env: N=1000 SPEEDUP=3 NUM_WORKERS=4 SKIP_PEER=0 (and the peer harness's bench_trace.sh settings)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/hack/bench-lib.sh"
MODE="${1:-round-robin}"
export N="${N:-1000}" SPEEDUP="${SPEEDUP:-3}" NUM_WORKERS="${NUM_WORKERS:-4}"
"$PEER_DIR/setup.sh" > /dev/null
build_release

OURS="dynamo-rs_trace_${MODE}_n${N}_x${SPEEDUP}"; PEERL="dynamo_trace_${MODE}_n${N}_x${SPEEDUP}"
trap 'stop_ours; kill ${RSSW:-} 2>/dev/null || true' EXIT

echo "== dynamo-rs ($MODE)"
start_ours "$MODE" "$NUM_WORKERS" "$SPEEDUP"
rss_watch "$FRONTEND_PID" "$RUN_DIR/rss_ours" & RSSW=$!
EXTERNAL=1 LABEL="$OURS" "$PEER_DIR/bench_trace.sh" "$MODE"
kill "$RSSW"; cp "$RUN_DIR/rss_ours" "$RESULTS/$OURS/rss_kb"
stop_ours

if [ "${SKIP_PEER:-0}" != 1 ]; then
  echo "== NVIDIA Dynamo 1.6.1 ($MODE)"
  # The harness reads FRONTEND_PID/ENGINE_PID before its own pid files: drop ours.
  unset FRONTEND_PID ENGINE_PID
  rm -f "$RUN_DIR/frontend.pid"
  rss_watch "$RUN_DIR/frontend.pid" "$RUN_DIR/rss_peer" & RSSW=$!
  LABEL="$PEERL" "$PEER_DIR/bench_trace.sh" "$MODE"
  kill "$RSSW"; cp "$RUN_DIR/rss_peer" "$RESULTS/$PEERL/rss_kb"
fi
python3 "$ROOT/hack/bench_compare.py" trace "$RESULTS/$OURS" "$RESULTS/$PEERL" "$ROOT/docs/results/trace_${MODE}"
