"""Admission and health over HTTP, on real processes: an `axion api` alone (no worker yet), then with one worker
that runs one sequence at a time behind a model queue bound of 2 (MAX_QUEUED_JOBS)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from common import keys
from common.redis_server import EmbeddedRedis, free_port
from tests.conftest import Proc, axion_env, wait_ready

GRACE_S = 1.0


@dataclass
class Stack:
    base_url: str
    model: str
    redis_url: str
    env: dict[str, str]
    logs: Path
    procs: list[Proc] = field(default_factory=list)

    def post(self, body: dict, timeout: float = 30) -> httpx.Response:
        return httpx.post(f"{self.base_url}/v1/chat/completions", json=body, timeout=timeout)

    def chat(self, content: str = "hi", **extra: object) -> httpx.Response:
        return self.post({"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
                         | extra)


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("admission-logs")
    port = free_port()
    with EmbeddedRedis() as server:
        env = axion_env(tiny_model_dir, server.url, port, MAX_SEQ_LEN="1024", MAX_BATCH_SIZE="1",
                        MAX_QUEUED_JOBS="2", CONCURRENT_REQUESTS="8", WORKER_GRACE_S=str(GRACE_S),
                        HEARTBEAT_TTL_S="1.5", SSE_KEEPALIVE_S="0.2")
        stack = Stack(f"http://127.0.0.1:{port}", str(tiny_model_dir), server.url, env, logs)
        stack.procs.append(Proc(["api"], env, logs / "api.log").start())
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"{stack.base_url}/health", timeout=2)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and stack.procs[0].process.poll() is None, \
                        stack.procs[0].log()[-3000:]
                    time.sleep(0.2)
            yield stack
        finally:
            codes = [proc.stop() for proc in reversed(stack.procs)]
            assert codes == [0] * len(codes), "\n".join(p.log()[-3000:] for p in stack.procs)


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Proc:
    """The one chat worker, started by the first test that needs it (the tests before it see none)."""
    proc = Proc(["worker"], stack.env, stack.logs / "worker.log").start()
    stack.procs.append(proc)
    wait_ready(stack.base_url, stack.procs)
    return proc


def test_without_a_worker_health_answers_and_readiness_fails(stack: Stack) -> None:
    health = httpx.get(f"{stack.base_url}/health", timeout=5)
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "degraded" and body["redis"]["reachable"] is True and body["workers"] == []
    assert "no live worker" in body["reasons"]
    ready = httpx.get(f"{stack.base_url}/health/ready", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["status"] == "not_ready"
    assert any("no live worker serves the default model" in r for r in ready.json()["reasons"])


def test_no_live_worker_is_503_after_the_grace_wait_and_unknown_model_stays_404(stack: Stack) -> None:
    start = time.monotonic()
    resp = stack.chat()
    elapsed = time.monotonic() - start
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "model_unavailable" and "No live worker" in error["message"]
    assert "retry-after" in resp.headers
    assert GRACE_S <= elapsed < GRACE_S + 1.5

    start = time.monotonic()
    resp = stack.post({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert time.monotonic() - start < 0.5


def test_a_worker_makes_the_replica_ready(stack: Stack, worker: Proc) -> None:
    assert stack.chat().status_code == 200
    ready = httpx.get(f"{stack.base_url}/health/ready", timeout=5)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["reasons"] == [] and body["default_model"] == stack.model
    (w,) = body["workers"]
    assert w["kind"] == "chat" and w["device"] == "cpu" and w["max_batch_size"] == 1
    assert {"batch_occupancy", "tokens_per_s", "jobs_per_s", "cpu_percent", "last_beat_s"} <= set(w)
    (queue,) = body["queues"]
    assert (queue["kind"], queue["model"], queue["max_queued_jobs"], queue["workers"]) == ("chat", stack.model, 2, 1)
    assert {"depth", "pending", "waiting", "dead_letters"} <= set(queue)
    assert body["system"]["cpu_count"] >= 1 and body["system"]["memory"]["total_bytes"] > 0
    assert body["limits"] == {"max_connections": 100, "concurrent_requests": 8, "max_queued_jobs": 2}
    assert httpx.get(f"{stack.base_url}/health", timeout=5).json()["status"] == "ok"


def test_a_full_model_queue_is_429_at_once(stack: Stack, worker: Proc) -> None:
    """One job running (MAX_BATCH_SIZE 1) and one waiting fill MAX_QUEUED_JOBS=2: the next is refused with
    Retry-After without waiting on the worker; once the queue drains, requests are served again."""
    r = redis.Redis.from_url(stack.redis_url)
    stream = keys.chat_stream(stack.model)
    long = {"model": stack.model, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 800,
            "ignore_eos": True}
    results: list[int] = []
    fillers = [threading.Thread(target=lambda: results.append(stack.post(long, timeout=120).status_code))
               for _ in range(2)]
    for t in fillers:
        t.start()
    deadline = time.monotonic() + 10
    while r.xlen(stream) < 2:
        assert time.monotonic() < deadline, "the two long requests never filled the queue"
        time.sleep(0.01)

    start = time.monotonic()
    resp = stack.chat("one too many")
    elapsed = time.monotonic() - start
    assert r.xlen(stream) == 2, "the queue drained while the test looked: make the long requests longer"
    assert resp.status_code == 429, resp.text
    assert resp.json()["error"]["code"] == "queue_full" and resp.headers["retry-after"] == "1"
    assert elapsed < 0.5

    queue = httpx.get(f"{stack.base_url}/health/ready", timeout=5).json()["queues"][0]
    assert queue["depth"] == 2 and queue["pending"] == 1 and queue["waiting"] == 1

    for t in fillers:
        t.join(timeout=120)
    assert results == [200, 200]
    assert stack.chat("after the rush").status_code == 200


def test_sigusr1_writes_the_threads_stacks_and_the_worker_goes_on(stack: Stack, worker: Proc) -> None:
    """`kill -USR1` on a worker (README "Operating the fleet"): every thread's Python stack in its log, and the
    worker keeps serving."""
    before = len(worker.log())
    worker.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while (dump := worker.log()[before:]).count("(most recent call first)") < 2:  # the main and the model thread
        assert time.monotonic() < deadline, dump[-2000:]
        time.sleep(0.1)
    assert "Current thread" in dump and "concurrent/futures/thread.py" in dump  # the model thread waits there
    assert worker.process.poll() is None
    assert stack.chat("still there?").status_code == 200
