"""The chat worker process: drain the model's stream in micro-batches, step the engine, publish events.

Delivery rule: a job's entry is XACKed (and XDELed, so XLEN counts only unanswered work) in the same pipeline
as, and after, the PUBLISH of its final event. A worker that dies before that leaves the entry pending in the
consumer group, where it can be reclaimed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec
import redis.asyncio as aioredis
import torch

from common import keys, redis_client
from common.protocol import Event, Failed, Tokenized, decode_job, encode
from common.settings import Settings
from workers.chat.engine import ChatEngine, Sequence
from workers.revision import model_revision
from workers.stream_worker import StreamWorker

log = logging.getLogger("axion.worker")


class ChatWorker(StreamWorker):
    def __init__(self, settings: Settings, engine: ChatEngine, redis: aioredis.Redis, dtype: str) -> None:
        revision = model_revision(settings.model_name, getattr(engine.model.config, "_commit_hash", None))
        super().__init__(settings, redis, kind="chat", model_id=settings.model_id,
                         stream=keys.chat_stream(settings.model_id), device=str(engine.device), dtype=dtype,
                         revision=revision)
        self.engine = engine
        self.steps = 0
        # Every engine call runs on this one thread: torch's OpenMP keeps a thread team per calling thread, so
        # hopping across a thread pool (asyncio.to_thread) builds several spinning teams that fight for the cores.
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="axion-engine")

    def keep_running(self) -> bool:
        """Once stopping, the sequences in flight still finish."""
        return not self.stopping.is_set() or self.engine.active > 0

    async def iteration(self) -> None:
        if not self.engine.active and (free := self._free_slots()) > 0:
            await self._admit_all(await self.read_burst(free))
        if self.engine.active:
            await self._step()

    def on_stop(self) -> None:
        self._torch_thread.shutdown(wait=False)
        engine = self.engine
        log.info("worker %s stopped after %d steps: %d decode steps, mean batch %.2f, %d prompt tokens "
                 "computed, %d reused from the prefix cache", self.worker_id, self.steps, engine.decode_steps,
                 engine.decoded_tokens / max(1, engine.decode_steps), engine.prefilled_tokens,
                 engine.prefix_cache.reused_tokens)

    def refresh_stats(self) -> None:
        super().refresh_stats()
        info, engine = self.info, self.engine
        info.active_sequences = engine.active
        info.decode_steps, info.decoded_tokens = engine.decode_steps, engine.decoded_tokens
        info.prefilled_tokens = engine.prefilled_tokens
        info.kv_cache_bytes = engine.kv_bytes()
        info.prefix_cache_bytes = engine.prefix_cache.nbytes
        info.prefix_cache_hits = engine.prefix_cache.hits
        info.weights_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        if engine.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(engine.device)
            info.device_memory_used_bytes, info.device_memory_total_bytes = total - free, total

    def _free_slots(self) -> int:
        return 0 if self.stopping.is_set() else self.settings.max_batch_size - self.engine.active


    async def _admit_all(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Answer or enqueue each entry; their first events go out in one pipeline."""
        if entries:
            pipe = self.redis.pipeline(transaction=False)
            for entry_id, fields in entries:
                self._admit(pipe, entry_id, fields)
            await pipe.execute()

    def _admit(self, pipe: aioredis.client.Pipeline, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            job = decode_job(fields[b"job"])
        except (KeyError, msgspec.DecodeError) as exc:
            log.error("dropping unreadable entry %s: %s", entry_id, exc)
            self.ack(pipe, entry_id)
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
            self.ack(pipe.publish(channel, encode(result)), entry_id)
            return
        result.tag = entry_id
        pipe.publish(channel, encode(self.engine.add(result)))

    async def _step(self) -> None:
        """Prefill, publish (first tokens go out at once), decode, publish. The phases run strictly one after
        another: overlapping the stream read and publishing with the decode pass was measured slower (server
        at 64 streams: 457 against 511 tokens/s), as this loop's Python then competes with torch for the GIL."""
        if self.engine.pending:
            await self._publish(*await self._in_torch_thread(self.engine.prefill_step))
        if self.engine.rows:
            await self._publish(*await self._in_torch_thread(self.engine.decode_step), read=True)
        elif (free := self._free_slots()) > 0:
            await self._admit_all(await self.read(free, block=False))
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

    async def _publish(self, events: list[tuple[Sequence, Event]], released: list[Sequence],
                       read: bool = False) -> None:
        """Events first, then XACK + XDEL of the jobs that are done, in one pipeline (in that order). With
        `read`, the same round trip also reads new jobs for the slots that are free once the released leave."""
        pipe = self.redis.pipeline(transaction=False)
        for seq, event in events:
            pipe.publish(keys.reply_channel(seq.request_id), encode(event))
        for seq in released:
            seq.group.left -= 1
            if seq.group.left == 0:  # every choice of the request is done
                self.ack(pipe, seq.tag)
        free = self._free_slots() if read else 0
        if free > 0:
            self.read_in(pipe, free)
        if events or released or free > 0:
            replies = await pipe.execute()
            if free > 0:
                await self._admit_all(self.entries(replies[-1]))


async def serve_worker(settings: Settings) -> None:
    from workers.chat.loader import load_causal_lm

    loaded = await asyncio.to_thread(load_causal_lm, settings.model_name, settings.device)
    engine = ChatEngine(loaded.model, loaded.tokenizer, loaded.device, settings.max_seq_len,
                        prefill_chunk_tokens=settings.prefill_chunk_tokens,
                        prefix_cache_tokens=settings.prefix_cache_tokens)
    redis = redis_client.connect(settings, block_ms=settings.batch_timeout_ms)
    try:
        await ChatWorker(settings, engine, redis, str(loaded.dtype).removeprefix("torch.")).run()
    finally:
        await redis.aclose()


__all__ = ["ChatWorker", "serve_worker"]
