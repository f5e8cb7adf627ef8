"""The embedding worker on a real Redis with a stand-in backend that records its calls: jobs that wait in the
stream share one model call with cross-request batching, and get one call each without it (the switch of
bench/embed_bench.py's "batching off" row, which once read up to 256 jobs into one call regardless)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from common import keys
from common.protocol import Embedded, EmbedJob, decode_event, encode
from common.redis_server import EmbeddedRedis
from common.settings import load_settings
from workers.embed.worker import EmbedWorker

MODEL = "stand-in-embedder"


class CountingBackend:
    """What EmbedWorker asks of a backend; each text's vector is its length, so answers can be checked."""

    model_id, dim, max_tokens = MODEL, 4, 64

    def __init__(self) -> None:
        self.calls: list[int] = []

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return np.array([[len(t), 0, 0, 0] for t in texts], dtype=np.float32)


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.mark.parametrize("batching", [True, False])
def test_waiting_jobs_share_a_call_only_with_cross_request_batching(own_redis: EmbeddedRedis, batching: bool) -> None:
    async def scenario() -> tuple[list[int], list[Embedded]]:
        redis = aioredis.from_url(own_redis.url)
        settings = load_settings({"REDIS_URL": own_redis.url, "BATCH_TIMEOUT_MS": "20",
                                  "EMBED_CROSS_REQUEST_BATCHING": str(batching).lower()})
        backend = CountingBackend()
        worker = EmbedWorker(settings, backend, redis, "embed")
        worker.handles_signals = False
        texts = [f"sentence {'word ' * i}" for i in range(8)]
        pubsub = redis.pubsub()
        await pubsub.subscribe(*(keys.reply_channel(f"r{i}") for i in range(8)))
        await worker._ensure_group()
        for i, text in enumerate(texts):  # all queued before the worker reads
            job = EmbedJob(request_id=f"r{i}", model=MODEL, texts=[text], created=0.0)
            await redis.xadd(keys.embed_stream(MODEL), {b"job": encode(job)})
        run = asyncio.create_task(worker.run())
        answers: dict[str, Embedded] = {}
        try:
            async with asyncio.timeout(20):
                while len(answers) < 8:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message:
                        answers[message["channel"].decode()] = decode_event(message["data"])
        finally:
            worker.stop()
            await asyncio.wait_for(run, 10)
        assert await redis.xlen(keys.embed_stream(MODEL)) == 0  # every job acknowledged and deleted
        await pubsub.aclose()
        await redis.aclose()
        return backend.calls, [answers[keys.reply_channel(f"r{i}")] for i in range(8)]

    calls, answers = asyncio.run(scenario())
    for i, answer in enumerate(answers):
        assert isinstance(answer, Embedded)
        assert np.frombuffer(answer.vectors, dtype="<f4")[0] == len(f"sentence {'word ' * i}")
    assert sum(calls) == 8
    assert calls == ([8] if batching else [1] * 8)
