"""The chat worker process: drain the model's stream in micro-batches, step the engine, publish events.

Delivery rule: a job's entry is XACKed (and XDELed, so XLEN counts only unanswered work) in the same pipeline
as, and after, the PUBLISH of its final event. A worker that dies before that leaves the entry pending in the
consumer group, where it can be reclaimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec
import psutil
import redis.asyncio as aioredis
import torch
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import keys
from common.protocol import Event, Failed, Tokenized, WorkerInfo, decode_job, encode
from common.settings import Settings
from workers.chat.engine import ChatEngine, Sequence

log = logging.getLogger("axion.worker")

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class ChatWorker:
    def __init__(self, settings: Settings, engine: ChatEngine, redis: aioredis.Redis, dtype: str) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.model_id = settings.model_id
        self.stream = keys.chat_stream(self.model_id)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.info = WorkerInfo(worker_id=self.worker_id, kind="chat", model=self.model_id,
                               device=str(engine.device), dtype=dtype, hostname=socket.gethostname(),
                               pid=os.getpid(), started=time.time(), max_batch_size=settings.max_batch_size)
        self.stopping = asyncio.Event()
        self.steps = 0
        # Every engine call runs on this one thread: torch's OpenMP keeps a thread team per calling thread, so
        # hopping across a thread pool (asyncio.to_thread) builds several spinning teams that fight for the cores.
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="axion-engine")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        await self._ensure_group()
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="axion-heartbeat")
        log.info("worker %s serving %s from stream %s", self.worker_id, self.model_id, self.stream)
        try:
            while not self.stopping.is_set() or self.engine.active:
                try:
                    if not self.stopping.is_set():
                        await self._read(block=self.engine.active == 0)
                    if self.engine.active:
                        await self._step()
                except REDIS_ERRORS as exc:
                    log.warning("Redis unavailable (%s); retrying in 1s", type(exc).__name__)
                    await asyncio.sleep(1.0)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await heartbeat
            with contextlib.suppress(*REDIS_ERRORS):
                await self.redis.delete(keys.worker_heartbeat(self.worker_id))
            self._torch_thread.shutdown(wait=False)
            log.info("worker %s stopped after %d steps: %d decode steps, mean batch %.2f, %d prompt tokens "
                     "computed, %d reused from the prefix cache", self.worker_id, self.steps,
                     self.engine.decode_steps, self.engine.decoded_tokens / max(1, self.engine.decode_steps),
                     self.engine.prefilled_tokens, self.engine.prefix_cache.reused_tokens)

    def stop(self) -> None:
        """Stop reading new jobs; the loop finishes the sequences in flight, then returns."""
        if not self.stopping.is_set():
            log.info("worker %s stopping: finishing %d sequences in flight", self.worker_id, self.engine.active)
        self.stopping.set()

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, keys.WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _heartbeat_loop(self) -> None:
        ttl = self.settings.heartbeat_ttl_s
        await self.redis.sadd(keys.KNOWN_MODELS, self.model_id)
        while True:
            self._refresh_stats()
            try:
                await self.redis.set(keys.worker_heartbeat(self.worker_id), encode(self.info), px=int(ttl * 1000))
            except REDIS_ERRORS as exc:
                log.warning("heartbeat failed (%s)", type(exc).__name__)
            await asyncio.sleep(ttl / 3)

    def _refresh_stats(self) -> None:
        info, engine = self.info, self.engine
        info.active_sequences = engine.active
        info.decode_steps, info.decoded_tokens = engine.decode_steps, engine.decoded_tokens
        info.prefilled_tokens = engine.prefilled_tokens
        info.kv_cache_bytes = engine.kv_bytes()
        info.prefix_cache_bytes = engine.prefix_cache.nbytes
        info.prefix_cache_hits = engine.prefix_cache.hits
        info.rss_bytes = psutil.Process().memory_info().rss
        info.weights_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        if engine.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(engine.device)
            info.device_memory_used_bytes, info.device_memory_total_bytes = total - free, total

    async def _read(self, block: bool) -> None:
        free = self.settings.max_batch_size - self.engine.active
        if free <= 0:
            return
        block_ms = max(1, self.settings.batch_timeout_ms) if block else None
        reply = await self.redis.xreadgroup(keys.WORKER_GROUP, self.worker_id, {self.stream: ">"},
                                            count=free, block=block_ms)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                await self._admit(entry_id, fields)

    async def _admit(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            job = decode_job(fields[b"job"])
        except (KeyError, msgspec.DecodeError) as exc:
            log.error("dropping unreadable entry %s: %s", entry_id, exc)
            await self._ack(self.redis.pipeline(transaction=False), entry_id).execute()
            return
        if job.v != 1:
            result: Sequence | Failed | Tokenized = Failed(status=400, message=f"unsupported job version {job.v}",
                                                           code="unsupported_job_version")
        elif job.task == "generate":
            result = self.engine.prepare(job)
        else:
            result = self.engine.tokenize(job)
        channel = keys.reply_channel(job.request_id)
        if isinstance(result, Failed | Tokenized):  # answered at once: publish, then acknowledge
            pipe = self.redis.pipeline(transaction=False).publish(channel, encode(result))
            await self._ack(pipe, entry_id).execute()
            return
        result.tag = entry_id
        await self.redis.publish(channel, encode(self.engine.add(result)))

    async def _step(self) -> None:
        """Prefill, publish (first tokens go out at once), decode, publish. The phases run strictly one after
        another: overlapping the stream read and publishing with the decode pass was measured slower (server
        at 64 streams: 457 against 511 tokens/s), as this loop's Python then competes with torch for the GIL."""
        if self.engine.pending:
            await self._publish(*await self._in_torch_thread(self.engine.prefill_step))
        if self.engine.rows:
            await self._publish(*await self._in_torch_thread(self.engine.decode_step))
        self.steps += 1

    async def _in_torch_thread(self, phase: Callable[[], list[tuple[Sequence, Event]]]) -> tuple[
            list[tuple[Sequence, Event]], list[Sequence]]:
        """Run an engine phase on the torch thread; return its events and the sequences that left the batch."""
        def run() -> tuple[list[tuple[Sequence, Event]], list[Sequence]]:
            events = phase()
            released, self.engine.released = self.engine.released, []
            return events, released

        try:
            return await asyncio.get_running_loop().run_in_executor(self._torch_thread, run)
        except Exception:
            log.exception("engine step failed; failing the %d sequences in the batch", self.engine.active)
            failure = Failed(status=500, message="The model failed while generating.", type="server_error",
                             code="engine_error")
            dropped = self.engine.reset()
            released, self.engine.released = self.engine.released + dropped, []
            return [(seq, failure) for seq in dropped], released

    async def _publish(self, events: list[tuple[Sequence, Event]], released: list[Sequence]) -> None:
        """Events first, then XACK + XDEL of the jobs that are done, in one pipeline (in that order)."""
        pipe = self.redis.pipeline(transaction=False)
        for seq, event in events:
            pipe.publish(keys.reply_channel(seq.request_id), encode(event))
        for seq in released:
            seq.group.left -= 1
            if seq.group.left == 0:  # every choice of the request is done
                self._ack(pipe, seq.tag)
        if events or released:
            await pipe.execute()

    def _ack(self, pipe: aioredis.client.Pipeline, entry_id: bytes) -> aioredis.client.Pipeline:
        pipe.xack(self.stream, keys.WORKER_GROUP, entry_id)
        pipe.xdel(self.stream, entry_id)
        return pipe


async def serve_worker(settings: Settings) -> None:
    from workers.chat.loader import load_causal_lm

    loaded = await asyncio.to_thread(load_causal_lm, settings.model_name, settings.device)
    engine = ChatEngine(loaded.model, loaded.tokenizer, loaded.device, settings.max_seq_len,
                        prefill_chunk_tokens=settings.prefill_chunk_tokens,
                        prefix_cache_tokens=settings.prefix_cache_tokens)
    redis = aioredis.from_url(settings.redis_url or "redis://127.0.0.1:6379/0", health_check_interval=30)
    try:
        await ChatWorker(settings, engine, redis, str(loaded.dtype).removeprefix("torch.")).run()
    finally:
        await redis.aclose()


__all__ = ["ChatWorker", "serve_worker"]
