"""Hostile and careless clients against real `axion api` and `axion worker` processes on a real Redis, over raw
sockets where a well-behaved HTTP client would not do what they do: stop reading a stream, send headers or a
body too slowly, send malformed HTTP, hold many connections, leave while queued, send prompts that cannot fit.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from common import keys
from common.protocol import ChatJob, ChatMessage, Failed, SamplingParams
from common.redis_server import EmbeddedRedis, free_port
from tests.conftest import Proc, Server, axion_env, next_event, subscribed, wait_ready

BUFFER_BYTES = 256 * 1024
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 8
CONNECTION_LIMIT = MAX_CONNECTIONS + 32  # axion/cli.py CONNECTION_SPARE
MAX_SEQ_LEN = 1024


@pytest.fixture(scope="module")
def fleet(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("hostile-logs")
    with EmbeddedRedis() as server:
        port = free_port()
        env = axion_env(tiny_model_dir, server.url, port, STREAM_BUFFER_BYTES=str(BUFFER_BYTES),
                        HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S), BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
                        MAX_CONNECTIONS=str(MAX_CONNECTIONS), CONCURRENT_REQUESTS="2", MAX_BATCH_SIZE="4",
                        MAX_SEQ_LEN=str(MAX_SEQ_LEN), SSE_KEEPALIVE_S="0.5")
        procs = [Proc(["worker"], env, logs / "worker.log").start(), Proc(["api"], env, logs / "api.log").start()]
        fleet = Server(f"http://127.0.0.1:{port}", str(tiny_model_dir), procs, server.url)
        try:
            wait_ready(fleet.base_url, procs)
            yield fleet
        finally:
            for proc in reversed(procs):
                proc.stop()


def _connect(fleet: Server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:  # a small window, so the kernel buffers little of what the client does not read
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", int(fleet.base_url.rsplit(":", 1)[1])))
    return sock


def _request(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: axion\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def _read_all(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection, and whether it did within `timeout`."""
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), True
    except TimeoutError:
        pass
    return b"".join(chunks), False


def _envelope(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def _api_pid(fleet: Server) -> int:
    return next(p.process.pid for p in fleet.procs if p.args == ["api"])


def _chat(fleet: Server, content: str = "hello", **extra: object) -> dict:
    return {"model": fleet.model, "messages": [{"role": "user", "content": content}], **extra}


def test_a_client_that_stops_reading_is_dropped_and_the_api_memory_stays_bounded(fleet: Server) -> None:
    """Four streams with n=4 and 20 top logprobs per token, never read: each is cut once BUFFER_BYTES wait for it,
    its job is cancelled, and the API's RSS neither grows without bound nor stays up after."""
    api = psutil.Process(_api_pid(fleet))
    body = _chat(fleet, stream=True, n=4, max_tokens=900, logprobs=True, top_logprobs=20, ignore_eos=True)
    with fleet.client() as client:  # the same request, read to its end first: the API's code paths warmed up
        warm = {k: v for k, v in body.items() if k != "ignore_eos"} | {"max_tokens": 100}
        assert len(list(client.chat.completions.create(**warm, extra_body={"ignore_eos": True}))) > 64
    baseline = api.memory_info().rss
    sockets = [_connect(fleet, rcvbuf=4096) for _ in range(4)]
    for sock in sockets:
        sock.sendall(_request("/v1/chat/completions", body))
    peak, deadline = baseline, time.monotonic() + 90
    while time.monotonic() < deadline and fleet.procs[1].log().count("the client stopped reading") < 4:
        peak = max(peak, api.memory_info().rss)
        time.sleep(0.05)
    log = fleet.procs[1].log()
    assert log.count("the client stopped reading") == 4, log[-3000:]
    for sock in sockets:  # the server cut them: what the kernel held drains, then EOF or a reset
        assert _read_all(sock, 10)[1]
        sock.close()
    r = redis.Redis.from_url(fleet.redis_url)
    deadline = time.monotonic() + 30
    while r.xpending(keys.chat_stream(fleet.model), keys.WORKER_GROUP)["pending"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.xpending(keys.chat_stream(fleet.model), keys.WORKER_GROUP)["pending"] == 0  # cancelled and acked
    settled = api.memory_info().rss
    print(f"API RSS: baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f}, after {settled / 2**20:.1f}")
    assert peak - baseline < 4 * BUFFER_BYTES + 32 * 2**20  # the old unbounded relay: +138 MiB in 56 s
    assert settled - baseline < 32 * 2**20



def test_a_body_that_does_not_arrive_in_time_is_a_408_and_the_connection_closes(fleet: Server) -> None:
    sock = _connect(fleet)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: axion\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\":")
    started = time.monotonic()
    response, closed = _read_all(sock, BODY_TIMEOUT_S + 10)
    assert closed and BODY_TIMEOUT_S <= time.monotonic() - started
    status, error = _envelope(response)
    assert status == 408 and error["code"] == "request_timeout" and b"connection: close" in response.lower()


def test_headers_that_do_not_arrive_in_time_are_a_408_and_the_connection_closes(fleet: Server) -> None:
    sock = _connect(fleet)
    sock.sendall(b"GET /health HTTP/1.1\r\n")
    started = time.monotonic()
    for i in range(100):  # one header line at a time, as slowloris sends them
        try:
            sock.sendall(f"X-Slow-{i}: 1\r\n".encode())
        except OSError:
            break
        time.sleep(0.25)
        if time.monotonic() - started > HEADER_TIMEOUT_S + 5:
            break
    response, closed = _read_all(sock, 5)
    assert closed and time.monotonic() - started < HEADER_TIMEOUT_S + 5
    status, error = _envelope(response)
    assert status == 408 and error["code"] == "request_timeout"


def test_malformed_http_gets_an_envelope(fleet: Server) -> None:
    sock = _connect(fleet)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: axion\r\nContent-Length: -5\r\n\r\n{}")
    response, closed = _read_all(sock, 5)
    status, error = _envelope(response)
    assert closed and status == 400 and error["code"] == "invalid_http" and error["param"] is None


def test_connections_still_sending_headers_count_toward_the_limit(fleet: Server) -> None:
    """CONNECTION_LIMIT connections that never finish their headers fill the server: the next request gets a
    503 envelope; once the header timeout has closed them, requests are served again."""
    slow = [_connect(fleet) for _ in range(CONNECTION_LIMIT)]
    for sock in slow:
        sock.sendall(b"GET /health HTTP/1.1\r\nX-Slow: 1\r\n")
    time.sleep(0.3)
    probe = _connect(fleet)
    probe.sendall(b"GET /health HTTP/1.1\r\nHost: axion\r\n\r\n")
    status, error = _envelope(_read_all(probe, 5)[0])
    assert status == 503 and error["code"] == "too_many_connections"
    assert all(_read_all(sock, HEADER_TIMEOUT_S + 5)[1] for sock in slow)
    probe = _connect(fleet)
    probe.sendall(b"GET /health HTTP/1.1\r\nHost: axion\r\nConnection: close\r\n\r\n")
    assert _read_all(probe, 5)[0].startswith(b"HTTP/1.1 200")


def _stream_stats(r: redis.Redis, fleet: Server) -> tuple[int, int]:
    """(entries ever added to the model's stream, entries its worker group has read)."""
    info = r.xinfo_stream(keys.chat_stream(fleet.model))
    group = next(g for g in r.xinfo_groups(keys.chat_stream(fleet.model)) if g["name"] == keys.WORKER_GROUP.encode()
                 or g["name"] == keys.WORKER_GROUP)
    return info["entries-added"], group["entries-read"]


def test_requests_whose_clients_left_while_waiting_are_never_enqueued(fleet: Server) -> None:
    """Both CONCURRENT_REQUESTS slots busy; five more clients wait in the API for one, then leave: none of them
    reaches the stream, and the two running requests are the only entries the workers read."""
    r = redis.Redis.from_url(fleet.redis_url)
    added, read = _stream_stats(r, fleet)
    busy = [_connect(fleet) for _ in range(2)]
    for sock in busy:
        sock.sendall(_request("/v1/chat/completions", _chat(fleet, stream=True, max_tokens=600, ignore_eos=True)))
    deadline = time.monotonic() + 30
    while _stream_stats(r, fleet)[1] < read + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = [_connect(fleet) for _ in range(5)]
    for i, sock in enumerate(waiting):
        body = _chat(fleet, stream=i % 2 == 0, max_tokens=8)
        sock.sendall(_request("/v1/chat/completions" if i < 4 else "/v1/completions",
                              body if i < 4 else {"model": fleet.model, "prompt": "hi", "max_tokens": 8}))
    time.sleep(1.0)
    for sock in waiting:
        sock.close()
    for sock in busy:
        sock.close()
    time.sleep(2.0)
    assert _stream_stats(r, fleet) == (added + 2, read + 2)
    assert fleet.procs[1].log().count("client went away") >= 5


def test_a_prompt_that_cannot_fit_is_refused_by_the_api_while_the_worker_heartbeats(fleet: Server) -> None:
    """Twenty prompts of MAX_SEQ_LEN x 64 + 1 characters: each refused by the API (nothing enqueued); the same
    job put on the stream directly (as a batch line is) is refused by the worker before it tokenizes, and the
    worker's heartbeat never lapses."""
    import httpx

    r = redis.Redis.from_url(fleet.redis_url)
    added, _ = _stream_stats(r, fleet)
    huge = "word " * (MAX_SEQ_LEN * 64 // 5 + 1)
    timings = []
    with httpx.Client(base_url=fleet.base_url, timeout=30) as http:
        for _ in range(20):
            started = time.perf_counter()
            resp = http.post("/v1/chat/completions", json=_chat(fleet, huge))
            timings.append((time.perf_counter() - started) * 1000)
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    print(f"API refusals of {len(huge)}-character prompts: median {sorted(timings)[10]:.1f} ms, max "
          f"{max(timings):.1f} ms")
    assert _stream_stats(r, fleet)[0] == added
    job = ChatJob(request_id=f"huge-{time.monotonic_ns()}", model=fleet.model, created=time.time(),
                  messages=[ChatMessage("user", huge * 8)], params=SamplingParams())
    pubsub = subscribed(r, job.request_id)
    from common.protocol import encode

    r.xadd(keys.chat_stream(fleet.model), {"job": encode(job)})
    event = next_event(pubsub)
    assert isinstance(event, Failed) and event.code == "context_length_exceeded"
    ages = [w["last_beat_s"] for w in _workers(fleet)]
    assert ages and max(ages) < 10


def _workers(fleet: Server) -> list[dict]:
    import httpx

    return httpx.get(f"{fleet.base_url}/health", timeout=5).json()["workers"]


def test_a_client_that_leaves_at_once_leaves_no_cache_lease_behind(fleet: Server) -> None:
    """Greedy requests take the response cache's single-flight lease; clients that hang up within moments of
    sending one (before, during or after the run's start) must not leave it held, or every identical request
    after them waits for an answer that never comes."""
    body = _chat(fleet, "the same question, asked and abandoned", temperature=0, max_tokens=8)
    for delay in (0.0, 0.001, 0.005, 0.02, 0.05, 0.2):
        sock = _connect(fleet)
        sock.sendall(_request("/v1/chat/completions", body))
        time.sleep(delay)
        sock.close()
    with fleet.client(timeout=30) as client:
        answer = client.chat.completions.create(**body)
    assert answer.choices[0].finish_reason in ("stop", "length")
    r = redis.Redis.from_url(fleet.redis_url)
    assert list(r.scan_iter(match=keys.cache_lease("*"))) == []


@pytest.mark.parametrize("stream", [False, True])
def test_a_completion_of_more_prompts_than_slots_completes(fleet: Server, stream: bool) -> None:
    """Five prompts where CONCURRENT_REQUESTS is 2: one request takes one slot (a slot per prompt deadlocked,
    each prompt's run waiting for a slot the others held)."""
    with fleet.client(timeout=60) as client:
        result = client.completions.create(model=fleet.model, prompt=[f"prompt {i}" for i in range(5)],
                                           max_tokens=4, stream=stream)
        indexes = ({c.index for chunk in result for c in chunk.choices} if stream
                   else {c.index for c in result.choices})
    assert indexes == set(range(5))
