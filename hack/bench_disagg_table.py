"""Summary table of hack/bench-disagg.sh: TTFT and ITL percentiles of each run, ratios to agg.

usage: python3 hack/bench_disagg_table.py OUT_DIR
"""

import json
import os
import sys


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(p / 100 * len(xs) + 0.5) - 1))] if xs else 0.0


def main(out):
    print("| run | ok | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p90 ms | ITL p99 ms | ITL p90 / agg | ITL p99 / agg | TTFT p90 / agg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = None
    labels = ["agg", "disagg-always", "disagg-conditional", "disagg-prefill-load", "disagg-isl-or-load",
              "dynamo-agg", "dynamo-disagg"]
    for label in labels:
        path = os.path.join(out, label + ".json")
        if not os.path.exists(path):
            continue
        d = json.load(open(path))
        s = d["summary"]
        itl = [x for r in d["records"] if r["status"] == 200 for x in r["itl_ms"]]
        s["itl_p99_ms"] = pct(itl, 99)
        base = base or s
        r = lambda k: s[k] / base[k] if base[k] else float("nan")
        print(
            f"| {label} | {s['ok']}/{s['requests']} | {s['ttft_p50_ms']:.1f} | {s['ttft_p90_ms']:.1f} "
            f"| {s['itl_p50_ms']:.2f} | {s['itl_p90_ms']:.2f} | {s['itl_p99_ms']:.2f} "
            f"| {r('itl_p90_ms'):.2f} | {r('itl_p99_ms'):.2f} | {r('ttft_p90_ms'):.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
