"""The official `openai` Python client against a real `dynamo serve manifests/disagg.yaml`: a
frontend, 2 prefill and 2 decode workers as processes, KV blocks moved between them for real.

Run through `hack/test.sh`, or directly with DYNAMO_BIN=target/debug/dynamo pytest e2e/openai.
"""

import concurrent.futures
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
MANIFEST = os.path.join(ROOT, "manifests", "disagg.yaml")


def health(base):
    with urllib.request.urlopen(base + "/health", timeout=2) as r:
        return json.load(r)


def metrics(base):
    with urllib.request.urlopen(base + "/metrics", timeout=2) as r:
        return r.read().decode()


def metric_sum(text, prefix):
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def children(pid):
    """(pid, argv) of the direct children of `pid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if ppid == pid:
            out.append((int(entry), argv))
    return out


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen(
        [BIN, "serve", MANIFEST, "--port", str(port), "--host", "127.0.0.1", "--speedup-ratio", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, f"dynamo serve exited early:\n{proc.stdout.read()}"
        try:
            if health(base)["live_workers"] == 4:
                break
        except OSError:
            pass
        assert time.time() < deadline, "dynamo serve did not become healthy in 120 s"
        time.sleep(0.2)
    yield base, proc
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, f"dynamo serve exited with {proc.returncode}:\n{out}"
    assert "dynamo serve: stopped" in out, out
    assert not [c for c in children(proc.pid)], "no worker outlives serve"


@pytest.fixture(scope="module")
def client(server):
    base, _ = server
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def long_prompt(i, words=1000):
    return " ".join(f"d{i}w{w} gamma delta" for w in range(words))


def test_prefill_workers_are_children_of_serve_with_role_prefill(server):
    _, proc = server
    kids = children(proc.pid)
    prefill = [argv for _, argv in kids if "--role" in argv and argv[argv.index("--role") + 1] == "prefill"]
    assert len(prefill) == 2, kids
    assert all("sidecar" in argv for argv in prefill)
    decode = [argv for _, argv in kids if "--role" in argv and argv[argv.index("--role") + 1] == "decode"]
    assert len(decode) == 2, kids


def test_a_prompt_of_a_few_thousand_tokens_is_disaggregated_by_default(server, client):
    base, _ = server
    before = metrics(base)
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": long_prompt(0)}],
        max_tokens=12,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.prompt_tokens > 3000
    assert r.usage.completion_tokens == 12
    after = metrics(base)
    moved = metric_sum(after, "dynamo_kv_transfer_bytes_total") - metric_sum(before, "dynamo_kv_transfer_bytes_total")
    blocks = metric_sum(after, "dynamo_kv_transfer_blocks_total") - metric_sum(before, "dynamo_kv_transfer_blocks_total")
    # Full 64-token blocks of an 8B-class Llama's KV: 8 MiB each.
    assert blocks >= r.usage.prompt_tokens // 64 - 1, after
    assert moved == blocks * 8 * 1024 * 1024
    assert 'dynamo_kv_transfer_bytes_total{transport="shm"}' in after


def test_streamed_disaggregated_output_matches_a_repeat_with_the_same_seed(client):
    def run():
        stream = client.completions.create(
            model="tiny", prompt=long_prompt(1, 900), max_tokens=20, seed=11, stream=True, extra_body={"ignore_eos": True}
        )
        return "".join(c.choices[0].text for c in stream if c.choices)

    first = run()
    assert first
    # The second time the decode worker holds the prompt: it is prefilled locally, same output.
    assert run() == first


def test_killing_a_prefill_worker_under_load_fails_no_request(server, client):
    base, proc = server
    prefill = [pid for pid, argv in children(proc.pid) if "--role" in argv and argv[argv.index("--role") + 1] == "prefill"]

    def one(i):
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": long_prompt(100 + i, 800)}],
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage = None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
        return usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        time.sleep(0.3)
        os.kill(prefill[0], signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]
    assert results == [30] * 12
    # serve restarts the killed worker.
    deadline = time.time() + 60
    while health(base)["live_workers"] < 4:
        assert time.time() < deadline, health(base)
        time.sleep(0.5)


def test_killing_a_decode_worker_mid_stream_fails_no_request(server, client):
    """A decode worker SIGKILLed while it streams: its requests migrate to the other decode worker
    (which computes or pulls what it lacks) and every stream ends with all its tokens."""
    base, proc = server
    decode = [pid for pid, argv in children(proc.pid) if "--role" in argv and argv[argv.index("--role") + 1] == "decode"]
    assert len(decode) == 2, children(proc.pid)
    migrated = metric_sum(metrics(base), "dynamo_frontend_model_migration_total")
    started = []

    def one(i):
        stream = client.completions.create(
            model="tiny",
            prompt=long_prompt(200 + i, 600),
            max_tokens=600,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage, text = None, 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                text += 1
                if text == 1:
                    started.append(i)
            if chunk.usage:
                usage = chunk.usage
        return usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        deadline = time.time() + 60
        while len(started) < 10:
            assert time.time() < deadline, f"only {len(started)} streams started"
            time.sleep(0.01)
        os.kill(decode[0], signal.SIGKILL)
        results = [f.result(timeout=180) for f in futures]
    assert results == [600] * 12
    assert metric_sum(metrics(base), "dynamo_frontend_model_migration_total") > migrated, "no stream was cut"
    deadline = time.time() + 60
    while health(base)["live_workers"] < 4:
        assert time.time() < deadline, health(base)
        time.sleep(0.5)
