#!/usr/bin/env python3
"""Markdown table of `dynamo bench` result files (hack/bench-kv.sh), with ratios of each run's TTFT
to the round-robin run of the same engine at the same point, and to Dynamo 1.6.1's kv run."""
import json
import re
import sys

runs = []
for path in sys.argv[1:]:
    with open(path) as f:
        r = json.load(f)
    m = re.match(r"(.+?)_(kv|round-robin|random|least-loaded|power-of-two)_x([\d.]+)_b(\d+)", r["label"])
    engine, mode, point, blocks = m.groups() if m else (r["label"], "?", "?", "?")
    runs.append(dict(engine=engine, mode=mode, point=point, blocks=blocks, s=r["summary"]))

def find(engine, mode, point, blocks):
    key = (engine, mode, point, blocks)
    return next((x for x in runs if (x["engine"], x["mode"], x["point"], x["blocks"]) == key), None)

print("| engine | router | trace × | blocks/worker | ok | req/s | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | "
      "hit rate | of oracle | TTFT p50 / p90 vs own round-robin | TTFT p50 / p90 vs Dynamo kv |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for x in runs:
    s = x["s"]
    rr = find(x["engine"], "round-robin", x["point"], x["blocks"])
    dk = find("dynamo-1.6.1", "kv", x["point"], x["blocks"])
    def ratio(o):
        if not o or not o["s"]["ttft_p50_ms"]:
            return "-"
        return f'{s["ttft_p50_ms"] / o["s"]["ttft_p50_ms"]:.2f} / {s["ttft_p90_ms"] / o["s"]["ttft_p90_ms"]:.2f}'
    print(f'| {x["engine"]} | {x["mode"]} | {x["point"]} | {x["blocks"]} | {s["ok"]}/{s["requests"]} | '
          f'{s["req_per_s"]:.2f} | {s["ttft_p50_ms"]:.0f} | {s["ttft_p90_ms"]:.0f} | {s["ttft_p99_ms"]:.0f} | '
          f'{s["itl_p50_ms"]:.2f} | {s["hit_rate"]:.3f} | {s["hit_of_oracle"]:.2f} (oracle {s["oracle_hit_rate"]:.3f}) | '
          f'{ratio(rr)} | {ratio(dk)} |')
