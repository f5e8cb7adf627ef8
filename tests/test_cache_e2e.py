"""The chat response cache through real processes: 2 `axion api` + 1 `axion worker` on one real Redis."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from common import keys
from common.redis_server import EmbeddedRedis, free_port
from tests.conftest import Proc, axion_env, get_json, wait_ready

ENV = {"HEARTBEAT_TTL_S": "1.5", "MAX_BATCH_SIZE": "4", "CONCURRENT_REQUESTS": "32"}


class Fleet:
    def __init__(self, model_dir: Path, redis_url: str, logs: Path) -> None:
        self.model_dir, self.redis_url, self.logs = model_dir, redis_url, logs
        self.ports = [free_port(), free_port()]
        self.apis = [Proc(["api"], axion_env(model_dir, redis_url, port, **ENV), logs / f"api{i}.log").start()
                     for i, port in enumerate(self.ports)]
        self.worker = self.start_worker()
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]
        self.redis = redis.Redis.from_url(redis_url)

    def start_worker(self) -> Proc:
        n = len(list(self.logs.glob("worker*.log")))
        return Proc(["worker"], axion_env(self.model_dir, self.redis_url, self.ports[0], **ENV),
                    self.logs / f"worker{n}.log").start()

    def wait(self) -> None:
        for url in self.urls:
            wait_ready(url, [*self.apis, self.worker])

    def jobs_added(self) -> int:
        """Jobs ever enqueued for the model (XINFO STREAM's entries-added, Redis 7+)."""
        return int(self.redis.xinfo_stream(keys.chat_stream(str(self.model_dir)))["entries-added"])

    def jobs_done(self) -> int:
        """Answered jobs as the worker counts them (heartbeat, refreshed every HEARTBEAT_TTL_S / 3)."""
        time.sleep(1.0)
        health = get_json(f"{self.urls[0]}/health")
        return sum(w["jobs_done"] for w in health["workers"] if w["kind"] == "chat")


@pytest.fixture(scope="module")
def fleet(tiny_model_dir: Path, redis_server: EmbeddedRedis,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    redis.Redis.from_url(redis_server.url).flushall()
    model_dir = tmp_path_factory.mktemp("cache-model") / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)  # a copy: one test changes the model's files
    fleet = Fleet(model_dir, redis_server.url, tmp_path_factory.mktemp("cache-logs"))
    try:
        fleet.wait()
        yield fleet
    finally:
        codes = [p.stop() for p in [*fleet.apis, fleet.worker]]
        assert codes == [0, 0, 0], "\n".join(p.log()[-2000:] for p in [*fleet.apis, fleet.worker])


def _chat(url: str, content: str, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    body = {"model": "", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 12}
    body.update(fields)
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=60)


def _model(fleet: Fleet) -> dict[str, str]:
    return {"model": str(fleet.model_dir)}


def test_second_identical_request_is_a_hit_on_the_other_replica(fleet: Fleet) -> None:
    first = _chat(fleet.urls[0], "shared hit", **_model(fleet))
    added = fleet.jobs_added()
    second = _chat(fleet.urls[1], "shared hit", **_model(fleet), user="someone else")  # `user` is not in the key
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.headers["x-axion-cache"] == "miss" and second.headers["x-axion-cache"] == "hit"
    assert fleet.jobs_added() == added  # no job for the hit
    a, b = first.json(), second.json()
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]
    assert a["id"] != b["id"]
    assert second.headers["x-request-id"] in b["id"]


def test_output_changing_fields_miss(fleet: Fleet) -> None:
    base = _chat(fleet.urls[0], "fields", **_model(fleet))
    assert base.headers["x-axion-cache"] == "miss"
    for change in ({"max_tokens": 11}, {"stop": ["zz"]}, {"seed": 3}, {"n": 2}, {"logprobs": True},
                   {"presence_penalty": 0.5}):
        assert _chat(fleet.urls[1], "fields", **_model(fleet), **change).headers["x-axion-cache"] == "miss", change
    again = _chat(fleet.urls[1], "fields", **_model(fleet), max_completion_tokens=12)  # same limit, other spelling
    assert again.headers["x-axion-cache"] == "hit"


def test_policy_and_cache_control(fleet: Fleet) -> None:
    assert _chat(fleet.urls[0], "sampled", **_model(fleet), temperature=0.8).headers["x-axion-cache"] == "bypass"
    seeded = [_chat(fleet.urls[i], "seeded", **_model(fleet), temperature=0.8, seed=5) for i in (0, 1)]
    assert [r.headers["x-axion-cache"] for r in seeded] == ["miss", "hit"]
    assert seeded[0].json()["choices"] == seeded[1].json()["choices"]
    no_store = _chat(fleet.urls[0], "not stored", {"Cache-Control": "no-store"}, **_model(fleet))
    assert no_store.headers["x-axion-cache"] == "bypass"
    assert _chat(fleet.urls[0], "not stored", **_model(fleet)).headers["x-axion-cache"] == "miss"
    assert _chat(fleet.urls[0], "not stored", {"Cache-Control": "no-cache"},
                 **_model(fleet)).headers["x-axion-cache"] == "bypass"
    assert _chat(fleet.urls[1], "not stored", **_model(fleet)).headers["x-axion-cache"] == "hit"


def test_stream_replay_and_streamed_fill(fleet: Fleet) -> None:
    import openai

    clients = [openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) for url in fleet.urls]
    model, messages = str(fleet.model_dir), [{"role": "user", "content": "stream me"}]
    streamed = clients[0].chat.completions.with_raw_response.create(
        model=model, messages=messages, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True})
    assert streamed.headers["x-axion-cache"] == "miss"
    text, usage = "", None
    for chunk in streamed.parse():
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    whole = clients[1].chat.completions.with_raw_response.create(model=model, messages=messages, temperature=0,
                                                                 max_tokens=12)
    assert whole.headers["x-axion-cache"] == "hit"  # the streamed run filled the cache for the plain form
    assert whole.parse().choices[0].message.content == text
    assert usage is not None and whole.parse().usage.completion_tokens == usage.completion_tokens
    replayed = clients[1].chat.completions.with_raw_response.create(
        model=model, messages=messages, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True})
    assert replayed.headers["x-axion-cache"] == "hit"
    chunks = list(replayed.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.parse().choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == usage.total_tokens
    assert len({c.id for c in chunks}) == 1


def test_single_flight_twenty_identical_requests_generate_once(fleet: Fleet) -> None:
    added, done = fleet.jobs_added(), fleet.jobs_done()

    async def go() -> list[httpx.Response]:
        body = {"model": str(fleet.model_dir), "messages": [{"role": "user", "content": "all at once"}],
                "temperature": 0, "max_tokens": 48, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(http.post(f"{fleet.urls[i % 2]}/v1/chat/completions", json=body)
                                          for i in range(20)))

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 20
    assert sorted(r.headers["x-axion-cache"] for r in responses) == ["hit"] * 19 + ["miss"]
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1
    assert fleet.jobs_added() == added + 1
    assert fleet.jobs_done() == done + 1


def test_a_new_model_revision_misses(fleet: Fleet) -> None:
    assert _chat(fleet.urls[0], "revision", **_model(fleet)).headers["x-axion-cache"] == "miss"
    assert _chat(fleet.urls[1], "revision", **_model(fleet)).headers["x-axion-cache"] == "hit"
    old = {w["revision"] for w in get_json(f"{fleet.urls[0]}/health")["workers"]}
    assert fleet.worker.stop() == 0
    config = fleet.model_dir / "generation_config.json"
    os.utime(config, ns=(time.time_ns(), time.time_ns()))  # a redeployed model folder
    fleet.worker = fleet.start_worker()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the new worker's heartbeat (with its new revision) is up
        revisions = {w["revision"] for w in get_json(f"{fleet.urls[0]}/health")["workers"]}
        if revisions and not revisions & old:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no worker with a new revision: {old}\n{fleet.worker.log()[-2000:]}")
    time.sleep(0.6)  # the API's registry caches heartbeats for 0.5 s
    assert _chat(fleet.urls[1], "revision", **_model(fleet)).headers["x-axion-cache"] == "miss"
