"""The rq job behind a batch: validate the input, feed its lines to the fleet a window at a time, write the
output and error files, and move the batch through OpenAI's statuses.

    validating -> in_progress -> finalizing -> completed
                                            \\-> failed (the input was unusable) | expired (past expires_at)
    (any live state) -> cancelling -> cancelled    (the API's /cancel; the lines in flight are finished)

The rq job is `batches.runner.run_batch(batch_id)`, enqueued on the `axion-batches` queue by the API; run it
with `axion batch-worker` (or `rq worker axion-batches`). This package imports neither Litestar nor torch: it
reuses the framework-free serving modules of `api/` (see `batches/lines.py`) with its own reply hub, so an rq
work horse stays a small asyncio client of Redis like an API replica.

A retried job (rq's Retry, or a re-enqueue after a worker crash) starts its lines over: the outputs of the
attempt before are dropped first, and the response cache makes the lines it had answered cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

import msgspec
import redis.asyncio as aioredis

from api import auth
from api.auth import Principal
from api.jobs import ChatContext
from api.registry import WorkerRegistry
from api.reply_hub import ReplyHub
from batches.files import BatchLine, FileStore, check_lines, new_file_id
from batches.lines import LineResult, LineRunner, output_line, unanswered_line
from batches.store import TERMINAL, BatchStore, batch_owner
from common import aio, keys, redis_client
from common.settings import Settings, load_settings

log = logging.getLogger("axion.batches")

STATUS_POLL_S = 0.25  # how often the feeder looks for a cancel (one HGET)


def run_batch(batch_id: str) -> str:
    """rq entry point (synchronous): run one batch to a final status and return that status."""
    logging.basicConfig(level=logging.INFO)
    return aio.run(BatchRunner(load_settings(), batch_id).run())


class BatchRunner:
    def __init__(self, settings: Settings, batch_id: str) -> None:
        self.settings = settings
        self.batch_id = batch_id
        self.redis: aioredis.Redis = redis_client.connect(settings)
        self.store = BatchStore(self.redis)
        self.files = FileStore(self.redis)
        self._status_at = 0.0
        self._stopping: str | None = None  # "cancelled" or "expired" once feeding must stop
        self._sizes = {"output": 0, "error": 0}

    async def run(self) -> str:
        try:
            return await self._run()
        finally:
            await self.redis.aclose()

    async def _run(self) -> str:
        if not await self.redis.exists(keys.batch(self.batch_id)):
            log.warning("batch %s is gone (Redis flushed?); nothing to run", self.batch_id)
            return "missing"
        fields = await self.store.fields(self.batch_id)
        status = fields["status"]
        if status in TERMINAL:
            return status
        if status == "cancelling":
            return await self._finish(fields, "cancelled", {})
        try:
            meta = await self.files.get(fields["input_file_id"])
            raws = await self.files.lines(meta.id)
        except Exception as exc:
            return await self._fail([{"code": "invalid_input_file", "message": str(exc), "line": None,
                                      "param": "input_file_id"}])
        lines, problems = check_lines(raws, fields["endpoint"], self.settings.batch_max_lines)
        if problems:
            return await self._fail(problems)
        ids = {"output": fields.get("output_file") or new_file_id(), "error": fields.get("error_file") or new_file_id()}
        pipe = self.redis.pipeline(transaction=False)
        for file_id in ids.values():  # a retried attempt starts over (one DEL each: two slots on a cluster)
            pipe.delete(keys.file_lines(file_id))
        pipe.hset(keys.batch(self.batch_id), mapping={"total": len(lines), "completed": 0, "failed": 0,
                                                       "output_file": ids["output"], "error_file": ids["error"]})
        await pipe.execute()
        if await self.store.move(self.batch_id, "in_progress", "validating", "in_progress") != "in_progress":
            return await self._finish(await self.store.fields(self.batch_id), "cancelled", ids)
        if fields.get("models"):  # the creating key's model list holds for its lines (others are a 404 each)
            auth.current.set(Principal(id=f"batch:{self.batch_id}", models=frozenset(json.loads(fields["models"]))))
        await self._feed(lines, int(fields["expires_at"]), ids)
        final = self._stopping or "completed"
        if final == "completed":
            await self.store.move(self.batch_id, "finalizing", "in_progress")
        return await self._finish(await self.store.fields(self.batch_id), final, ids)

    async def _feed(self, lines: list[BatchLine], expires_at: int, ids: dict[str, str]) -> None:
        """Keep BATCH_WINDOW lines in flight until every line is answered, the batch is cancelled (the lines in
        flight still finish) or it expires (the lines never sent get an error line each)."""
        # A line may wait in the batch stream (behind online traffic) for as long as the batch's window lasts.
        settings = msgspec.structs.replace(self.settings, request_timeout_s=max(1.0, expires_at - time.time()))
        hub = ReplyHub(self.redis, timeout_s=settings.redis_timeout_s)
        await hub.start()
        ctx = ChatContext(settings, self.redis, hub, WorkerRegistry(self.redis, grace_s=settings.worker_grace_s),
                          asyncio.Semaphore(settings.batch_window), lane="batch")
        runner = LineRunner(ctx)
        window = asyncio.Semaphore(settings.batch_window)
        tasks: set[asyncio.Task[None]] = set()
        try:
            for k, line in enumerate(lines):
                await window.acquire()
                if await self._should_stop(expires_at):
                    window.release()
                    if self._stopping == "expired":
                        await self._expire_rest(lines[k:], ids)
                    break
                task = asyncio.create_task(self._one(runner, line, ids))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: window.release())
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await hub.stop()

    async def _one(self, runner: LineRunner, line: BatchLine, ids: dict[str, str]) -> None:
        request_id = f"batch_req_{uuid.uuid4().hex}"
        result: LineResult = await runner.run(line.url, line.body, request_id)
        await self._write("output" if result.ok else "error", ids,
                          output_line(request_id, line.custom_id, result), ok=result.ok)

    async def _write(self, which: str, ids: dict[str, str], data: bytes, *, ok: bool) -> None:
        """Append one line to the output or error file and count it, in one round trip."""
        self._sizes[which] += len(data) + 1
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(keys.file_lines(ids[which]), data)
        pipe.hincrby(keys.batch(self.batch_id), "completed" if ok else "failed", 1)
        await pipe.execute()

    async def _should_stop(self, expires_at: int) -> bool:
        if self._stopping:
            return True
        if time.time() >= expires_at:
            self._stopping = "expired"
            return True
        now = time.monotonic()
        if now - self._status_at >= STATUS_POLL_S:
            self._status_at = now
            if await self.store.status(self.batch_id) == "cancelling":
                self._stopping = "cancelled"
        return self._stopping is not None

    async def _expire_rest(self, lines: list[BatchLine], ids: dict[str, str]) -> None:
        for line in lines:
            data = unanswered_line(f"batch_req_{uuid.uuid4().hex}", line.custom_id, "batch_expired",
                                   "This request could not be executed before the completion window expired.")
            await self._write("error", ids, data, ok=False)

    async def _finish(self, fields: dict[str, str], final: str, ids: dict[str, str]) -> str:
        """Publish the output and error files that hold lines, then the final status (a cancel that arrived
        while finishing wins over `completed`)."""
        updates: dict[str, str] = {}
        for which in ("output", "error"):
            if ids.get(which) and await self.redis.llen(keys.file_lines(ids[which])):
                obj = await self.files.seal(ids[which], f"{self.batch_id}_{which}.jsonl", self._sizes[which],
                                            batch_owner(fields))
                updates[f"{which}_file_id"] = obj.id
        if updates:
            await self.store.update(self.batch_id, **updates)
        if final == "completed":
            final = await self.store.move(self.batch_id, "completed", "finalizing") or final
            if final == "cancelling":
                final = await self.store.move(self.batch_id, "cancelled", "cancelling") or final
        elif final == "cancelled":
            final = await self.store.move(self.batch_id, "cancelled", "cancelling", "validating", "in_progress") \
                or final
        else:
            final = await self.store.move(self.batch_id, final, "in_progress", "cancelling") or final
        log.info("batch %s %s (%s lines)", self.batch_id, final, fields.get("total"))
        return final

    async def _fail(self, errors: list[dict[str, object]]) -> str:
        await self.store.update(self.batch_id, errors=json.dumps(errors))
        with contextlib.suppress(Exception):
            return await self.store.move(self.batch_id, "failed", "validating", "in_progress", "cancelling") \
                or "failed"
        return "failed"
