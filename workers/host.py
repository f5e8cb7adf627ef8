"""A worker process that can change its model without restarting: the `axion worker` entry point.

The host keeps one worker id for its whole life and runs one `StreamWorker` at a time under it: a model worker
(chat, embed or rerank) or, between models, an `IdleWorker` that only beats (model "", `loading` naming what
is being loaded). Commands arrive on the host's control stream (`common/control.py`) and run one after another.

A swap or unload keeps every promise the fleet makes:

1. withdraw: the old model's heartbeat goes first, so /v1/models and the API's routing stop offering it
   (and, when no other live worker serves it, it is marked retired: requests for it get a 404);
2. drain: the worker keeps reading for SETTLE_S (covering the API's registry cache, so a request routed just
   before the withdrawal is still read), then stops reading and finishes what it runs; a streaming request in
   flight completes;
3. unload: the worker object goes, and its memory with it (`loading.free_memory`);
4. load and warm the new model while an idle heartbeat says so; only then does its worker start beating, so a
   model is never announced before it can serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from typing import cast

import msgspec
import redis.asyncio as aioredis

from common import keys, redis_client
from common.control import Command, decode_command
from common.model_ids import load_problem
from common.protocol import decode_worker
from common.redis_cluster import mget
from common.settings import Settings, split_list
from workers import loading, model_thread
from workers.recovery import read_entries
from workers.stream_worker import REDIS_ERRORS, StreamWorker

log = logging.getLogger("axion.worker.host")

#: How long a withdrawn model keeps being read before the drain: longer than the API's registry cache (0.5 s).
SETTLE_S = 1.0
CONTROL_BLOCK_MS = 1000


class IdleWorker(StreamWorker):
    """Serves nothing; beats so operators (and `axion models load` without --worker) see the process."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, kind: loading.Kind, loading_model: str = "",
                 last_error: str = "") -> None:
        super().__init__(settings, redis, kind=kind, model_id="", stream="", device="-", dtype="-")
        self.info.loading, self.info.last_error = loading_model, last_error

    async def _ensure_group(self) -> None:
        """No stream to read."""

    async def iteration(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), 0.5)


class WorkerHost:
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.current: StreamWorker | None = None
        self._task: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()
        self._failure: BaseException | None = None

    async def run(self, kind: loading.Kind, model: str, served_name: str | None = None,
                  fallback_reason: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self._start(await model_thread.run(loading.open_worker, self.settings, self.redis, kind, model,
                                           served_name, fallback_reason))
        control = asyncio.create_task(self._control_loop(), name="axion-control")
        try:
            await self.stopping.wait()
        finally:
            control.cancel()
            with contextlib.suppress(BaseException):
                await control
            await self._stop_current()
            with contextlib.suppress(*REDIS_ERRORS):
                await self.redis.delete(keys.worker_control(self.worker_id))
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        """SIGTERM: stop taking commands and jobs; the current worker finishes what it runs."""
        self.stopping.set()
        if self.current is not None:
            self.current.stop()

    def _start(self, worker: StreamWorker) -> None:
        worker.rename(self.worker_id)
        worker.handles_signals = False
        self.current = worker
        self._task = asyncio.create_task(worker.run(), name=f"axion-{worker.info.kind}-worker")
        self._task.add_done_callback(self._worker_ended)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """A worker that ends by itself (not stopped by the host) takes the process down, as before hosts."""
        if task is self._task and not task.cancelled() and task.exception() is not None:
            log.error("worker %s failed: %r", self.worker_id, task.exception())
            self._failure = task.exception()
            self.stopping.set()

    async def _stop_current(self) -> None:
        worker, task = self.current, self._task
        self.current, self._task = None, None
        if worker is None or task is None:
            return
        worker.stop()
        with contextlib.suppress(Exception):
            await task

    async def _control_loop(self) -> None:
        stream = keys.worker_control(self.worker_id)
        last: str | bytes = "0-0"
        while not self.stopping.is_set():
            try:
                reply = await self.redis.xread({stream: last}, count=1, block=CONTROL_BLOCK_MS)
            except REDIS_ERRORS as exc:
                log.warning("control stream unreadable (%s); retrying in 1s", type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            for entry_id, fields in read_entries(reply):
                last = entry_id
                try:
                    command = decode_command(fields[b"command"])
                except (KeyError, msgspec.DecodeError) as exc:
                    log.error("dropping unreadable control entry %s: %s", entry_id, exc)
                else:
                    await self.execute(command)
                with contextlib.suppress(*REDIS_ERRORS):
                    await self.redis.xdel(stream, entry_id)

    async def execute(self, command: Command) -> None:
        log.info("control: %s %s (command %s)", command.action, command.model, command.id)
        # Only the present model's name and kind are kept here: a reference to its worker would keep its
        # weights in memory through the next load.
        present, present_kind = (self.current.info.model, self.current.info.kind) if self.current else ("", "chat")
        if command.action == "unload":
            if present != command.model:
                log.warning("control: unload %s ignored: this worker serves %r", command.model, present)
                return
            before = loading.rss()
            await self._drain()
            self._start(IdleWorker(self.settings, self.redis, present_kind))
            loading.free_memory()
            log.info("control: unloaded %s; process RSS %+.1f MiB", command.model, (loading.rss() - before) / 2**20)
            return
        kind = command.kind or present_kind
        problem = load_problem(command.model, allow_paths=self.settings.allow_model_paths,
                               patterns=split_list(self.settings.model_allowlist))
        if problem:
            self._note_error(f"cannot load {command.model}: {problem}")
            return
        served = command.served_name or command.model
        if present == served and present_kind == kind:
            log.info("control: %s is loaded already", served)
            return
        if present:
            await self._drain()
        else:
            await self._stop_current()
        self._start(IdleWorker(self.settings, self.redis, kind, loading_model=command.model))
        loading.free_memory()
        try:
            worker = await model_thread.run(loading.open_worker, self.settings, self.redis, kind, command.model,
                                            command.served_name)
        except Exception as exc:
            log.exception("control: loading %s failed; this worker stays idle", command.model)
            await self._stop_current()
            self._start(IdleWorker(self.settings, self.redis, kind, last_error=f"loading {command.model} failed: "
                                   f"{type(exc).__name__}: {exc}"[:500]))
            return
        if self.stopping.is_set():
            return
        await self._stop_current()  # the idle worker
        self._start(worker)
        log.info("control: now serving %s (%s)", served, kind)

    def _note_error(self, message: str) -> None:
        log.error("control: %s", message)
        if self.current is not None:
            self.current.info.last_error = message

    async def _drain(self) -> None:
        """Withdraw the current model, let requests routed just before settle in, then finish and drop it."""
        worker = self.current
        assert worker is not None
        model, kind = worker.info.model, worker.info.kind
        log.info("control: withdrawing %s, then draining %d in flight", model, len(worker.in_flight()))
        await worker.withdraw()
        await self._retire_if_last(model, kind)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), SETTLE_S)
        await self._stop_current()
        log.info("control: drained %s", model)

    async def _retire_if_last(self, model: str, kind: str) -> None:
        """With no other live worker serving `model`, requests for it become 404s at once (not 503s)."""
        try:
            ids = [i.decode() for i in cast("list[bytes]", await self.redis.zrange(keys.WORKER_INDEX, 0, -1))]
            ids = [i for i in ids if i != self.worker_id]
            raws = await mget(self.redis, [keys.worker_heartbeat(i) for i in ids]) if ids else []
            for raw in raws:
                if raw is None:
                    continue
                with contextlib.suppress(msgspec.DecodeError):
                    other = decode_worker(raw)
                    if other.model == model and other.kind == kind:
                        return
            pipe = self.redis.pipeline(transaction=False)  # two slots on a cluster
            pipe.srem(keys.KNOWN_MODELS, model)
            pipe.sadd(keys.RETIRED_MODELS, model)
            await pipe.execute()
            log.info("control: %s retired (no other worker serves it)", model)
        except REDIS_ERRORS as exc:
            log.warning("could not retire %s (%s)", model, type(exc).__name__)


async def serve(settings: Settings, fallback_reason: str | None = None) -> None:
    """`axion worker`: the model of WORKER_KIND named by the settings, then whatever the control stream says.
    `fallback_reason`: the chat model runs natively because its external engine could not start."""
    kind = settings.worker_kind
    model = settings.model_of(kind)
    served_name = settings.served_model_name if kind == "chat" else None
    redis = redis_client.connect(settings, block_ms=max(settings.batch_timeout_ms, CONTROL_BLOCK_MS))
    try:
        await WorkerHost(settings, redis).run(kind, model, served_name, fallback_reason)
    finally:
        await redis.aclose()
