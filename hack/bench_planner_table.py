#!/usr/bin/env python3
"""Summary table of hack/bench-planner.sh: SLA attainment, GPU-seconds and scaling actions per run,
GPU-seconds against the largest fixed fleet and against the ideal fleet (`dynamo ideal`)."""
import glob
import json
import os
import sys

out = sys.argv[1]
runs = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    with open(path) as f:
        r = json.load(f)
    if "summary" in r:
        runs[r["label"]] = r
ideal = {}
ideal_path = os.path.join(out, "ideal.txt")
if os.path.exists(ideal_path):
    for line in open(ideal_path):
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            ideal[parts[0]] = float(parts[1])

fixed = sorted((k for k in runs if k.startswith("fixed-")), key=lambda k: -int(k.split("-")[1]))
order = fixed + [k for k in ("planner", "dynamo") if k in runs] + sorted(
    k for k in runs if k not in fixed and k not in ("planner", "dynamo"))
peak = runs[fixed[0]]["summary"]["gpu_seconds"] if fixed else None
ideal_gs = ideal.get("ideal_gpu_seconds")

print("| run | SLA attainment | TTFT met | ITL met | failed | GPU-seconds | / fixed-max | / ideal | scaling actions |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for k in order:
    s = runs[k]["summary"]
    gs = s.get("gpu_seconds") or 0.0
    ratio = lambda base: f"{gs / base:.3f}" if base else "-"
    print(f"| {k} | {s.get('sla_attainment', 0):.4f} | {s.get('sla_ttft_attainment', 0):.4f} | "
          f"{s.get('sla_itl_attainment', 0):.4f} | {s['failed']} | {gs:.0f} | {ratio(peak)} | "
          f"{ratio(ideal_gs)} | {s.get('scaling_actions', 0)} |")
if ideal_gs:
    print(f"| ideal (profile) | - | - | - | - | {ideal_gs:.0f} | "
          f"{(ideal_gs / peak) if peak else float('nan'):.3f} | 1.000 | - |")
