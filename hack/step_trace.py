#!/usr/bin/env python3
"""Writes an Azure-format trace (TIMESTAMP,ContextTokens,GeneratedTokens) whose load steps up:
Poisson arrivals at RATE req/s for BEFORE seconds, then at FACTOR x RATE for AFTER seconds, with
prompt and output lengths drawn from the Azure conversation trace (seeded, so runs repeat).

usage: hack/step_trace.py OUT.csv [--rate 1.5] [--factor 4] [--before 600] [--after 600]
"""
import argparse
import csv
import datetime
import os
import random

here = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--rate", type=float, default=1.5)
p.add_argument("--factor", type=float, default=4.0)
p.add_argument("--before", type=float, default=600.0)
p.add_argument("--after", type=float, default=600.0)
p.add_argument("--source", default=os.path.join(here, "../../shared/traces/azure_conv_2023.csv"))
p.add_argument("--seed", type=int, default=1)
a = p.parse_args()

with open(a.source) as f:
    rows = [(int(r[1]), int(r[2])) for r in list(csv.reader(f))[1:]]
rng = random.Random(a.seed)
t0 = datetime.datetime(2023, 11, 16, 18, 0, 0)
t, out = 0.0, []
while t < a.before + a.after:
    rate = a.rate if t < a.before else a.rate * a.factor
    t += rng.expovariate(rate)
    isl, osl = rows[rng.randrange(len(rows))]
    stamp = (t0 + datetime.timedelta(seconds=t)).strftime("%Y-%m-%d %H:%M:%S.%f") + "0"
    out.append((stamp, isl, osl))
with open(a.out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
    w.writerows(out)
print(f"wrote {a.out}: {len(out)} requests, {a.rate} req/s for {a.before:.0f} s then {a.rate * a.factor} req/s for {a.after:.0f} s")
