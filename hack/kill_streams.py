#!/usr/bin/env python3
"""32 concurrent streamed chat completions of 400 tokens; `kill -9` one worker process after a
second; report how many streams failed and how many came back short. Same client for ours and for
NVIDIA Dynamo 1.6.1 (hack/bench-kill.sh starts each).

usage: kill_streams.py BASE_URL MODEL VICTIM_PID [--streams 32] [--tokens 400] [--after 1.0]
prints one JSON line: {"streams", "failed", "short", "ok", "errors": [...]}
"""
import argparse, asyncio, json, os, signal, time

from openai import AsyncOpenAI


async def one(client, model, i, tokens):
    got = 0
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Tell me story number {i}."}],
            max_tokens=tokens, stream=True, seed=1000 + i, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got += 1
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return ("ok" if usage == tokens else "short", usage, None, time.time())
    except Exception as e:  # noqa: BLE001 - any failure counts
        return ("failed", usage, f"{type(e).__name__}: {e}"[:300], time.time())


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("base_url"); p.add_argument("model"); p.add_argument("victim", type=int)
    p.add_argument("--streams", type=int, default=32); p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--after", type=float, default=1.0)
    a = p.parse_args()
    client = AsyncOpenAI(base_url=a.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    tasks = [asyncio.create_task(one(client, a.model, i, a.tokens)) for i in range(a.streams)]
    await asyncio.sleep(a.after)
    killed_at = time.time()
    os.kill(a.victim, signal.SIGKILL)
    results = await asyncio.gather(*tasks)
    out = {
        "streams": a.streams,
        "failed": sum(r[0] == "failed" for r in results),
        "short": sum(r[0] == "short" for r in results),
        "ok": sum(r[0] == "ok" for r in results),
        "killed_after_s": a.after,
        # Streams still open when the worker was killed (the kill only tests what is in flight).
        "in_flight_at_kill": sum(r[3] > killed_at for r in results),
        "errors": sorted({r[2] for r in results if r[2]})[:5],
    }
    print(json.dumps(out))


asyncio.run(main())
