#!/usr/bin/env bash
# Frontend + router overhead, ours vs NVIDIA Dynamo 1.6.1, same client (the peer harness's wrk
# scripts), same machine, same session: engine ~instant (speedup 100000), ~128-token prompts,
# 16 generated tokens, closed loop at each concurrency, streamed (wrk) and not (wrk-nostream).
#
# usage: hack/bench-overhead.sh [ROUTER_MODE=round-robin]
# env: CONCURRENCIES="1 8 32 128" DURATION=10 LOADGENS="wrk wrk-nostream" SKIP_PEER=0
#      DYNAMO_BIN=path (another build, e.g. the commit before a refactor) LABEL_SUFFIX=_before
# output: $RESULTS/{dynamo-rs,dynamo}_overhead_<mode>/overhead.csv (+ rss_kb), and a comparison
#         table in docs/results/overhead_<mode>.md + .json
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/hack/bench-lib.sh"
MODE="${1:-round-robin}"
export CONCURRENCIES="${CONCURRENCIES:-1 8 32 128}" DURATION="${DURATION:-10}" LOADGENS="${LOADGENS:-wrk wrk-nostream}"
"$PEER_DIR/setup.sh" > /dev/null
build_release

OURS="dynamo-rs_overhead_${MODE}${LABEL_SUFFIX:-}"; PEERL="dynamo_overhead_${MODE}"
run_pair bench_overhead.sh "$MODE" 4 100000 "$OURS" "$PEERL"
if [ "${SKIP_PEER:-0}" != 1 ]; then
  python3 "$ROOT/hack/bench_compare.py" overhead "$RESULTS/$OURS" "$RESULTS/$PEERL" "$ROOT/docs/results/overhead_${MODE}"
else
  cat "$RESULTS/$OURS/overhead.csv"
fi
