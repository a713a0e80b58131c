#!/usr/bin/env bash
# Figures for real vLLM engines behind dynamo-rs (docs/vllm.md), with `dynamo bench`:
#  1. added latency: one vLLM worker; the same synthetic chat workload straight to vLLM and through
#     our frontend + sidecar, interleaved (direct, ours, direct, ours, ...) at each concurrency;
#     TTFT and ITL p50 of each run, and the per-pair differences.
#  2. kv vs round-robin routing over 2 vLLM workers on a multi-turn workload sized for them.
#
# usage: hack/bench-vllm.sh        (after hack/vllm.sh; ~10 minutes)
# env: PAIRS=3 CONCURRENCIES="1 8" DYNAMO_BIN=path (default: the release build)
# output: $OUT (default $DYNAMO_CACHE/bench/vllm-<date>)/*.json, and a table on stdout
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export DYNAMO_CACHE="${DYNAMO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynamo-rs}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$DYNAMO_CACHE/target}"
BIN="${DYNAMO_BIN:-$CARGO_TARGET_DIR/release/dynamo}"
[ -n "${DYNAMO_BIN:-}" ] || cargo build --release --locked --bin dynamo
PAIRS="${PAIRS:-3}"; CONCURRENCIES="${CONCURRENCIES:-1 8}"
OUT="${OUT:-$DYNAMO_CACHE/bench/vllm-$(date +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
export DYN_VLLM_PYTHON="${DYN_VLLM_PYTHON:-$(hack/vllm.sh)}"

SERVE_PID=""
stop_serve() {
  [ -n "$SERVE_PID" ] || return 0
  kill -INT "$SERVE_PID" 2>/dev/null || true
  wait "$SERVE_PID" 2>/dev/null || true
  SERVE_PID=""
}
trap stop_serve EXIT

serve() { # log port args...
  local log=$1 port=$2; shift 2
  "$BIN" serve manifests/vllm-agg.yaml --port "$port" "$@" 2>"$log" &
  SERVE_PID=$!
  for _ in $(seq 600); do
    grep -q "ready in" "$log" && return 0
    kill -0 "$SERVE_PID" 2>/dev/null || { tail -20 "$log"; exit 1; }
    sleep 1
  done
  echo "serve did not become ready" >&2; exit 1
}

bench() { # label url args...
  local label=$1 url=$2; shift 2
  "$BIN" bench --url "$url" --model tiny --synthetic --label "$label" --out "$OUT" "$@" >/dev/null
}

# 1. Added latency, one worker.
if [ "${SKIP_LATENCY:-0}" != 1 ]; then
serve "$OUT/serve-1.log" 18300 --workers 1
ENGINE_PORT=$(sed -n "s/.*VllmWorker-0's engine: .* --port \([0-9]*\) .*/\1/p" "$OUT/serve-1.log" | head -1)
for c in $CONCURRENCIES; do
  n=$((c * 12))
  for r in $(seq "$PAIRS"); do
    for target in direct ours; do
      url="http://127.0.0.1:18300"; [ "$target" = direct ] && url="http://127.0.0.1:$ENGINE_PORT"
      bench "latency-$target-c$c-r$r" "$url" --requests "$n" --rate 1000 --concurrency-limit "$c" \
        --isl 256 --osl 32 --seed "$r" --endpoint chat
    done
  done
done
stop_serve
fi

# 2. kv vs round-robin, two workers, multi-turn conversations (each turn resends the history).
for mode in kv round-robin; do
  serve "$OUT/serve-$mode.log" 18300 --router-mode "$mode"
  # 25 conversations: with an even number, round-robin would put every turn of a conversation on
  # the same worker whenever the conversations advance in lockstep.
  bench "routing-$mode" http://127.0.0.1:18300 --requests 100 --rate 3 --turns 4 --isl 384 --osl 16 \
    --seed 7 --endpoint chat --concurrency-limit 16
  stop_serve
done

[ "${SKIP_LATENCY:-0}" = 1 ] && CONCURRENCIES=""
python3 - "$OUT" "$PAIRS" "$CONCURRENCIES" <<'PY'
import json, statistics, sys, os
out, pairs, concs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
def load(label):
    return json.load(open(os.path.join(out, f"{label}.json")))
def p50(xs):
    return statistics.median(xs) if xs else float("nan")
print("## Added latency (one vLLM worker; p50 per run, ms)\n")
print("| c | metric | direct (median of runs) | through dynamo-rs | added: median of pair differences | pair differences |")
print("|---|---|---|---|---|---|")
for c in concs:
    for metric in ("ttft", "itl"):
        d, o, diffs = [], [], []
        for r in range(1, pairs + 1):
            vals = []
            for t in ("direct", "ours"):
                recs = [x for x in load(f"latency-{t}-c{c}-r{r}")["records"] if x.get("error") is None]
                if metric == "ttft":
                    vals.append(p50([x["ttft_ms"] for x in recs if x["ttft_ms"] is not None]))
                else:
                    vals.append(p50([i for x in recs for i in x["itl_ms"]]))
            d.append(vals[0]); o.append(vals[1]); diffs.append(vals[1] - vals[0])
        print(f"| {c} | {metric} p50 | {p50(d):.2f} | {p50(o):.2f} | {p50(diffs):+.2f} | {', '.join(f'{x:+.2f}' for x in diffs)} |")
print("\n## kv vs round-robin (2 vLLM workers, 25 conversations of 4 turns)\n")
print("| router | hit rate | hit of oracle | TTFT p50 ms | TTFT p90 ms | failed |")
print("|---|---|---|---|---|---|")
for mode in ("kv", "round-robin"):
    rep = load(f"routing-{mode}")
    s = rep["summary"]
    ttfts = sorted(x["ttft_ms"] for x in rep["records"] if x["ttft_ms"] is not None)
    p90 = ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else float("nan")
    print(f"| {mode} | {s['hit_rate']:.3f} | {s['hit_of_oracle']:.3f} | {p50(ttfts):.1f} | {p90:.1f} | {s['failed']} |")
PY
