"""EXTERNAL_ENGINE_UNSUPPORTED=native: the requests the engine cannot serve (EXTERNAL_ENGINE_LACKS) run on the
native engine inside the same worker, loaded at the first such request and run one request at a time (the
engine keeps the bulk of the traffic; this path exists so `n>1` or `response_format` still get an answer)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from common import keys
from common.protocol import ChatJob, Failed, encode
from common.settings import Settings
from workers import model_thread

log = logging.getLogger("axion.worker")


class NativeFallback:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Any = None
        self._lock = asyncio.Lock()

    async def answer(self, redis: aioredis.Redis, job: ChatJob, stop_now: Callable[[], Awaitable[bool]]) -> None:
        """Generate `job` natively, publishing every event as it comes (the caller acknowledges the entry)."""
        async with self._lock:
            engine = self._engine or await model_thread.run(self._load)
            channel = keys.reply_channel(job.request_id)
            seq = engine.prepare(job)
            if isinstance(seq, Failed):
                await redis.publish(channel, encode(seq))
                return
            await redis.publish(channel, encode(engine.add(seq)))
            while engine.active:
                events = await model_thread.run(engine.step)
                engine.released = []
                pipe = redis.pipeline(transaction=False)
                for _seq, event in events:
                    pipe.publish(channel, encode(event))
                await pipe.execute()
                if await stop_now():
                    engine.cancel(job.request_id)

    def _load(self) -> Any:
        from workers.chat.engine import ChatEngine
        from workers.chat.loader import load_causal_lm

        log.info("loading %s natively for the requests its engine cannot serve", self.settings.model_name)
        loaded = load_causal_lm(self.settings.model_name, self.settings.device, dtype_name=self.settings.dtype)
        self._engine = ChatEngine(loaded.model, loaded.tokenizer, loaded.device, self.settings.max_seq_len,
                                  prefill_chunk_tokens=self.settings.prefill_chunk_tokens, prefix_cache_tokens=0)
        return self._engine

    def close(self) -> None:
        self._engine = None  # the model thread is the process's (workers/model_thread.py) and outlives this
