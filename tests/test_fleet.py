"""Fleet mode: 2 `axion api` and 2 `axion worker` processes on one real Redis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common import keys
from common.redis_server import EmbeddedRedis, free_port
from tests.conftest import Proc, Server, axion_env, wait_ready

REQUESTS = 64


@pytest.fixture(scope="module")
def own_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this module's own: the session's shared one keeps consumers that earlier tests' workers left in
    the tiny model's group, and this module counts the group's consumers."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(tiny_model_dir: Path, own_redis: EmbeddedRedis,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    redis_server = own_redis
    logs = tmp_path_factory.mktemp("fleet-logs")
    ports = [free_port(), free_port()]
    env = {"MAX_BATCH_SIZE": "8", "CONCURRENT_REQUESTS": "32"}
    procs = [Proc(["worker"], axion_env(tiny_model_dir, redis_server.url, ports[0], **env), logs / f"w{i}.log")
             .start() for i in range(2)]
    procs += [Proc(["api"], axion_env(tiny_model_dir, redis_server.url, port, **env), logs / f"api{i}.log")
              .start() for i, port in enumerate(ports)]
    servers = [Server(f"http://127.0.0.1:{port}", str(tiny_model_dir), procs, redis_server.url) for port in ports]
    try:
        for server in servers:
            wait_ready(server.base_url, procs, workers=2)
        yield servers
    finally:
        codes = [proc.stop() for proc in procs]
        assert codes == [0, 0, 0, 0], "\n".join(p.log()[-2000:] for p in procs)


def test_64_concurrent_requests_complete_exactly_once(fleet: list[Server]) -> None:
    rng = random.Random(7)
    plan = [(i, fleet[i % 2], i % 2 == 0, rng.randint(4, 24)) for i in range(REQUESTS)]
    r = redis.Redis.from_url(fleet[0].redis_url)
    stream = keys.chat_stream(fleet[0].model)
    added_before = _entries_added(r, stream)

    async def one(i: int, server: Server, stream_it: bool, max_tokens: int) -> tuple[int, str, int]:
        client = server.async_client(timeout=120)
        messages = [{"role": "user", "content": f"request number {i}"}]
        if stream_it:
            text, usage = "", None
            async for chunk in await client.chat.completions.create(
                    model=server.model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True}):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    usage = chunk.usage
            assert usage is not None
            return i, text, usage.completion_tokens
        resp = await client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                                    max_tokens=max_tokens)
        assert resp.usage is not None
        return i, resp.choices[0].message.content or "", resp.usage.completion_tokens

    async def all_of_them() -> list[tuple[int, str, int]]:
        return await asyncio.gather(*(one(*p) for p in plan))

    results = asyncio.run(all_of_them())
    assert sorted(i for i, _, _ in results) == list(range(REQUESTS))
    for (i, _, _, max_tokens), (j, _, completion_tokens) in zip(plan, sorted(results), strict=True):
        assert i == j and completion_tokens == max_tokens

    # Each request was enqueued exactly once, answered, acknowledged and deleted: nothing pending or left.
    if added_before is not None:
        assert _entries_added(r, stream) - added_before == REQUESTS
    pending = r.xpending(stream, keys.WORKER_GROUP)
    assert pending["pending"] == 0
    assert r.xlen(stream) == 0
    # Both workers took part (the group has two consumers that read entries).
    consumers = r.xinfo_consumers(stream, keys.WORKER_GROUP)
    assert len(consumers) == 2


def test_same_greedy_answer_from_either_replica(fleet: list[Server]) -> None:
    messages = [{"role": "user", "content": "same question"}]
    answers = {
        server.client(timeout=60).chat.completions.create(model=server.model, messages=messages, temperature=0,
                                                          max_tokens=16).choices[0].message.content
        for server in fleet
    }
    assert len(answers) == 1


def _entries_added(r: redis.Redis, stream: str) -> int | None:
    """XINFO STREAM's entries-added (Redis 7+); None on older servers."""
    info = r.xinfo_stream(stream)
    value = info.get("entries-added")
    return int(value) if value is not None else None
