#!/usr/bin/env python3
"""The official `openai` client against a graph's frontend, for e2e/realnode/run.sh.

  client.py first-token URL --timeout 300     retry until a streamed token arrives; print seconds
  client.py check URL                         chat, streamed chat, cached_tokens > 0 on a repeat
  client.py load URL --concurrency 16 --stop-file F --out R.json
                                              streams without pause until F exists; R.json counts
                                              ok and failed requests (with the first errors)

The client never retries (max_retries=0): a request that fails counts as failed, so the e2e sees
every error a user would.
"""

import argparse
import asyncio
import json
import os
import sys
import time

import openai

MODEL = "tiny"


def client(url, timeout=60.0):
    return openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=timeout)


def prompt(i, words=120, fresh=False):
    # Long enough to fill several KV blocks, distinct per request family; each worker of a load
    # comes back to its prompts after 97 requests. `fresh`: no two requests share a first block.
    head = f"request {i}: " if fresh else f"request family {i % 8}: "
    return head + " ".join(f"w{(i * 7 + j) % 97}" for j in range(words))


async def stream_once(c, text, max_tokens):
    """Streams one chat completion; returns (tokens, finish_reason) or raises."""
    tokens, chunks, finish = 0, 0, None
    stream = await c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        stream=True,
        # Every stream runs to max_tokens (an engine may otherwise stop at once on EOS), so a
        # stream that moved between workers must still deliver all of them.
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                tokens += 1
            if choice.finish_reason:
                finish = choice.finish_reason
    if finish is None:
        raise RuntimeError(f"stream ended without a finish_reason after {tokens} chunks")
    if finish != "length" or tokens == 0:
        raise RuntimeError(f"stream ended early: {chunks} chunks, {tokens} with content, finish_reason {finish}")
    return tokens, finish


async def first_token(url, timeout):
    t0 = time.monotonic()
    c = client(url, timeout=10)
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            stream = await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                    print(f"{time.monotonic() - t0:.1f}")
                    return 0
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        await asyncio.sleep(0.5)
    print(f"no token within {timeout}s; last error: {last!r}", file=sys.stderr)
    return 1


async def check(url):
    c = client(url)
    r = await c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
    )
    assert r.choices[0].message.content, f"empty completion: {r}"
    assert r.usage.completion_tokens > 0, r.usage
    tokens, finish = await stream_once(c, "Count to five", 8)
    text = prompt(12345, words=200)
    cached = 0
    for _ in range(3):
        r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=2)
        details = r.usage.prompt_tokens_details
        cached = details.cached_tokens if details else 0
    assert cached > 0, f"a repeated prompt reported cached_tokens={cached}"
    print(json.dumps({"chat": True, "stream_tokens": tokens, "cached_tokens": cached}))
    return 0


async def load(url, concurrency, stop_file, out, max_tokens, words=120, fresh=False):
    c = client(url)
    ok = failed = 0
    errors = []
    t0 = time.monotonic()

    async def worker(w):
        nonlocal ok, failed
        i = w
        while not os.path.exists(stop_file):
            try:
                await stream_once(c, prompt(i, words, fresh), max_tokens)
                ok += 1
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                failed += 1
                if len(errors) < 20:
                    errors.append(f"{time.monotonic() - t0:.1f}s: {type(e).__name__}: {e}")
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    result = {"ok": ok, "failed": failed, "errors": errors, "seconds": round(time.monotonic() - t0, 1)}
    with open(out, "w") as f:
        json.dump(result, f)
    print(json.dumps(result))
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("first-token")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=300)
    p = sub.add_parser("check")
    p.add_argument("url")
    p = sub.add_parser("load")
    p.add_argument("url")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--words", type=int, default=120, help="prompt length in words (about 2.5 tokens each)")
    p.add_argument("--fresh", action="store_true", help="every prompt new to every worker's cache")
    a = ap.parse_args()
    if a.cmd == "first-token":
        return asyncio.run(first_token(a.url, a.timeout))
    if a.cmd == "check":
        return asyncio.run(check(a.url))
    return asyncio.run(load(a.url, a.concurrency, a.stop_file, a.out, a.max_tokens, a.words, a.fresh))


if __name__ == "__main__":
    sys.exit(main())
