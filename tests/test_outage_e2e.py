"""Redis outages under traffic: one `axion api` and one `axion worker` on a redis-server that these tests stop
for 3 s and start again, empty, on the same port, then freeze (SIGSTOP: connections stay open, nothing answers).
Requests during the outage get a quick 503, /health says why, and once Redis is back the same processes serve
again by themselves."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from common.redis_server import EmbeddedRedis, free_port
from tests.conftest import Proc, axion_env, wait_ready

OUTAGE_S = 3.0
QUICK_S = 1.5  # "quickly": far below any client timeout, and nowhere near REQUEST_TIMEOUT_S


@dataclass
class Stack:
    base_url: str
    model: str
    redis: EmbeddedRedis
    procs: list[Proc]


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("outage-logs")
    redis = EmbeddedRedis().start()
    port = free_port()
    env = axion_env(tiny_model_dir, redis.url, port, MAX_SEQ_LEN="1024", HEARTBEAT_TTL_S="1.5",
                    REDIS_TIMEOUT_S="1", WORKER_GRACE_S="2", SSE_KEEPALIVE_S="0.5")
    procs = [Proc(["worker"], env, logs / "worker.log").start(), Proc(["api"], env, logs / "api.log").start()]
    stack = Stack(f"http://127.0.0.1:{port}", str(tiny_model_dir), redis, procs)
    try:
        wait_ready(stack.base_url, procs)
        yield stack
    finally:
        codes = [proc.stop() for proc in procs]
        stack.redis.stop()
        assert codes == [0, 0], "\n".join(p.log()[-3000:] for p in procs)


_sent = iter(range(10**6))


def chat(stack: Stack, client: httpx.Client) -> httpx.Response:
    """A short request, never the same twice (no cache hit), greedy (cacheable: the cache's Redis path) or
    sampled (straight to the job queue) in turn."""
    n = next(_sent)
    body = {"model": stack.model, "messages": [{"role": "user", "content": f"hello {n}"}], "max_tokens": 8,
            "temperature": n % 2}
    return client.post(f"{stack.base_url}/v1/chat/completions", json=body)


def stream_events(stack: Stack, max_tokens: int, out: list[dict]) -> None:
    """Read one long stream to its end, keeping every data payload (an error frame included)."""
    body = {"model": stack.model, "messages": [{"role": "user", "content": "a long one"}], "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))


def stream_in_flight(stack: Stack) -> tuple[list[dict], threading.Thread]:
    """A 1000-token stream read on a thread, returned once its first token frame has arrived."""
    frames: list[dict] = []
    reader = threading.Thread(target=stream_events, args=(stack, 1000, frames), daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while not any("choices" in f for f in frames) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any("choices" in f for f in frames), frames
    return frames, reader


def test_redis_outage_gives_quick_503s_and_the_fleet_recovers_by_itself(stack: Stack) -> None:
    client = httpx.Client(timeout=30)
    assert chat(stack, client).status_code == 200
    pids = [p.process.pid for p in stack.procs]

    # A stream in flight when Redis goes: it must end with an error frame, not hang until REQUEST_TIMEOUT_S.
    frames, reader = stream_in_flight(stack)

    port = stack.redis.port
    stack.redis.stop()
    stopped_at = time.monotonic()
    statuses: list[tuple[int, str | None, float]] = []
    while time.monotonic() - stopped_at < OUTAGE_S:
        start = time.monotonic()
        resp = chat(stack, client)
        elapsed = time.monotonic() - start
        code = resp.json()["error"]["code"] if resp.status_code != 200 else None
        statuses.append((resp.status_code, code, elapsed))
        assert resp.status_code == 503 and elapsed < QUICK_S, statuses
        assert "retry-after" in resp.headers
        time.sleep(0.1)
    assert {code for _, code, _ in statuses} == {"redis_unavailable"}, statuses

    health = client.get(f"{stack.base_url}/health")
    assert health.status_code == 200
    assert health.json()["redis"]["reachable"] is False and health.json()["status"] == "degraded"
    assert any("Redis unreachable" in r for r in health.json()["reasons"])
    ready = client.get(f"{stack.base_url}/health/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready"

    reader.join(timeout=QUICK_S)
    assert not reader.is_alive(), "the stream in flight hung after Redis went away"
    errors = [f["error"] for f in frames if "error" in f]
    assert errors and errors[0]["code"] == "redis_unavailable", frames[-3:]

    # Redis returns empty (no persistence): workers beat again, recreate their group, the hub resubscribes.
    stack.redis = EmbeddedRedis(port=port).start()
    back_at = time.monotonic()
    while True:
        resp = chat(stack, client)
        if resp.status_code == 200:
            break
        # While the fleet comes back: 503s only (never a 404 for a model Redis forgot, never a 500).
        assert resp.status_code == 503, resp.text
        assert time.monotonic() - back_at < 15, "no request succeeded within 15 s of Redis coming back"
        time.sleep(0.2)
    recovery_s = time.monotonic() - back_at

    for _ in range(3):
        assert chat(stack, client).status_code == 200
    frames.clear()
    stream_events(stack, 16, frames)
    assert not any("error" in f for f in frames) and sum("choices" in f for f in frames) >= 2
    ready = client.get(f"{stack.base_url}/health/ready")
    assert ready.status_code == 200, ready.text

    assert [p.process.pid for p in stack.procs] == pids
    assert all(p.process.poll() is None for p in stack.procs)
    print(f"outage: {len(statuses)} requests answered 503 in at most {max(s[2] for s in statuses):.3f}s; "
          f"served again {recovery_s:.2f}s after Redis came back")


def test_a_hung_redis_is_noticed_within_the_timeouts(stack: Stack) -> None:
    """SIGSTOP leaves every connection open and silent: only the timeouts (REDIS_TIMEOUT_S=1 here) can tell.
    New requests get their 503 within about that bound, and the reply hub's PING finds the stream in flight."""
    client = httpx.Client(timeout=30)
    assert chat(stack, client).status_code == 200
    pids = [p.process.pid for p in stack.procs]
    frames, reader = stream_in_flight(stack)

    assert stack.redis.process is not None
    redis_pid = stack.redis.process.pid
    os.kill(redis_pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        start = time.monotonic()
        resp = chat(stack, client)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "redis_unavailable", resp.text
        assert time.monotonic() - start < 2.5
        start = time.monotonic()
        health = client.get(f"{stack.base_url}/health")
        assert health.status_code == 200 and health.json()["redis"]["reachable"] is False
        assert time.monotonic() - start < 1.5
        reader.join(timeout=5)
        assert not reader.is_alive(), "the stream in flight hung with Redis"
        hung_s = time.monotonic() - frozen_at
        errors = [f["error"] for f in frames if "error" in f]
        assert errors and errors[0]["code"] == "redis_unavailable", frames[-3:]
    finally:
        os.kill(redis_pid, signal.SIGCONT)

    back_at = time.monotonic()
    while (resp := chat(stack, client)).status_code != 200:
        assert resp.status_code == 503, resp.text
        assert time.monotonic() - back_at < 15, f"no request succeeded within 15 s of Redis resuming: {resp.text}"
        time.sleep(0.2)
    assert client.get(f"{stack.base_url}/health/ready").status_code == 200
    assert [p.process.pid for p in stack.procs] == pids
    print(f"hung Redis: the stream in flight failed after {hung_s:.2f}s; "
          f"served again {time.monotonic() - back_at:.2f}s after it resumed")
