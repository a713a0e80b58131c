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
run_pair bench_trace.sh "$MODE" "$NUM_WORKERS" "$SPEEDUP" "$OURS" "$PEERL"
python3 "$ROOT/hack/bench_compare.py" trace "$RESULTS/$OURS" "$RESULTS/$PEERL" "$ROOT/docs/results/trace_${MODE}"
