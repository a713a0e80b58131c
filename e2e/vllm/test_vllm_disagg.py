"""Disaggregated prefill/decode on real vLLM engines: `dynamo serve manifests/vllm-disagg.yaml` (a
frontend, a prefill and a decode worker, each vLLM with the NixlConnector), with the official openai
client. The prefill engine computes each prompt and hands its KV to the decode engine through NIXL;
the parameters travel through our prefill sidecar, the frontend and our decode sidecar unread.

Greedy output in float32, one request at a time, must equal the same request answered by one engine
alone; a pair that differs is reported with the logit margin at the first differing token (random
weights make near-ties possible).

DYN_VLLM_PYTHON (default: what hack/vllm.sh prints) is the Python with vLLM and NIXL.
"""

import json
import os
import re
import signal
import subprocess
import threading
import urllib.request

import openai
import pytest

from ports import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("DYNAMO_BIN", os.path.join(ROOT, "target", "debug", "dynamo"))
CACHE = os.environ.get("DYNAMO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dynamo-rs"))
PYTHON = os.environ.get("DYN_VLLM_PYTHON", os.path.join(CACHE, "vllm", "current", "bin", "python"))

if not os.path.exists(PYTHON):
    pytest.fail(f"vLLM is not installed at {PYTHON}: run hack/vllm.sh", pytrace=False)


def get(url):
    return urllib.request.urlopen(url, timeout=5).read().decode()


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=120).read())


def metric(url, name, labels=""):
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", get(url + "/metrics"), re.M):
        if labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


@pytest.fixture(scope="module")
def serve():
    port = free_port()
    lines, ready = [], threading.Event()
    proc = subprocess.Popen(
        [BIN, "serve", os.path.join(ROOT, "manifests", "vllm-disagg.yaml"), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, DYN_VLLM_PYTHON=PYTHON), start_new_session=True)

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "ready in" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(600), "dynamo serve did not become ready:\n" + "".join(lines[-40:])
        engines = {}
        for line in lines:
            m = re.match(r"dynamo serve: (\S+)'s engine: .* --port (\d+)", line)
            if m:
                engines[m.group(1)] = int(m.group(2))
        yield f"http://127.0.0.1:{port}", engines, lines
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def engine(engines, service):
    return next(p for name, p in engines.items() if name.startswith(service))


def test_prefill_workers_run_with_role_prefill_and_the_nixl_connector(serve):
    _, engines, lines = serve
    assert any(n.startswith("VllmPrefill") for n in engines) and any(n.startswith("VllmDecode") for n in engines)
    text = "".join(lines)
    assert text.count("NixlConnector") >= 2, "both engines' command lines carry the KV connector"


def test_disaggregated_greedy_output_equals_one_engines_token_for_token(serve):
    base, engines, _ = serve
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    decode_url = f"http://127.0.0.1:{engine(engines, 'VllmDecode')}"
    prefill_url = f"http://127.0.0.1:{engine(engines, 'VllmPrefill')}"
    source = "vllm:prompt_tokens_by_source_total"
    prefill_computed = metric(prefill_url, source, 'source="local_compute"')
    decode_pulled = metric(decode_url, source, 'source="external_kv_transfer"')
    remote = metric(base, "dynamo_frontend_disagg_decisions_total", 'decision="remote"')
    differing = []
    prompts = [" ".join(f"p{i}w{w}" for w in range(150 + 60 * i)) for i in range(4)]
    total_prompt = 0
    for i, prompt in enumerate(prompts):
        ours = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
        total_prompt += ours.usage.prompt_tokens
        # The same prompt answered by one engine alone: the prefill engine, which computed it itself
        # (the decode engine now caches the KV it pulled, so it would not be a separate check).
        ref = post(prefill_url + "/v1/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "logprobs": 2})
        if ours.choices[0].text != ref["choices"][0]["text"]:
            lp = ref["choices"][0]["logprobs"]
            ours_text = ours.choices[0].text
            pos = next((k for k, t in enumerate(lp["tokens"]) if not ours_text.startswith("".join(lp["tokens"][:k + 1]))), None)
            top = sorted(lp["top_logprobs"][pos].values(), reverse=True) if pos is not None else []
            margin = top[0] - top[1] if len(top) > 1 else float("nan")
            differing.append((i, pos, margin))
    assert metric(base, "dynamo_frontend_disagg_decisions_total", 'decision="remote"') - remote == len(prompts)
    assert metric(base, "dynamo_frontend_prefill_fallbacks_total") == 0, get(base + "/metrics")
    # vLLM's own accounting: the prefill engine computed the prompts, and the decode engine got all
    # but at most the last block of each from the transfer.
    assert metric(prefill_url, source, 'source="local_compute"') - prefill_computed >= total_prompt - 4
    pulled = metric(decode_url, source, 'source="external_kv_transfer"') - decode_pulled
    assert total_prompt - 33 * len(prompts) <= pulled <= total_prompt, (pulled, total_prompt)
    near_ties = [d for d in differing if d[2] == d[2] and d[2] < 1e-3]
    assert differing == near_ties, f"outputs differ (prompt, first differing token, logit margin): {differing}"
    if differing:
        print(f"near-ties (prompt, token, logit margin): {differing}")
