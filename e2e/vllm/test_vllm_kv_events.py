"""vLLM's ZMQ KV events, as a real vLLM publisher sends them, into `dynamo sidecar --vllm-kv-events`
and on to a `dynamo frontend --router-mode kv` index.

The publisher here is pyzmq + msgspec with vLLM's own event classes (field order, tags, options
copied from vllm/distributed/kv_events.py), in both encodings vLLM has shipped: array-like
(vLLM <= 0.11) and map-like (later). Multipart frames are vLLM's: [topic, seq (8 bytes BE), payload].
What reaches the router is read from the frontend's /metrics (indexed blocks), what the sidecar
skipped from its own /metrics.
"""

import json
import os
import re
import subprocess
import time
import urllib.request
from typing import Any, Optional, Union

import msgspec
import pytest
import zmq

from ports import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("DYNAMO_BIN", os.path.join(ROOT, "target", "debug", "dynamo"))
BLOCK = 16


def event_classes(array_like):
    """vLLM's KV event structs; `array_like` picks the older wire encoding."""

    class EventBatch(msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: Optional[int] = None

    class KVCacheEvent(msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[Union[bytes, int]]
        parent_block_hash: Optional[Union[bytes, int]]
        token_ids: list[int]
        block_size: int
        lora_id: Optional[int]
        medium: Optional[str]
        lora_name: Optional[str] = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[Union[bytes, int]]
        medium: Optional[str]

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(EventBatch):
        events: list[Union[BlockStored, BlockRemoved, AllBlocksCleared]]

    return KVEventBatch, BlockStored, BlockRemoved, AllBlocksCleared


def start(args):
    proc = subprocess.Popen([BIN, *args, "--ready-stdout"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line, f"{args[0]} exited before it was ready"
    return proc, json.loads(line)["ready"]["addr"]


def metric(url, name):
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def wait_for(fn, want, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = fn()
        if got == want:
            return
        time.sleep(0.05)
    assert fn() == want


@pytest.fixture(params=[True, False], ids=["array-like", "map-like"])
def graph(request):
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sidecar, saddr = start(["sidecar", "--listen", "127.0.0.1:0", "--vllm-kv-events", f"tcp://127.0.0.1:{port}",
                            "--block-size", str(BLOCK)])
    frontend, faddr = start(["frontend", "--listen", "127.0.0.1:0", "--worker", f"http://{saddr}", "--router-mode", "kv"])
    classes = event_classes(request.param)
    seq = iter(range(10**6))
    enc = msgspec.msgpack.Encoder()

    def send(*events, raw=None, skip=0):
        for _ in range(skip):
            next(seq)
        payload = raw if raw is not None else enc.encode(classes[0](ts=time.time(), events=list(events)))
        pub.send_multipart([b"", next(seq).to_bytes(8, "big"), payload])

    # PUB/SUB drops messages until the subscription lands: repeat a harmless clear until it shows up.
    deadline = time.time() + 10
    while (metric(f"http://{saddr}", "dynamo_component_vllm_kv_event_batches_total") or 0) == 0:
        assert time.time() < deadline, "sidecar never received from the publisher"
        send(classes[3]())
        time.sleep(0.1)
    yield dict(send=send, classes=classes, sidecar=f"http://{saddr}", frontend=f"http://{faddr}")
    for p in (frontend, sidecar):
        p.terminate()
        p.wait(timeout=10)
    pub.close(0)


def indexed(g):
    return metric(g["frontend"], "dynamo_router_indexed_worker_blocks")


def test_stored_and_removed_blocks_reach_the_router_index(graph):
    _, Stored, Removed, _ = graph["classes"]
    tokens = list(range(100, 100 + 3 * BLOCK))
    graph["send"](Stored(block_hashes=[11, 12, 13], parent_block_hash=None, token_ids=tokens, block_size=BLOCK,
                         lora_id=None, medium="GPU"))
    wait_for(lambda: indexed(graph), 3)
    # sha256-mode hashes arrive as bytes.
    graph["send"](Stored(block_hashes=[b"\x07" * 32], parent_block_hash=13, token_ids=list(range(BLOCK)),
                         block_size=BLOCK, lora_id=None, medium="GPU"))
    wait_for(lambda: indexed(graph), 4)
    graph["send"](Removed(block_hashes=[b"\x07" * 32], medium="GPU"))
    wait_for(lambda: indexed(graph), 3)
    assert metric(graph["sidecar"], "dynamo_component_kv_event_blocks") == 3


def test_malformed_frames_are_counted_and_skipped(graph):
    _, Stored, _, _ = graph["classes"]
    graph["send"](raw=b"\x92\x01")  # truncated msgpack
    graph["send"](Stored(block_hashes=[1, 2], parent_block_hash=None, token_ids=[1, 2, 3], block_size=BLOCK,
                         lora_id=None, medium="GPU"))  # tokens do not fill two blocks
    graph["send"](Stored(block_hashes=[21], parent_block_hash=None, token_ids=list(range(BLOCK)), block_size=BLOCK,
                         lora_id=None, medium="GPU"))
    wait_for(lambda: indexed(graph), 1)
    assert metric(graph["sidecar"], "dynamo_component_vllm_kv_event_malformed_frames_total") == 2


def test_cpu_tier_and_lora_events_are_skipped(graph):
    _, Stored, _, _ = graph["classes"]
    graph["send"](Stored(block_hashes=[31], parent_block_hash=None, token_ids=list(range(BLOCK)), block_size=BLOCK,
                         lora_id=None, medium="CPU"),
                  Stored(block_hashes=[32], parent_block_hash=None, token_ids=list(range(BLOCK)), block_size=BLOCK,
                         lora_id=7, medium="GPU"),
                  Stored(block_hashes=[33], parent_block_hash=None, token_ids=list(range(BLOCK)), block_size=BLOCK,
                         lora_id=None, medium="GPU"))
    wait_for(lambda: indexed(graph), 1)
    assert metric(graph["sidecar"], "dynamo_component_vllm_kv_events_skipped_total") == 2


def test_a_sequence_gap_without_replay_clears_the_worker_blocks(graph):
    _, Stored, _, _ = graph["classes"]
    graph["send"](Stored(block_hashes=[41, 42], parent_block_hash=None, token_ids=list(range(2 * BLOCK)),
                         block_size=BLOCK, lora_id=None, medium="GPU"))
    wait_for(lambda: indexed(graph), 2)
    # Five batches lost on the way: the sidecar cannot vouch for the index any more.
    graph["send"](Stored(block_hashes=[51], parent_block_hash=None, token_ids=list(range(BLOCK)), block_size=BLOCK,
                         lora_id=None, medium="GPU"), skip=5)
    wait_for(lambda: indexed(graph), 1)
    assert metric(graph["sidecar"], "dynamo_component_vllm_kv_event_gaps_total") == 1


def test_a_flood_of_bad_frames_is_counted_in_full_and_logged_at_a_bounded_rate(tmp_path):
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)  # keep every frame: the test counts them
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    log_path = tmp_path / "sidecar.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([BIN, "sidecar", "--listen", "127.0.0.1:0", "--vllm-kv-events", f"tcp://127.0.0.1:{port}",
                                 "--block-size", str(BLOCK), "--ready-stdout"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        addr = json.loads(proc.stdout.readline())["ready"]["addr"]
        url = f"http://{addr}"
        malformed = lambda: metric(url, "dynamo_component_vllm_kv_event_malformed_frames_total") or 0  # noqa: E731
        # Wait until the subscription is live (PUB/SUB drops what is sent before).
        deadline = time.time() + 10
        while malformed() == 0:
            assert time.time() < deadline, "sidecar never received from the publisher"
            pub.send_multipart([b"", (0).to_bytes(8, "big"), b"\xc1"])
            time.sleep(0.1)
        before = malformed()
        n = 20_000
        for i in range(n):
            if i % 2:
                pub.send_multipart([b"", (i + 1).to_bytes(8, "big"), os.urandom(16)])  # garbage payload
            else:
                pub.send_multipart([b"only one frame " + os.urandom(4)])  # not [topic, seq, payload]
        # PUB/SUB may drop frames under such a flood (the subscriber's queue is bounded): what
        # arrives is counted; most must arrive.
        time.sleep(3)
        counted = malformed() - before
        assert counted >= n // 2, f"only {counted} of {n} bad frames counted"
        assert urllib.request.urlopen(url + "/health", timeout=5).status == 200, "sidecar survives the flood"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        pub.close(0)
    text = log_path.read_text().splitlines()
    # Three kinds of bad input (undecodable batches, wrong frames, sequence gaps), each logged for
    # the first 10, then once per 10 s.
    for what in ("malformed vLLM KV event batch", "without [topic, seq, payload]", "could not be replayed"):
        lines = [l for l in text if what in l]
        assert 1 <= len(lines) <= 10 + 3, f"{len(lines)} lines of {what!r} for {n} bad frames"
