#!/usr/bin/env bash
# The SLA planner against fixed fleets and Dynamo's throughput algorithm on the Azure conversation
# trace (../shared/traces/azure_conv_2023.csv, one hour), compressed $COMP times, the mocker at the
# same speedup, SLA from manifests/planner.yaml (TTFT and ITL in trace time). Runs, each a full
# replay (about 60/$COMP minutes):
#   fixed-<N>   `--planner off --workers N` for each N in $FIXED (maxReplicas, maxReplicas-1, the
#               mean-load size)
#   planner     our planner (algorithm: sla)
#   dynamo      the same manifest with `algorithm: dynamo`
# Then the ideal fleet's GPU-seconds (`dynamo ideal`) and one table: $OUT/summary.md.
#
# usage: hack/bench-planner.sh [LABEL...]      (default: every run)
# env:   COMP=6 FIXED="8 7 6" TRACE=... OUT=$DYNAMO_CACHE/bench/planner-<date> DYNAMO_BIN
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${DYNAMO_CACHE:-$HOME/.cache/dynamo-rs}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
COMP="${COMP:-6}" FIXED="${FIXED:-8 7 6}"
TRACE="${TRACE:-$ROOT/../shared/traces/azure_conv_2023.csv}"
MANIFEST="${MANIFEST:-$ROOT/manifests/planner.yaml}"
OUT="${OUT:-$CACHE/bench/planner-$(date +%Y%m%d-%H%M)}"
BIN="${DYNAMO_BIN:-$CARGO_TARGET_DIR/release/dynamo}"
PORT="${PORT:-8391}"
BASE="http://127.0.0.1:$PORT"
mkdir -p "$OUT"
[ -n "${DYNAMO_BIN:-}" ] || (cd "$ROOT" && cargo build --release --locked --bin dynamo)

# The SLA, in trace time, from the manifest.
TTFT="$(sed -n 's/^ *ttftMs: *\([0-9.]*\).*/\1/p' "$MANIFEST" | head -1)"
ITL="$(sed -n 's/^ *itlMs: *\([0-9.]*\).*/\1/p' "$MANIFEST" | head -1)"
sed 's/^  planner:$/  planner:\n    algorithm: dynamo/' "$MANIFEST" > "$OUT/planner-dynamo.yaml"

SERVE_PID=
stop() { [ -n "$SERVE_PID" ] && kill -INT "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null; SERVE_PID=; }
trap stop EXIT

run() { # LABEL MANIFEST [serve args...]
  local label="$1" manifest="$2"; shift 2
  echo "== $label ($(date +%H:%M:%S))"
  DYN_LOG=warn "$BIN" serve "$manifest" --host 127.0.0.1 --port "$PORT" --speedup-ratio "$COMP" "$@" \
    > "$OUT/$label.serve.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 1 300); do
    curl -sf -m 1 "$BASE/health" 2>/dev/null | grep -q '"live_workers":[1-9]' && break
    sleep 0.2
  done
  "$BIN" bench --url "$BASE" --model tiny --trace "$TRACE" --time-scale "$COMP" --endpoint completions \
    --sla-ttft-ms "$TTFT" --sla-itl-ms "$ITL" --window 180s --label "$label" --out "$OUT" | tee "$OUT/$label.txt"
  grep "planner:" "$OUT/$label.serve.log" > "$OUT/$label.decisions.txt" || true
  stop
}

LABELS=("$@")
sel() { [ ${#LABELS[@]} -eq 0 ] && return 0; local l; for l in "${LABELS[@]}"; do [ "$l" = "$1" ] && return 0; done; return 1; }

for n in $FIXED; do
  sel "fixed-$n" && run "fixed-$n" "$MANIFEST" --planner off --workers "$n"
done
sel planner && run planner "$MANIFEST"
sel dynamo && run dynamo "$OUT/planner-dynamo.yaml"

"$BIN" ideal "$MANIFEST" --trace "$TRACE" > "$OUT/ideal.txt"
python3 "$ROOT/hack/bench_planner_table.py" "$OUT" | tee "$OUT/summary.md"
