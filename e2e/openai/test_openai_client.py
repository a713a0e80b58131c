"""The official `openai` Python client against a real `dynamo serve manifests/agg.yaml`.

Started once per module on a free port; stopped with SIGINT at the end, which must exit cleanly.
Run through `hack/test.sh` (it builds the binary and installs the client), or directly with
DYNAMO_BIN=target/debug/dynamo pytest e2e/openai.
"""

import json
import os
import signal
import subprocess
import time
import urllib.request

import openai
import pytest

from ports import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("DYNAMO_BIN", os.path.join(ROOT, "target", "debug", "dynamo"))
MANIFEST = os.path.join(ROOT, "manifests", "agg.yaml")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen(
        [BIN, "serve", MANIFEST, "--port", str(port), "--host", "127.0.0.1", "--speedup-ratio", "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, f"dynamo serve exited early:\n{proc.stdout.read()}"
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200 and json.load(r)["live_workers"] == 2:
                    break
        except OSError:
            pass
        assert time.time() < deadline, "dynamo serve did not become healthy in 60 s"
        time.sleep(0.2)
    yield base, proc
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"dynamo serve exited with {proc.returncode}:\n{out}"
    assert "dynamo serve: stopped" in out, out
    assert "Try it:" in out and "curl -s http://localhost:" in out, "prints a ready-to-paste curl line"


@pytest.fixture(scope="module")
def client(server):
    base, _ = server
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_returns_text_and_usage(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=10,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_streaming_chat_yields_deltas_then_usage(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count to ten."}],
        max_completion_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # The same text as the unary call with the same seed.
    unary = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count to ten."}],
        max_completion_tokens=12,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    streamed = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count to ten."}],
        max_completion_tokens=12,
        seed=5,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == unary.choices[0].message.content


def test_completions_unary_and_stream(client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, extra_body={"ignore_eos": True})
    assert r.object == "text_completion"
    assert r.choices[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    parts = list(client.completions.create(model="tiny", prompt="Once", max_tokens=6, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices)
    assert parts[-1].choices[0].finish_reason == "length"


def test_repeated_long_prompt_hits_the_prefix_cache(client):
    prompt = "The quick brown fox jumps over the lazy dog. " * 40
    # Two workers round-robin: send four times so some worker sees it twice.
    cached = [
        client.completions.create(model="tiny", prompt=prompt, max_tokens=2).usage.prompt_tokens_details.cached_tokens
        for _ in range(4)
    ]
    assert cached[0] == 0 and max(cached) >= 128, cached


def test_unknown_model_is_a_404_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "tiny" in str(e.value)


def test_n_greater_than_one_is_a_400_that_says_unsupported(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2)
    assert "not supported" in str(e.value)


def test_prompt_longer_than_context_is_a_400_with_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=10_000_000)
    assert "131072" in str(e.value) and "10000000" in str(e.value)
