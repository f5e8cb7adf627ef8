"""The chat worker process: drain the model's stream in micro-batches, step the engine, publish events.

Delivery rule: a job's entry is XACKed (and XDELed, so XLEN counts only unanswered work) in the same pipeline
as, and after, the PUBLISH of its final event. A worker that dies before that leaves the entry pending in the
consumer group, where it can be reclaimed.
"""

from __future__ import annotations

import logging
import time

import msgspec
import redis.asyncio as aioredis

from common import keys
from common.protocol import ChatJob, Event, Failed, Tokenized, decode_job, encode
from common.redis_cluster import is_cluster, publish
from common.settings import Settings
from workers.chat.backend import ChatBackend
from workers.chat.sequence import Sequence
from workers.chat.step_publish import hold_back, queue_step
from workers.stream_worker import Entry, StreamWorker

log = logging.getLogger("axion.worker")
ONLINE_QUIET_S = 1.0  # batch lines take more than BATCH_SLOTS_BESIDE_ONLINE slots only after this long without online


class ChatWorker(StreamWorker):
    def __init__(self, settings: Settings, backend: ChatBackend, redis: aioredis.Redis) -> None:
        super().__init__(settings, redis, kind="chat", model_id=settings.model_id,
                         stream=keys.chat_stream(settings.model_id), device=backend.device, dtype=backend.dtype,
                         revision=backend.revision)
        self.backend = backend
        self.info.vocab_size = backend.vocab_size
        self.info.backend = backend.name
        self.steps = 0
        self._online_at = float("-inf")  # when an online request last ran here (batch lines yield to them)

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            await self.backend.close()

    def keep_running(self) -> bool:
        """Once stopping, the sequences in flight still finish."""
        return not self.stopping.is_set() or self.backend.active > 0

    async def iteration(self) -> None:
        if (free := self._free_slots()) > 0:  # free slots go first to the jobs of workers that stopped
            await self._admit_all(*await self.take_over_due(free))
        if not self.backend.active and (free := self._free_slots()) > 0:
            # Online first (with the rest of a burst that is still arriving), then batch lines, then wait.
            await self._admit_all(await self.read_burst(free, block=False))
            await self._admit_batch()
            if not self.backend.active:
                await self._admit_all(await self.read_burst(free))
        if self.backend.active:
            await self._step()

    def on_stop(self) -> None:
        log.info("worker %s stopped after %d steps: %s", self.worker_id, self.steps, self.backend.summary())

    def refresh_stats(self) -> None:
        super().refresh_stats()
        self.backend.stats(self.info)

    def _free_slots(self) -> int:
        return 0 if self.stopping.is_set() else self.settings.max_batch_size - self.backend.active

    async def _admit_batch(self) -> None:
        """Batch lines, after the online read, only into slots online left free, less BATCH_RESERVED_SLOTS kept
        open so an online request arriving meanwhile starts at the next step; and while online traffic runs (or
        ran less than ONLINE_QUIET_S ago), at most BATCH_SLOTS_BESIDE_ONLINE batch lines at once, so online
        steps stay about as short as without the batch. None while an online prompt waits for its prefill (it
        would share that forward pass), and online prompts go first in the prefill queue: a batch line holds
        an online request back by at most the step under way."""
        pending, now = self.backend.pending, time.monotonic()
        running = self.backend.running()
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
        return list({seq.tag for seq in self.backend.running() if seq.tag is not None})

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
            result = self.backend.prepare(job)
        else:
            result = self.backend.tokenize(job)
        channel = keys.reply_channel(job.request_id)
        if isinstance(result, Failed | Tokenized):  # answered at once: publish, then acknowledge
            self.ack(publish(pipe, channel, encode(result)), entry_id)
            return
        result.tag = entry_id
        for seq, done in zip([result, *result.siblings], progress, strict=False):
            seq.resume = done
        publish(pipe, channel, encode(self.backend.add(result)))


    async def _step(self) -> None:
        """One step of the backend; when it read no new jobs itself (nothing left decoding), read them here."""
        if not await self.backend.step(self._publish) and (free := self._free_slots()) > 0:
            await self._admit_all(await self.read(free, block=False))
            await self._admit_batch()
        self.steps += 1

    def _running_requests(self) -> list[str]:
        """The requests running here, in order; one whose deadline has passed is cancelled (the engine stops it)."""
        now, running = time.time(), set()
        for seq in self.backend.running():
            if seq.group.deadline is not None and seq.group.deadline < now and not seq.cancelled:
                log.info("request %s: deadline passed while generating; stopping it", seq.request_id)
                self.backend.cancel(seq.request_id)
            running.add(seq.request_id)
        return sorted(running)

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
        running = self._running_requests() if read else []
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
                        self.backend.cancel(request_id)
            if free > 0:
                await self._admit_all(self.entries(replies[-1]))
                await self._admit_batch()


__all__ = ["ChatWorker"]
