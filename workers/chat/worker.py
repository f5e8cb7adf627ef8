"""The chat worker process: drain the model's stream in micro-batches, step the engine, publish events.

Delivery rule: a job's entry is XACKed (and XDELed, so XLEN counts only unanswered work) in the same pipeline
as, and after, the PUBLISH of its final event. A worker that dies before that leaves the entry pending in the
consumer group, where it can be reclaimed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
import torch

from common import keys, redis_client
from common.protocol import ChatJob, Event, Failed, Tokenized, decode_job, encode
from common.redis_cluster import is_cluster, publish
from common.settings import Settings
from workers import model_thread
from workers.chat.engine import ChatEngine, Sequence
from workers.chat.quantize import weight_bytes
from workers.chat.step_publish import hold_back, queue_step
from workers.revision import load_variant, model_revision
from workers.stream_worker import Entry, StreamWorker

log = logging.getLogger("axion.worker")
ONLINE_QUIET_S = 1.0  # batch lines take more than BATCH_SLOTS_BESIDE_ONLINE slots only after this long without online


class ChatWorker(StreamWorker):
    def __init__(self, settings: Settings, engine: ChatEngine, redis: aioredis.Redis, dtype: str) -> None:
        revision = model_revision(settings.model_name, getattr(engine.model.config, "_commit_hash", None)) + \
            load_variant(settings.model_gguf_file, settings.quantization)
        super().__init__(settings, redis, kind="chat", model_id=settings.model_id,
                         stream=keys.chat_stream(settings.model_id), device=str(engine.device), dtype=dtype,
                         revision=revision)
        self.engine = engine
        self.info.vocab_size = engine.vocab_size
        self.steps = 0
        self._online_at = float("-inf")  # when an online request last ran here (batch lines yield to them)

    def keep_running(self) -> bool:
        """Once stopping, the sequences in flight still finish."""
        return not self.stopping.is_set() or self.engine.active > 0

    async def iteration(self) -> None:
        if (free := self._free_slots()) > 0:  # free slots go first to the jobs of workers that stopped
            await self._admit_all(*await self.take_over_due(free))
        if not self.engine.active and (free := self._free_slots()) > 0:
            # Online first (with the rest of a burst that is still arriving), then batch lines, then wait.
            await self._admit_all(await self.read_burst(free, block=False))
            await self._admit_batch()
            if not self.engine.active:
                await self._admit_all(await self.read_burst(free))
        if self.engine.active:
            await self._step()

    def on_stop(self) -> None:
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
        info.weights_bytes = weight_bytes(engine.model)  # quantized weights counted as stored
        if engine.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(engine.device)
            info.device_memory_used_bytes, info.device_memory_total_bytes = total - free, total

    def _free_slots(self) -> int:
        return 0 if self.stopping.is_set() else self.settings.max_batch_size - self.engine.active

    async def _admit_batch(self) -> None:
        """Batch lines, after the online read, only into slots online left free, less BATCH_RESERVED_SLOTS kept
        open so an online request arriving meanwhile starts at the next step; and while online traffic runs (or
        ran less than ONLINE_QUIET_S ago), at most BATCH_SLOTS_BESIDE_ONLINE batch lines at once, so online
        steps stay about as short as without the batch. None while an online prompt waits for its prefill (it
        would share that forward pass), and online prompts go first in the prefill queue: a batch line holds
        an online request back by at most the step under way."""
        pending, now = self.engine.pending, time.monotonic()
        running = self.engine.rows + pending
        batch_running = sum(1 for seq in running if self.is_batch(seq.tag))
        if batch_running < len(running):
            self._online_at = now
        if any(not self.is_batch(seq.tag) for seq in pending):
            pending.sort(key=lambda seq: self.is_batch(seq.tag))
            return
        cap = (self.settings.batch_slots_beside_online if now - self._online_at < ONLINE_QUIET_S
               else self.settings.max_batch_size)
        room = min(self._free_slots() - self.settings.batch_reserved_slots, cap - batch_running)
        if room > 0 and (entries := await self.read_batch(room)):
            await self._admit_all(entries)

    def in_flight(self) -> list[bytes]:
        return list({seq.tag for seq in self.engine.rows + self.engine.pending if seq.tag is not None})

    async def _admit_all(self, entries: list[Entry], deliveries: list[int] | None = None) -> None:
        """Answer or enqueue each entry; their first events go out in one pipeline. A job whose client has
        gone is dropped, one past its deadline refused (504); a job taken over from a dead worker resumes from
        the tokens that worker recorded, and one delivered too often goes to the dead-letter stream."""
        if not entries:
            return
        jobs: list[tuple[bytes, dict[bytes, bytes], ChatJob | None, int]] = []
        pipe = self.redis.pipeline(transaction=False)
        for k, (entry_id, fields) in enumerate(entries):
            try:
                job: ChatJob | None = decode_job(fields[b"job"])
            except (KeyError, msgspec.DecodeError) as exc:
                log.error("dropping unreadable entry %s: %s", entry_id, exc)
                job = None
            jobs.append((entry_id, fields, job, deliveries[k] if deliveries else 1))
            if job is not None:
                pipe.exists(keys.cancel_flag(job.request_id))
                for i in range(job.n if deliveries else 0):
                    pipe.lrange(keys.progress(job.request_id, i), 0, -1)
        replies = iter(await pipe.execute())
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, fields, job, delivered in jobs:
            if job is None:
                self.ack(pipe, entry_id)
                continue
            cancelled = bool(next(replies))
            progress = [[int(t) for t in next(replies)] for _ in range(job.n if deliveries else 0)]
            if cancelled:
                self.ack(pipe, entry_id)
            elif not self.give_up_if_spent(pipe, entry_id, fields, job.request_id, job.model, delivered):
                self._admit(pipe, entry_id, job, progress)
        await pipe.execute()

    def _admit(self, pipe: aioredis.client.Pipeline, entry_id: bytes, job: ChatJob, progress: list[list[int]]) -> None:
        if job.v != 1:
            result: Sequence | Failed | Tokenized = Failed(status=400, message=f"unsupported job version {job.v}",
                                                           code="unsupported_job_version")
        elif job.deadline is not None and job.deadline < time.time():
            result = Failed(status=504, type="timeout", code="timeout",
                            message="The request's deadline passed while it waited for a worker.")
        elif job.task == "generate":
            result = self.engine.prepare(job)
        else:
            result = self.engine.tokenize(job)
        channel = keys.reply_channel(job.request_id)
        if isinstance(result, Failed | Tokenized):  # answered at once: publish, then acknowledge
            self.ack(publish(pipe, channel, encode(result)), entry_id)
            return
        result.tag = entry_id
        for seq, done in zip([result, *result.siblings], progress, strict=False):
            seq.resume = done
        publish(pipe, channel, encode(self.engine.add(result)))


    async def _step(self) -> None:
        """Prefill, publish (first tokens go out at once), decode, publish. The phases run strictly one after
        another: overlapping the stream read and publishing with the decode pass was measured slower (server
        at 64 streams: 457 against 511 tokens/s), as this loop's Python then competes with torch for the GIL
        and the cores; measured again at 16 streams in bf16 (session 5): the model's step grew from 15.2 to
        16.5 ms when the publish ran beside it, about what the ~1.5 ms publish had cost in line. Session 11 sent
        the step's pipeline behind the next step (its reply applied between steps): the time between two 16-row
        steps fell from 1.6-2.2 to 1.0-1.2 ms, but the new jobs it read joined a step later (C=64 TTFT p50 +120
        ms), a blocking read kept out during the step for them still left +40-70 ms, and throughput stayed
        within noise at C=16 and C=64; not adopted (bench/RESULTS.md, session 11)."""
        if self.engine.pending:
            await self._publish(*await self._in_model_thread(self.engine.prefill_step))
        if self.engine.rows:
            await self._publish(*await self._in_model_thread(self.engine.decode_step), read=True)
        elif (free := self._free_slots()) > 0:
            await self._admit_all(await self.read(free, block=False))
            await self._admit_batch()
        self.steps += 1

    async def _in_model_thread(self, phase: Callable[[], list[tuple[Sequence, Event]]]) -> tuple[
            list[tuple[Sequence, Event]], list[Sequence]]:
        """Run an engine phase on the model thread (`workers/model_thread.py`); return its events and the
        sequences that left the batch."""
        def run() -> tuple[list[tuple[Sequence, Event]], list[Sequence]]:
            events = phase()
            released, self.engine.released = self.engine.released, []
            return events, released

        try:
            return await model_thread.run(run)
        except Exception:
            log.exception("engine step failed; failing the %d sequences in the batch", self.engine.active)
            failure = Failed(status=500, message="The model failed while generating.", type="server_error",
                             code="engine_error")
            dropped = self.engine.reset()
            released, self.engine.released = self.engine.released + dropped, []
            return [(seq, failure) for seq in dropped], released

    async def _publish(self, events: list[tuple[Sequence, Event]], released: list[Sequence],
                       read: bool = False) -> None:
        """One pipeline, in this order: each sequence's new tokens onto its progress list (so a worker that
        takes the job over resumes from them), the events, XACK + XDEL of the jobs that are done (and their
        progress lists dropped). With `read`, the same round trip also reads new jobs for the free slots and
        checks the cancel flags of the running requests."""
        pipe = self.redis.pipeline(transaction=False)
        events = hold_back(events, self.settings.stream_interval)
        queue_step(pipe, events, int(self.settings.request_timeout_s) + 60)
        for seq in released:
            seq.group.left -= 1
            if seq.group.left == 0:  # every choice of the request is done
                self.ack(pipe, seq.tag)
                pipe.delete(*(keys.progress(seq.request_id, i) for i in range(seq.group.size)))
        running = sorted({seq.request_id for seq in self.engine.rows + self.engine.pending}) if read else []
        per_key = is_cluster(pipe)  # in a Redis Cluster the flags live in many slots: one GET each, not one MGET
        if running:
            flag_keys = [keys.cancel_flag(r) for r in running]
            if per_key:
                for key in flag_keys:
                    pipe.get(key)
            else:
                pipe.mget(flag_keys)
        free = self._free_slots() if read else 0
        if free > 0:
            self.read_in(pipe, free)
        if events or released or free > 0 or running:
            replies = await pipe.execute()
            if running:
                end = len(replies) - (1 if free > 0 else 0)
                flags = replies[end - len(running):end] if per_key else replies[end - 1]
                for request_id, flag in zip(running, flags, strict=True):
                    if flag:
                        self.engine.cancel(request_id)
            if free > 0:
                await self._admit_all(self.entries(replies[-1]))
                await self._admit_batch()


async def serve_worker(settings: Settings) -> None:
    """One native chat worker for MODEL_NAME, built as `axion worker` builds it (`workers/loading.py`) but without
    the hot-swap host, so several can share one process (tests/worker_host.py)."""
    from workers import loading

    redis = redis_client.connect(settings, block_ms=settings.batch_timeout_ms)
    try:
        worker = await model_thread.run(loading.open_chat, settings, redis, settings.model_name,
                                         settings.served_model_name)
        await worker.run()
    finally:
        await redis.aclose()


__all__ = ["ChatWorker", "serve_worker"]
