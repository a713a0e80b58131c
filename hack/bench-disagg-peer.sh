#!/usr/bin/env bash
# NVIDIA Dynamo 1.6.1 (frontend + its mocker, ../shared/peer) on the workload of hack/bench-disagg.sh:
# 4 aggregated mocker workers, then 2 prefill + 2 decode (`--disaggregation-mode prefill|decode`, its
# frontend's prefill router), same blocks per worker and the same client (`dynamo bench`). Dynamo's
# mocker simulates the KV transfer (no bytes move), so compare it with our runs at GEOMETRY=tiny.
# Writes $OUT/dynamo-{agg,disagg}.{json,txt,png}.
#
# usage: OUT=... BLOCKS=2752 hack/bench-disagg-peer.sh   (after hack/bench-disagg.sh, same N/COMP/SPEEDUP)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && cd .. && pwd)"
CACHE="${DYNAMO_CACHE:-$HOME/.cache/dynamo-rs}"
N="${N:-200}" COMP="${COMP:-3}" SPEEDUP="${SPEEDUP:-3}" BLOCKS="${BLOCKS:-2752}"
OUT="${OUT:?set OUT to the directory of a hack/bench-disagg.sh run}"
TRACE="${TRACE:-$ROOT/../shared/traces/mooncake_conversation.jsonl}"
BIN="${DYNAMO_BIN:-${CARGO_TARGET_DIR:-$CACHE/target}/release/dynamo}"
PEER_DIR="${PEER_DIR:-$ROOT/../shared/peer}"
# shellcheck source=/dev/null
source "$PEER_DIR/env.sh"
"$PEER_DIR/setup.sh" > /dev/null
PY="$PEER/dyn/bin/python"
MOCK=(--model-path "$MODEL_DIR" --model-name "$MODEL_NAME" --discovery-backend file --speedup-ratio "$SPEEDUP"
      --num-gpu-blocks-override "$BLOCKS" --block-size 64)
trap '"$PEER_DIR/stop.sh" > /dev/null 2>&1 || true; [ -n "${PREFILL_PID:-}" ] && kill "$PREFILL_PID" 2>/dev/null || true' EXIT

bench() {
  "$BIN" bench --url "$BASE_URL" --model "$MODEL_NAME" --model-path "$MODEL_DIR" --trace "$TRACE" --limit "$N" \
    --time-scale "$COMP" --label "$1" --out "$OUT" --endpoint completions | tee "$OUT/$1.txt"
}

echo "== dynamo-agg"
[ -f "$OUT/dynamo-agg.json" ] && [ "${RERUN:-0}" != 1 ] && echo "(kept from an earlier run)" || {
MOCKER_ARGS="--num-gpu-blocks-override $BLOCKS --block-size 64" "$PEER_DIR/run_dynamo.sh" kv 4 "$SPEEDUP" > "$OUT/dynamo-agg.start.log"
bench dynamo-agg
"$PEER_DIR/stop.sh" > /dev/null
}

echo "== dynamo-disagg"
# run_dynamo.sh wipes the discovery store when it starts and waits until a request succeeds, which
# needs prefill workers: they start a few seconds after it, in their own process.
(sleep 5; exec setsid "$PY" -m dynamo.mocker "${MOCK[@]}" --num-workers 2 --disaggregation-mode prefill \
  > "$RUN_DIR/prefill.log" 2>&1 < /dev/null) &
PREFILL_PID=$!
MOCKER_ARGS="--num-gpu-blocks-override $BLOCKS --block-size 64 --disaggregation-mode decode" \
  "$PEER_DIR/run_dynamo.sh" kv 2 "$SPEEDUP" > "$OUT/dynamo-disagg.start.log"
bench dynamo-disagg
"$PEER_DIR/stop.sh" > /dev/null
kill "$PREFILL_PID" 2>/dev/null || true
PREFILL_PID=
