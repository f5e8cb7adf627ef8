"""What every worker kind shares: a consumer group on its model's stream, a heartbeat key, a graceful stop.

Delivery rule for every kind: an entry is XACKed (and XDELed, so XLEN counts only unanswered work) in the same
pipeline as, and after, the PUBLISH of its final event. A worker that dies before that leaves the entry pending
in the consumer group, where it can be reclaimed.
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
from typing import Literal

import psutil
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import heartbeat as heartbeat_keys
from common import keys
from common.protocol import WorkerInfo
from common.settings import Settings
from workers.recovery import Entry, dead_letter, read_entries, refresh_own, take_over

log = logging.getLogger("axion.worker")

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
GATHER_GAP_MS = 3  # an idle worker that got a job keeps reading while the next arrives within this gap
#: Entry ids read from the batch stream carry this prefix, so `ack` and the heartbeat know their stream.
BATCH_TAG = b"batch:"
BATCH_POLL_S = 0.1  # after an empty read of the batch stream, it is not read again for this long


class StreamWorker:
    def __init__(self, settings: Settings, redis: aioredis.Redis, *, kind: Literal["chat", "embed", "rerank"],
                 model_id: str, stream: str, device: str, dtype: str, revision: str = "") -> None:
        self.settings = settings
        self.redis = redis
        self.model_id = model_id
        self.stream = stream
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.info = WorkerInfo(worker_id=self.worker_id, kind=kind, model=model_id, device=device, dtype=dtype,
                               hostname=socket.gethostname(), pid=os.getpid(), started=time.time(),
                               max_batch_size=settings.max_batch_size, revision=revision)
        self.stopping = asyncio.Event()
        self._last_takeover = float("-inf")
        self.batch_stream = keys.batch_stream(kind, model_id)  # low priority: only slots online leaves free
        self._batch_empty_at = float("-inf")
        self.handles_signals = True  # False under workers/host.py, which owns SIGTERM for the whole process
        self.withdrawn = False  # no longer announced: the heartbeat only keeps the in-flight jobs alive
        self._beat_lock = asyncio.Lock()

    async def iteration(self) -> None:
        """One turn of the loop: read, work, publish. Redis errors are retried by `run`."""
        raise NotImplementedError

    def keep_running(self) -> bool:
        return not self.stopping.is_set()

    def on_stop(self) -> None:
        """Called once the loop has ended (release resources, log totals)."""

    def refresh_stats(self) -> None:
        self.info.rss_bytes = psutil.Process().memory_info().rss

    def in_flight(self) -> list[bytes]:
        """Entry ids this worker has read and not yet acknowledged (kept alive by the heartbeat)."""
        return []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT) if self.handles_signals else ():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="axion-heartbeat")
        if self.model_id:
            log.info("worker %s serving %s from stream %s", self.worker_id, self.model_id, self.stream)
        else:
            log.info("worker %s idle (serves no model) %s", self.worker_id, self.info.loading and
                     f"while it loads {self.info.loading}")
        group_ready = False
        try:
            while self.keep_running():
                try:
                    if not group_ready:
                        await self._ensure_group()
                        group_ready = True
                    await self.iteration()
                except REDIS_ERRORS as exc:
                    log.warning("Redis unavailable (%s); retrying in 1s", type(exc).__name__)
                    await asyncio.sleep(1.0)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    # Redis came back without its data (no persistence): the stream and group are gone.
                    log.warning("consumer group missing on %s (Redis restarted empty?); recreating it", self.stream)
                    group_ready = False
        finally:
            heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await heartbeat
            with contextlib.suppress(*REDIS_ERRORS):
                await heartbeat_keys.remove(self.redis.pipeline(transaction=False), self.worker_id).execute()
            self.on_stop()

    def stop(self) -> None:
        """Stop reading new jobs; the loop finishes the work in flight, then returns."""
        if not self.stopping.is_set():
            log.info("worker %s stopping", self.worker_id)
        self.stopping.set()

    def rename(self, worker_id: str) -> None:
        """Take over a stable id (before `run`): a host keeps one id across the models it loads in turn."""
        self.worker_id = self.info.worker_id = worker_id

    async def withdraw(self) -> None:
        """Stop announcing the model now (heartbeat key and index entry removed) while the loop keeps running:
        the API stops routing here before the worker drains. In-flight jobs are still kept alive by the beat."""
        async with self._beat_lock:
            self.withdrawn = True
            with contextlib.suppress(*REDIS_ERRORS):
                await heartbeat_keys.remove(self.redis.pipeline(transaction=False), self.worker_id).execute()

    async def _ensure_group(self) -> None:
        for stream in (self.stream, self.batch_stream):
            try:
                await self.redis.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _heartbeat_loop(self) -> None:
        """Beat every HEARTBEAT_TTL_S / 3 for as long as the worker runs; a failed beat (Redis down) is logged
        and the next one tries again, so the worker reappears by itself when Redis does."""
        interval = self.settings.heartbeat_ttl_s / 3
        self.info.beat_interval_s = interval
        process = psutil.Process()
        process.cpu_percent()  # the first call only starts the measurement
        last = (time.monotonic(), self.info.decoded_tokens, self.info.jobs_done)

        while True:
            self.refresh_stats()
            now, info = time.monotonic(), self.info
            elapsed = max(1e-3, now - last[0])
            info.tokens_per_s = round((info.decoded_tokens - last[1]) / elapsed, 1)
            info.jobs_per_s = round((info.jobs_done - last[2]) / elapsed, 2)
            info.cpu_percent = process.cpu_percent()
            last = (now, info.decoded_tokens, info.jobs_done)
            info.beat_at = time.time()
            try:
                async with self._beat_lock:
                    if not self.withdrawn:
                        pipe = heartbeat_keys.write(self.redis.pipeline(transaction=False), info,
                                                    self.settings.heartbeat_ttl_s)
                        await pipe.execute()
                for stream, ids in self.by_stream(self.in_flight()).items():
                    await refresh_own(self.redis, stream, self.worker_id, ids)
            except REDIS_ERRORS as exc:
                log.warning("heartbeat failed (%s)", type(exc).__name__)
            except Exception:  # never let the heartbeat die quietly: the fleet would think this worker dead
                log.exception("heartbeat failed")
            await asyncio.sleep(interval)

    async def take_over_due(self, count: int) -> tuple[list[Entry], list[int]]:
        """Every VISIBILITY_TIMEOUT_S / 3, up to `count` jobs of workers that stopped before answering them,
        with how often each has been delivered (see workers/recovery.py)."""

        now = time.monotonic()
        if count <= 0 or now - self._last_takeover < self.settings.visibility_timeout_s / 3:
            return [], []
        self._last_takeover = now
        idle_ms = int(self.settings.visibility_timeout_s * 1000)
        claimed = await take_over(self.redis, self.stream, self.worker_id, idle_ms, count)
        if len(claimed) < count:  # then batch lines a dead worker left
            claimed += [((BATCH_TAG + entry_id, fields), delivered) for (entry_id, fields), delivered in
                        await take_over(self.redis, self.batch_stream, self.worker_id, idle_ms, count - len(claimed))]
        return [entry for entry, _ in claimed], [delivered for _, delivered in claimed]

    def give_up_if_spent(self, pipe: aioredis.client.Pipeline, entry_id: bytes, fields: dict[bytes, bytes],
                         request_id: str, model: str, delivered: int) -> bool:
        """A job delivered more than MAX_DELIVERIES times goes to the dead-letter stream, its client is told,
        and the entry is acknowledged; True when that happened."""

        if delivered <= self.settings.max_deliveries:
            return False
        dead_letter(pipe, keys.dead_letter_stream(self.info.kind, model), fields, request_id, delivered)
        self.ack(pipe, entry_id)
        return True

    def ack(self, pipe: aioredis.client.Pipeline, entry_id: bytes) -> aioredis.client.Pipeline:
        self.info.jobs_done += 1
        ((stream, (raw_id,)),) = self.by_stream([entry_id]).items()
        pipe.xack(stream, keys.WORKER_GROUP, raw_id)
        pipe.xdel(stream, raw_id)
        return pipe

    def by_stream(self, entry_ids: list[bytes]) -> dict[str, list[bytes]]:
        """Entry ids grouped by the stream they came from, as that stream knows them (the batch tag removed)."""
        grouped: dict[str, list[bytes]] = {}
        for entry_id in entry_ids:
            if entry_id.startswith(BATCH_TAG):
                grouped.setdefault(self.batch_stream, []).append(entry_id[len(BATCH_TAG):])
            else:
                grouped.setdefault(self.stream, []).append(entry_id)
        return grouped

    @staticmethod
    def is_batch(entry_id: bytes | None) -> bool:
        return entry_id is not None and entry_id.startswith(BATCH_TAG)

    def batch_due(self) -> bool:
        """Whether the batch stream is worth a read now (it gave lines last time, or BATCH_POLL_S has passed)."""
        return time.monotonic() - self._batch_empty_at >= BATCH_POLL_S

    async def read_batch(self, count: int) -> list[Entry]:
        """Up to `count` lines of the low-priority batch stream, never blocking. Callers ask only for slots the
        online stream left free; after an empty read the stream is left alone for BATCH_POLL_S, so a fleet
        with no batch running pays one extra read per BATCH_POLL_S, not one per step."""
        if count <= 0 or not self.batch_due():
            return []
        reply = await self.redis.xreadgroup(keys.WORKER_GROUP, self.worker_id, {self.batch_stream: ">"},
                                            count=count)
        entries = [(BATCH_TAG + entry_id, fields) for entry_id, fields in self.entries(reply)]
        if not entries:
            self._batch_empty_at = time.monotonic()
        return entries

    async def read(self, count: int, block: bool) -> list[Entry]:
        """Up to `count` new entries; blocks up to BATCH_TIMEOUT_MS when `block`."""
        block_ms = max(1, self.settings.batch_timeout_ms) if block else None
        reply = await self.redis.xreadgroup(keys.WORKER_GROUP, self.worker_id, {self.stream: ">"},
                                            count=count, block=block_ms)
        return self.entries(reply)

    async def read_burst(self, count: int, block: bool = True) -> list[Entry]:
        """Read (blocking for a first entry unless `block` is false), then keep reading while more arrive less
        than GATHER_GAP_MS apart, up to `count` entries and BATCH_TIMEOUT_MS in all. A burst of requests (clients
        that all got their answers at once and send again) then makes one batch instead of a trickle of small
        ones; a lone request waits for one gap only. The gap is slept here: Redis ends a BLOCK only at its `hz`
        tick (100 ms by default)."""
        entries = await self.read(count, block=block)
        deadline = time.monotonic() + self.settings.batch_timeout_ms / 1000
        while entries and len(entries) < count and time.monotonic() < deadline:
            await asyncio.sleep(GATHER_GAP_MS / 1000)
            more = await self.read(count - len(entries), block=False)
            if not more:
                break
            entries += more
        return entries

    def read_in(self, pipe: aioredis.client.Pipeline, count: int) -> aioredis.client.Pipeline:
        """Queue a non-blocking read of up to `count` new entries on `pipe` (parse its reply with `entries`), so
        a busy worker reads while it publishes, in the same round trip."""
        pipe.xreadgroup(keys.WORKER_GROUP, self.worker_id, {self.stream: ">"}, count=count)
        return pipe

    @staticmethod
    def entries(reply: object) -> list[Entry]:
        """The entries of an XREADGROUP reply (its streams' entries in order)."""
        return read_entries(reply)
