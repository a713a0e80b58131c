#!/usr/bin/env bash
# KV-aware routing on a real trace: `dynamo bench` replays (prompts as token ids on /v1/completions, so
# shared prefixes are exact) the first N requests of the Mooncake
# conversation trace against `dynamo serve` with each router mode, then against NVIDIA Dynamo 1.6.1
# (frontend + mocker, ../shared/peer) with the same client, the same tokenizer and the same engine
# settings, in the same session. Writes docs/results/kv/<label>.{json,png,txt}, our frontend's router
# counters (<label>.router.txt, kv mode) and a summary table.
#
# usage: hack/bench-kv.sh
# env:   N=1000 WORKERS=4 SPEEDUP=3 POINTS="3 9" (trace time compression per point)
#        MODES="kv round-robin random" PEER_MODES="kv round-robin" (empty: skip Dynamo)
#        BLOCKS=16384 (KV blocks per worker, both engines) BLOCK_SIZE=64 OUT=docs/results/kv
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/hack/bench-lib.sh"
N="${N:-1000}" WORKERS="${WORKERS:-4}" SPEEDUP="${SPEEDUP:-3}" POINTS="${POINTS:-3 9}"
MODES="${MODES-kv round-robin random}" PEER_MODES="${PEER_MODES-kv round-robin}"
BLOCKS="${BLOCKS:-16384}" BLOCK_SIZE="${BLOCK_SIZE:-64}"
OUT="${OUT:-$ROOT/docs/results/kv}"
TRACE="${TRACE:-$ROOT/../shared/traces/mooncake_conversation.jsonl}"
mkdir -p "$OUT" "$RUN_DIR"
"$PEER_DIR/setup.sh" > /dev/null
build_release

export DYN_NUM_GPU_BLOCKS="$BLOCKS" DYN_BLOCK_SIZE="$BLOCK_SIZE"
trap 'stop_ours; "$PEER_DIR/stop.sh" >/dev/null 2>&1 || true' EXIT

bench() { # LABEL: replay against $BASE_URL
  "${NICE[@]}" "$BIN" bench --url "$BASE_URL" --model "$MODEL_NAME" --model-path "$MODEL_DIR" \
    --trace "$TRACE" --limit "$N" --time-scale "$comp" --label "$1" --out "$OUT" --endpoint completions \
    | tee "$OUT/$1.txt"
}

labels=()
for comp in $POINTS; do
  for mode in $MODES; do
    label="dynamo-rs_${mode}_x${comp}_b${BLOCKS}"
    echo "== $label"
    start_ours "$mode" "$WORKERS" "$SPEEDUP"
    bench "$label"
    # The router's own counters (predicted overlap, best candidate's overlap, busy skips).
    curl -sf -m 5 "$BASE_URL/metrics" | grep '^dynamo_router_' > "$OUT/$label.router.txt" || true
    stop_ours
    labels+=("$OUT/$label.json")
  done
  for mode in $PEER_MODES; do
    label="dynamo-1.6.1_${mode}_x${comp}_b${BLOCKS}"
    echo "== $label"
    MOCKER_ARGS="--num-gpu-blocks-override $BLOCKS --block-size $BLOCK_SIZE" \
      "$PEER_DIR/run_dynamo.sh" "$mode" "$WORKERS" "$SPEEDUP" > "$RUN_DIR/peer-start.log"
    bench "$label"
    "$PEER_DIR/stop.sh" > /dev/null
    labels+=("$OUT/$label.json")
  done
done
python3 "$ROOT/hack/bench_kv_table.py" "${labels[@]}" | tee "$OUT/summary.md"
