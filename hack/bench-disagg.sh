#!/usr/bin/env bash
# Aggregated vs disaggregated serving on the Mooncake conversation trace, same total number of
# workers: `dynamo serve` with PREFILL + DECODE aggregated workers, then PREFILL prefill + DECODE
# decode workers (default 2 + 2) with every prompt disaggregated (--disagg-policy always), then
# with the conditional policy (isl-bounding); POLICIES adds runs of other conditional policies
# (disagg-<policy>), e.g. POLICIES="isl-bounding prefill-load isl-or-load".
# Prompts are sent as token ids (`dynamo bench --endpoint completions`). Disaggregated workers hold
# real KV bytes of $GEOMETRY, moved over shared memory; aggregated workers get the same block count.
# Writes $OUT/<label>.{json,txt,png} and $OUT/summary.md.
#
# usage: hack/bench-disagg.sh
# env:   PREFILL=2 DECODE=2 N=300 COMP=3 (trace time compression) SPEEDUP=3 GEOMETRY=qwen-0.5b MEMORY=2GiB
#        OUT=$DYNAMO_CACHE/bench/disagg-<date> DYNAMO_BIN (default: this checkout's release build)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${DYNAMO_CACHE:-$HOME/.cache/dynamo-rs}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
PREFILL="${PREFILL:-2}" DECODE="${DECODE:-2}" WORKERS=$((PREFILL + DECODE))
N="${N:-300}" COMP="${COMP:-3}" SPEEDUP="${SPEEDUP:-3}"
GEOMETRY="${GEOMETRY:-qwen-0.5b}" MEMORY="${MEMORY:-2GiB}"
OUT="${OUT:-$CACHE/bench/disagg-$(date +%Y%m%d-%H%M)}"
TRACE="${TRACE:-$ROOT/../shared/traces/mooncake_conversation.jsonl}"
BIN="${DYNAMO_BIN:-$CARGO_TARGET_DIR/release/dynamo}"
PORT="${PORT:-8390}"
BASE="http://127.0.0.1:$PORT"
mkdir -p "$OUT"
[ -n "${DYNAMO_BIN:-}" ] || (cd "$ROOT" && cargo build --release --locked --bin dynamo)

# The disaggregated manifest with the benchmark's geometry, memory and policy.
manifest() { # POLICY
  sed -e "s/\"--disagg-policy\", \"[a-z-]*\"/\"--disagg-policy\", \"$1\"/" \
      -e "s/\"--kv-geometry\", \"[a-z0-9.-]*\"/\"--kv-geometry\", \"$GEOMETRY\"/" \
      -e "s/\"--kv-memory\", \"[0-9A-Za-z]*\"/\"--kv-memory\", \"$MEMORY\"/" \
      -e "/^    Prefill:/,/replicas:/ s/replicas: [0-9]*/replicas: $PREFILL/" \
      -e "/^    Decode:/,/replicas:/ s/replicas: [0-9]*/replicas: $DECODE/" \
      "$ROOT/manifests/disagg.yaml" > "$OUT/disagg-$1.yaml"
  echo "$OUT/disagg-$1.yaml"
}
# Blocks a disaggregated worker gets; the aggregated ones get as many.
BLOCKS="$(python3 - "$GEOMETRY" "$MEMORY" <<'PY'
import sys
presets = {"llama-8b": (32, 8, 128), "llama-70b": (80, 8, 128), "llama-1b": (16, 8, 64), "qwen-0.5b": (24, 2, 64), "tiny": (2, 2, 32)}
l, h, d = presets[sys.argv[1]]
units = {"GiB": 1 << 30, "MiB": 1 << 20}
mem = next(int(sys.argv[2][: -len(u)]) * m for u, m in units.items() if sys.argv[2].endswith(u))
print(mem // (2 * l * h * d * 2 * 64))
PY
)"

SERVE_PID=
stop() { [ -n "$SERVE_PID" ] && kill -INT "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null; SERVE_PID=; }
trap stop EXIT

run() { # LABEL MANIFEST WORKERS [serve args...]
  local label="$1" manifest="$2" workers="$3"; shift 3
  echo "== $label"
  DYN_LOG=warn DYN_NUM_GPU_BLOCKS="$BLOCKS" "$BIN" serve "$manifest" --host 127.0.0.1 --port "$PORT" \
    --speedup-ratio "$SPEEDUP" "$@" > "$OUT/$label.serve.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 1 300); do
    curl -sf -m 1 "$BASE/health" 2>/dev/null | grep -q "\"live_workers\":$workers" && break
    sleep 0.2
  done
  "$BIN" bench --url "$BASE" --model tiny --trace "$TRACE" --limit "$N" --time-scale "$COMP" \
    --label "$label" --out "$OUT" --endpoint completions | tee "$OUT/$label.txt"
  curl -sf -m 5 "$BASE/metrics" | grep -E '^dynamo_(kv_transfer|frontend_disagg|frontend_prefill)' > "$OUT/$label.metrics.txt" || true
  stop
}

run agg "$ROOT/manifests/agg.yaml" "$WORKERS" --workers "$WORKERS"
run disagg-always "$(manifest always)" "$WORKERS"
for policy in ${POLICIES:-isl-bounding}; do
  label="disagg-$policy"; [ "$policy" = isl-bounding ] && label=disagg-conditional
  run "$label" "$(manifest "$policy")" "$WORKERS"
done

python3 "$ROOT/hack/bench_disagg_table.py" "$OUT" | tee "$OUT/summary.md"
