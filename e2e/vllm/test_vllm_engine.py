"""Real vLLM engines (vLLM's CPU build, installed by hack/vllm.sh) behind the sidecar, through our
frontend, with the official openai client.

Two groups, each with its own engines (a vLLM engine holds ~4 GB, so at most two run at once):
- `dynamo serve manifests/vllm-agg.yaml` (frontend + 2 vLLM workers): chat, completions, streaming,
  cached_tokens, KV routing judged by vLLM's own counters, and an engine killed mid-stream.
- one vLLM engine started by hand with a tiny KV cache, a sidecar started after it and restarted
  while it serves, and a frontend: the sidecar catches up from the replay socket; stored, removed
  and cleared events reach the router's index; a replay buffer that no longer reaches back marks
  the worker's cache unknown until it is cleared.

DYNAMO_VLLM_PYTHON (default: what hack/vllm.sh prints) is the Python with vLLM.
"""

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request

import openai
import pytest

from ports import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("DYNAMO_BIN", os.path.join(ROOT, "target", "debug", "dynamo"))
CACHE = os.environ.get("DYNAMO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dynamo-rs"))
PYTHON = os.environ.get("DYN_VLLM_PYTHON", os.path.join(CACHE, "vllm", "current", "bin", "python"))
MODEL = os.path.join(CACHE, "vllm", "models", "tiny")

if not os.path.exists(PYTHON):
    pytest.fail(f"vLLM is not installed at {PYTHON}: run hack/vllm.sh", pytrace=False)

# A prompt of a few 32-token blocks, and others that share its prefix.
LONG = " ".join(f"word{i}" for i in range(120))


def get(url, timeout=5):
    return urllib.request.urlopen(url, timeout=timeout).read().decode()


def metric(url, name, labels=""):
    """Sum of every series of `name` (optionally only those whose labels contain `labels`)."""
    total, seen = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", get(url + "/metrics"), re.M):
        if labels in (m.group(1) or ""):
            total += float(m.group(2))
            seen = True
    return total if seen else None


def wait_until(fn, what, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def group_alive(pgid):
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).returncode == 0


# === dynamo serve manifests/vllm-agg.yaml ===


class Serve:
    def __init__(self):
        self.port = free_port()
        self.lines = []
        env = dict(os.environ, DYN_VLLM_PYTHON=PYTHON)
        self.proc = subprocess.Popen(
            [BIN, "serve", os.path.join(ROOT, "manifests", "vllm-agg.yaml"), "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if "ready in" in line:
                self.ready.set()

    def engines(self):
        """Worker name -> (engine HTTP port, engine pid), from serve's own lines (the latest start)."""
        ports, pids = {}, {}
        for line in self.lines:
            m = re.match(r"dynamo serve: (\S+)'s engine: .* --port (\d+)", line)
            if m:
                ports[m.group(1)] = int(m.group(2))
            m = re.match(r"dynamo serve: (\S+)'s engine (?:started|restarted) \(pid (\d+)", line)
            if m:
                pids[m.group(1)] = int(m.group(2))
        return {n: (ports[n], pids.get(n)) for n in ports}

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def serve():
    s = Serve()
    try:
        assert s.ready.wait(600), "dynamo serve did not become ready:\n" + "".join(s.lines[-40:])
        yield s
    finally:
        pids = [pid for _, pid in s.engines().values() if pid]
        s.stop()
        # Every engine's process group (EngineCore included) is gone with serve.
        leftover = [p for p in pids if group_alive(p)]
        for p in leftover:
            os.killpg(p, signal.SIGKILL)
        assert not leftover, f"engine process groups outlived dynamo serve: {leftover}"


@pytest.fixture(scope="module")
def client(serve):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{serve.port}/v1", api_key="none", max_retries=0)


def engine_counter(serve, metric_name):
    return {w: metric(f"http://127.0.0.1:{port}", metric_name) for w, (port, _) in serve.engines().items()}


def test_each_engine_is_a_vllm_process_serve_started(serve):
    engines = serve.engines()
    assert sorted(engines) == ["VllmWorker-0", "VllmWorker-1"]
    for name, (port, pid) in engines.items():
        cmdline = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
        assert "vllm.entrypoints" in cmdline, cmdline
        assert get(f"http://127.0.0.1:{port}/health") == ""
    binds = [l for l in serve.lines if "VLLM_CPU_OMP_THREADS_BIND=" in l]
    assert len({re.search(r"THREADS_BIND=(\S+)", l).group(1) for l in binds}) == min(2, os.cpu_count()), binds


def test_chat_completions_and_streaming_are_served_by_vllm(serve, client):
    before = sum(engine_counter(serve, "vllm:prompt_tokens_total").values())
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage.completion_tokens >= 1
    # vLLM's own counter rose by exactly the prompt our frontend tokenized.
    wait_until(lambda: sum(engine_counter(serve, "vllm:prompt_tokens_total").values())
               == before + chat.usage.prompt_tokens, "vLLM's prompt_tokens_total to count the prompt")

    comp = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6,
                                      extra_body={"ignore_eos": True})
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 6

    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Stream please"}], max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None) >= 2
    assert chunks[-1].usage.completion_tokens == 12


def test_greedy_output_is_the_engines_own(serve, client):
    """The same greedy request straight to a vLLM engine and through us gives the same text."""
    port, _ = next(iter(serve.engines().values()))
    direct = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0,
                         "ignore_eos": True}).encode(),
        headers={"Content-Type": "application/json"}), timeout=30).read())
    ours = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert ours.choices[0].text == direct["choices"][0]["text"]


def test_a_repeated_prompt_reports_cached_tokens(client):
    msgs = [{"role": "user", "content": "cache me " + LONG}]
    first = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
    second = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
    assert first.usage.prompt_tokens > 64
    assert second.usage.prompt_tokens_details.cached_tokens >= 64, second.usage


def test_the_kv_router_sends_a_shared_prefix_to_the_worker_whose_vllm_events_hold_it(serve, client):
    prefix = "route me " + LONG
    client.completions.create(model="tiny", prompt=prefix, max_tokens=2)
    before_prompts = engine_counter(serve, "vllm:prompt_tokens_total")
    before_hits = engine_counter(serve, "vllm:prefix_cache_hits_total")
    for i in range(6):
        client.completions.create(model="tiny", prompt=f"{prefix} and then {i}", max_tokens=2)
    time.sleep(1.0)  # one metrics poll
    after_prompts = engine_counter(serve, "vllm:prompt_tokens_total")
    after_hits = engine_counter(serve, "vllm:prefix_cache_hits_total")
    gained = {w: after_hits[w] - before_hits[w] for w in after_hits}
    served = {w: after_prompts[w] - before_prompts[w] for w in after_prompts}
    best = max(gained, key=gained.get)
    # Every follow-up went to the worker holding the prefix: all its prompt tokens there, and the
    # shared blocks (3 of 32 tokens at least per request) hit its cache each time.
    assert served[best] > 0 and all(v == 0 for w, v in served.items() if w != best), served
    assert gained[best] >= 6 * 96, gained


def test_killing_an_engine_mid_stream_moves_the_request_and_the_client_sees_no_error(serve, client):
    engines = serve.engines()
    stream = client.completions.create(model="tiny", prompt="a long story " + LONG[:200], max_tokens=1500,
                                       stream=True, temperature=0, extra_body={"ignore_eos": True})
    tokens = 0
    killed = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            tokens += 1
        if killed is None and tokens == 20:
            # vLLM updates its gauges when it records a step's stats, not as a request starts: ask
            # again for a moment (the engine goes on generating meanwhile) until one shows it.
            deadline = time.time() + 5
            while True:
                running = {w: metric(f"http://127.0.0.1:{p}", "vllm:num_requests_running")
                           for w, (p, _) in engines.items()}
                victim = max(running, key=running.get)
                if running[victim] == 1 or time.time() > deadline:
                    break
                time.sleep(0.05)
            assert running[victim] == 1, running
            killed = engines[victim][1]
            os.killpg(killed, signal.SIGKILL)
    assert killed is not None
    # Every token arrived, as one unbroken stream (text chunks can merge tokens, so count >= ...).
    assert tokens >= 1000, tokens
    wait_until(lambda: not group_alive(killed), "the killed engine's process group to be gone", 15)
    # serve restarts the engine; the worker serves again as a new instance.
    wait_until(lambda: any("engine restarted" in l for l in serve.lines), "serve to restart the engine", 60)
    wait_until(lambda: json.loads(get(f"http://127.0.0.1:{serve.port}/health")).get("live_workers") == 2,
               "the restarted worker to rejoin", 300)
    again = client.completions.create(model="tiny", prompt="after the restart", max_tokens=4)
    assert again.usage.completion_tokens == 4


# === one engine, a sidecar started after it and restarted while it serves ===

BUFFER_STEPS = 8


def start_dynamo(args):
    proc = subprocess.Popen([BIN, *args, "--ready-stdout"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert line, f"dynamo {args[0]} exited before it was ready: {proc.stderr.read()[-2000:]}"
    return proc, "http://" + json.loads(line)["ready"]["addr"]


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def engine():
    port, events, replay = free_port(), free_port(), free_port()
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events}",
              "replay_endpoint": f"tcp://*:{replay}", "topic": "kv-events", "buffer_steps": BUFFER_STEPS}
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0", VLLM_SERVER_DEV_MODE="1")
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vllm-e2e-{port}.log"), "w")
    proc = subprocess.Popen(
        [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL, "--served-model-name", "tiny",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--block-size", "32",
         "--enable-prefix-caching", "--enable-prompt-tokens-details", "--enforce-eager",
         "--num-gpu-blocks-override", "24", "--kv-events-config", json.dumps(config)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, f"vLLM exited; see {log.name}"
            assert time.time() < deadline, "vLLM did not start"
            try:
                get(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield dict(url=url, events=f"tcp://127.0.0.1:{events}", replay=f"tcp://127.0.0.1:{replay}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def direct(engine, prompt, max_tokens=2):
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(engine["url"] + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())


def reset_prefix_cache(engine):
    """vLLM's reset (dev mode); its AllBlocksCleared event goes out with the engine's next step, so
    one short request (no full block) follows."""
    urllib.request.urlopen(urllib.request.Request(engine["url"] + "/reset_prefix_cache", method="POST"), timeout=10)
    direct(engine, [3] * 5, max_tokens=1)


@pytest.fixture
def started():
    """Starts `dynamo` processes for one test and stops them all after it, failed or not."""
    procs = []

    def start(args):
        proc, url = start_dynamo(args)
        procs.append(proc)
        return proc, url

    yield start
    for p in reversed(procs):
        stop(p)


def sidecar(start, engine):
    return start(["sidecar", "--listen", "127.0.0.1:0", "--engine", "vllm", "--vllm-url", engine["url"],
                  "--vllm-kv-events", engine["events"], "--vllm-kv-events-topic", "kv-events",
                  "--vllm-kv-events-replay", engine["replay"]])


def frontend(start, sidecar_url):
    return start(["frontend", "--listen", "127.0.0.1:0", "--worker", sidecar_url, "--router-mode", "kv"])


def test_events_stored_removed_and_cleared_reach_the_index_across_sidecar_restarts(engine, started):
    # Cached before any sidecar exists: 2 full blocks.
    direct(engine, [7] * 70)
    sc, surl = sidecar(started, engine)
    wait_until(lambda: metric(surl, "dynamo_component_kv_event_blocks") == 2,
               "the late sidecar to replay what vLLM cached before it", 20)
    fe, furl = frontend(started, surl)
    wait_until(lambda: metric(furl, "dynamo_router_indexed_worker_blocks") == 2, "the index to hold them")
    # Restart the sidecar while the engine serves; what vLLM caches meanwhile is not lost.
    stop(sc)
    direct(engine, [8] * 70)
    _, surl = sidecar(started, engine)
    stop(fe)
    _, furl = frontend(started, surl)
    wait_until(lambda: metric(furl, "dynamo_router_indexed_worker_blocks") == 4, "4 blocks after the restart")
    assert metric(surl, "dynamo_component_vllm_kv_cache_unknown_total") == 0
    # Removed: 24 blocks in all, so new prompts evict the old ones.
    for i in range(8):
        direct(engine, [100 + i] * 100)
    wait_until(lambda: metric(surl, "dynamo_component_kv_event_blocks") <= 24, "evictions")
    assert metric(surl, "dynamo_component_vllm_kv_events_total") > 8
    # Cleared: vLLM's reset empties its cache, and our index with it.
    reset_prefix_cache(engine)
    wait_until(lambda: metric(furl, "dynamo_router_indexed_worker_blocks") == 0, "the clear to reach the index")
    assert metric(surl, "dynamo_component_vllm_kv_event_malformed_frames_total") == 0


def test_a_replay_buffer_that_no_longer_reaches_back_marks_the_cache_unknown_until_cleared(engine, started):
    # More batches than the publisher keeps (buffer_steps), before the sidecar subscribes.
    for i in range(BUFFER_STEPS + 4):
        direct(engine, [200 + i] * 40)
    _, surl = sidecar(started, engine)
    wait_until(lambda: metric(surl, "dynamo_component_vllm_kv_cache_unknown_total") == 1,
               "the sidecar to mark the cache unknown", 20)
    _, furl = frontend(started, surl)
    wait_until(lambda: metric(furl, "dynamo_router_workers_cache_unknown") == 1, "the router to count it")
    reset_prefix_cache(engine)
    wait_until(lambda: metric(furl, "dynamo_router_workers_cache_unknown") == 0, "known again after the clear")
