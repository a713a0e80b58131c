"""Side-by-side table of a dynamo-rs run and an NVIDIA Dynamo run made by hack/bench-*.sh.

usage: python3 hack/bench_compare.py overhead|trace OURS_DIR PEER_DIR OUT_PREFIX
Writes OUT_PREFIX.md (table with ratios) and OUT_PREFIX.json (the numbers), prints the table.
"""
import csv
import json
import os
import sys

kind, ours_dir, peer_dir, out = sys.argv[1:5]


def rss_mb(d):
    try:
        return round(int(open(os.path.join(d, "rss_kb")).read().strip()) / 1024, 1)
    except (OSError, ValueError):
        return None


def ratio(a, b):
    try:
        return round(float(a) / float(b), 2) if float(b) else None
    except (TypeError, ValueError):
        return None


def fmt(v):
    return "-" if v is None or v == "" else str(v)


rows, lines = [], []
if kind == "overhead":
    def load(d):
        p = os.path.join(d, "overhead.csv")
        if not os.path.exists(p):
            return {}
        return {(r["loadgen"], r["concurrency"]): r for r in csv.DictReader(open(p))}

    ours, peer = load(ours_dir), load(peer_dir)
    lines.append("| loadgen | conc | req/s ours | req/s Dynamo | ratio | p50 ms ours | p50 ms Dynamo | p99 ms ours | p99 ms Dynamo | p99 ratio | FE CPU ms/req ours | FE CPU ms/req Dynamo | CPU ratio |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(ours, key=lambda k: (k[0], int(k[1]))):
        o, p = ours[key], peer.get(key, {})
        row = {
            "loadgen": key[0], "concurrency": int(key[1]),
            "rps": [o.get("rps"), p.get("rps"), ratio(o.get("rps"), p.get("rps"))],
            "p50_ms": [o.get("lat_p50_ms"), p.get("lat_p50_ms")],
            "p99_ms": [o.get("lat_p99_ms"), p.get("lat_p99_ms"), ratio(o.get("lat_p99_ms"), p.get("lat_p99_ms"))],
            "fe_cpu_ms_per_req": [o.get("frontend_cpu_ms_per_req"), p.get("frontend_cpu_ms_per_req"),
                                  ratio(o.get("frontend_cpu_ms_per_req"), p.get("frontend_cpu_ms_per_req"))],
        }
        rows.append(row)
        lines.append("| " + " | ".join(fmt(x) for x in [
            row["loadgen"], row["concurrency"], *row["rps"], *row["p50_ms"], *row["p99_ms"], *row["fe_cpu_ms_per_req"]]) + " |")
else:
    def load(d):
        try:
            return json.load(open(os.path.join(d, "summary.json")))
        except OSError:
            return {}

    o, p = load(ours_dir), load(peer_dir)

    def get(s, *path):
        for k in path:
            s = s.get(k, {}) if isinstance(s, dict) else {}
        return None if s == {} else s

    metrics = [
        ("requests ok", ("client", "requests_completed")),
        ("req/s", ("client", "request_throughput_rps")),
        ("TTFT p50 ms", ("client", "ttft_ms", "p50")),
        ("TTFT p90 ms", ("client", "ttft_ms", "p90")),
        ("TTFT p99 ms", ("client", "ttft_ms", "p99")),
        ("ITL p50 ms", ("client", "itl_ms", "p50")),
        ("prefix-cache hit rate", ("server", "prefix_cache_hit_rate")),
        ("frontend CPU ms/request", ("cpu", "frontend_cpu_ms_per_request")),
        ("frontend cores", ("cpu", "frontend_cores")),
    ]
    lines.append("| metric | dynamo-rs | Dynamo 1.6.1 | ratio |")
    lines.append("|---|---|---|---|")
    for name, path in metrics:
        a, b = get(o, *path), get(p, *path)
        rows.append({"metric": name, "ours": a, "dynamo": b, "ratio": ratio(a, b)})
        lines.append(f"| {name} | {fmt(a)} | {fmt(b)} | {fmt(ratio(a, b))} |")

ro, rp = rss_mb(ours_dir), rss_mb(peer_dir)
lines.append("")
lines.append(f"Peak frontend RSS: dynamo-rs {fmt(ro)} MiB, Dynamo 1.6.1 {fmt(rp)} MiB (ratio {fmt(ratio(ro, rp))}).")
table = "\n".join(lines)
os.makedirs(os.path.dirname(out), exist_ok=True)
open(out + ".md", "w").write(table + "\n")
json.dump({"kind": kind, "ours": ours_dir, "peer": peer_dir, "rows": rows,
           "peak_frontend_rss_mib": {"ours": ro, "dynamo": rp}}, open(out + ".json", "w"), indent=1)
print(table)
