#!/usr/bin/env python3
"""Offline bounds on the prefix-cache hit rate of a Mooncake trace, for a given KV capacity.

Replays the first N requests in arrival order, one at a time (no concurrency, no timing), at the
engine's block granularity: trace block `hash_ids[j]` covers tokens [512 j, 512 (j+1)), and a
64-token engine block is identified by the chain of trace blocks up to it plus its offset, so two
prompts share an engine block exactly when `dynamo bench` gives them the same tokens there. Only
full engine blocks are cached, and a request hits on its leading cached blocks, as in the mocker.

Reported, each as a hit rate and as a fraction of the oracle:
  oracle           one unlimited cache shared by all workers (what `dynamo bench` reports);
  shared LRU       one LRU cache of all workers' capacity together: the best any router can do
                   over LRU engines without partitioning tricks;
  sticky LRU       one LRU cache per worker, every follow-up sent to the worker holding the most
                   of its prefix and new prompts (no match beyond the first trace block) spread round-robin, with no load limits: the
                   best our router can do when load never pulls a request away from its cache;
  Belady           one shared cache with clairvoyant eviction (evict the block used furthest in
                   the future): the capacity is not what limits the hit rate when this is ~1.

Each request's output blocks are cached too (freed tail-first, as the mocker does), and they are
never reused, as in `dynamo bench` where outputs are not part of later prompts.

usage: hack/kv_cache_bounds.py [--limit 1000] [--workers 4] [--blocks 16384 32768] [--block-size 64]
"""
import argparse
import heapq
import json
from collections import OrderedDict
from pathlib import Path

TRACE_BLOCK = 512


def load(trace, limit, bs):
    ids, seqs, outs, total = {}, [], [], 0
    with open(trace) as f:
        for line, _ in zip(f, range(limit)):
            r = json.loads(line)
            length = r["input_length"]
            total += length
            full = length // bs
            blocks, node = [], -1
            for h in r["hash_ids"]:
                node = ids.setdefault((node, h), len(ids))
                for k in range(TRACE_BLOCK // bs):
                    if len(blocks) < full:
                        blocks.append((node, k))
            seqs.append(blocks)
            outs.append((length + r["output_length"]) // bs - full)
    return seqs, outs, total


def leading(blocks, cache):
    n = 0
    for b in blocks:
        if b not in cache:
            break
        n += 1
    return n


def oracle(seqs):
    seen, hit = set(), 0
    for blocks in seqs:
        hit += leading(blocks, seen)
        seen.update(blocks)
    return hit


def lru_insert(cache, blocks, out_ids, capacity):
    # Released tail-first: the prompt's head ends up most recent, output blocks go first.
    for b in reversed(list(blocks) + out_ids):
        cache[b] = None
        cache.move_to_end(b)
    while len(cache) > capacity:
        cache.popitem(last=False)


def lru(seqs, outs, capacity, bs, workers=1):
    caches = [OrderedDict() for _ in range(workers)]
    hit, next_out, rr = 0, 0, 0
    for blocks, n_out in zip(seqs, outs):
        matches = [leading(blocks, c) for c in caches]
        best = max(matches)
        # Every prompt starts with the same trace block (a system prompt, soon cached everywhere):
        # only a longer match marks a follow-up.
        if workers > 1 and best <= TRACE_BLOCK // bs:
            w, rr = rr % workers, rr + 1
        else:
            w = matches.index(best)
        hit += matches[w]
        out_ids = [("out", next_out + i) for i in range(n_out)]
        next_out += n_out
        lru_insert(caches[w], blocks, out_ids, capacity)
    return hit


def belady(seqs, capacity):
    never = len(seqs)
    next_use, later = [], {}
    for t in range(len(seqs) - 1, -1, -1):
        here = {}
        for b in seqs[t]:
            here[b] = later.get(b, never)
            later[b] = t
        next_use.append(here)
    next_use.reverse()
    cache, heap, hit = {}, [], 0
    for t, blocks in enumerate(seqs):
        hit += leading(blocks, cache)
        for b in blocks:
            cache[b] = next_use[t][b]
            heapq.heappush(heap, (-next_use[t][b], b))
        while len(cache) > capacity:  # output blocks are never reused: evicted first, not stored
            neg, b = heapq.heappop(heap)
            if cache.get(b) == -neg:
                del cache[b]
    return hit


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--trace", default=root.parent / "shared/traces/mooncake_conversation.jsonl")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--blocks", type=int, nargs="+", default=[16384, 32768], help="per worker")
    ap.add_argument("--block-size", type=int, default=64)
    a = ap.parse_args()
    seqs, outs, total = load(a.trace, a.limit, a.block_size)
    tok = a.block_size / total
    o = oracle(seqs)
    print(f"{a.limit} requests, {total} prompt tokens, block size {a.block_size}, {a.workers} workers")
    print(f"oracle (unlimited shared cache): {o * tok:.4f}")
    print("| blocks/worker | shared LRU | sticky LRU per worker | Belady (shared) |")
    print("|---|---|---|---|")
    for c in a.blocks:
        cells = [
            lru(seqs, outs, c * a.workers, a.block_size),
            lru(seqs, outs, c, a.block_size, a.workers),
            belady(seqs, c * a.workers),
        ]
        print(f"| {c} | " + " | ".join(f"{h * tok:.4f} ({h / o:.2f})" for h in cells) + " |")


if __name__ == "__main__":
    main()
