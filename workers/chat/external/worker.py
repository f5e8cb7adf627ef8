"""The chat worker on an external engine: the same stream, consumer group, heartbeat and delivery rule as the
native worker (workers/chat/worker.py), but each job is forwarded to the engine and relayed back as events.

Jobs run as asyncio tasks, at most MAX_BATCH_SIZE at a time; the engine batches them itself. While the engine
is down (crashed, restarting; attached by URL and failing its health check) the worker reads no new job, so jobs
wait in the stream or go to other workers.
A job whose cancel flag appears (client gone) or whose deadline passes is stopped by closing its upstream
request, which aborts the generation in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from common import keys
from common.protocol import ChatJob, Failed, ReasoningMode, decode_job, encode
from common.settings import Settings
from workers.chat.external.client import EngineClient, EngineError, lacked_features
from workers.chat.external.native import NativeFallback
from workers.chat.external.relay import Relay
from workers.chat.external.supervisor import AttachedEngine, EngineSupervisor
from workers.revision import model_revision
from workers.stream_worker import Entry, StreamWorker

log = logging.getLogger("axion.worker")

CANCEL_POLL_S = 0.25


def vocab_size(model: str) -> int:
    """The model's vocabulary as its config.json states it (the embedding can be larger than the tokenizer);
    0 when unknown. The API refuses token ids outside it before queueing, as it does for native workers."""
    try:
        return int(json.loads((Path(model) / "config.json").read_text()).get("vocab_size") or 0)
    except (OSError, ValueError, TypeError):
        return 0


class ExternalChatWorker(StreamWorker):
    def __init__(self, settings: Settings, redis: aioredis.Redis, client: EngineClient, *, reason: str,
                 lacks: frozenset[str], supervisor: EngineSupervisor | AttachedEngine | None = None,
                 tokenizer: Any = None, max_seq_len: int | None = None) -> None:
        super().__init__(settings, redis, kind="chat", model_id=settings.model_id,
                         stream=keys.chat_stream(settings.model_id), device="external", dtype="",
                         revision=model_revision(settings.model_name))
        self.client = client
        self.supervisor = supervisor
        self.tokenizer = tokenizer
        self.lacks = lacks
        self.max_seq_len = max_seq_len or settings.max_seq_len
        self.vocab_size = vocab_size(settings.model_name) or (len(tokenizer) if tokenizer is not None else 0)
        self.info.vocab_size = self.vocab_size
        self.info.backend, self.info.backend_reason = "external", reason
        self._reason = reason
        self.tasks: dict[bytes, asyncio.Task[None]] = {}
        self.native = NativeFallback(settings) if settings.external_engine_unsupported == "native" else None

    def keep_running(self) -> bool:
        return not self.stopping.is_set() or bool(self.tasks)

    def in_flight(self) -> list[bytes]:
        return list(self.tasks)

    def on_stop(self) -> None:
        if self.native is not None:
            self.native.close()

    def refresh_stats(self) -> None:
        super().refresh_stats()
        self.info.active_sequences = len(self.tasks)
        if self.supervisor is not None:
            state = self.supervisor.state
            restarts = f", {self.supervisor.restarts} restarts" if self.supervisor.restarts else ""
            self.info.backend_reason = f"{self._reason} (engine {state}{restarts})"

    async def iteration(self) -> None:
        free = 0 if self.stopping.is_set() else self.settings.max_batch_size - len(self.tasks)
        if free <= 0 or (self.supervisor is not None and not self.supervisor.ready.is_set()):
            if self.tasks:
                await asyncio.wait(list(self.tasks.values()), timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(0.2)
            return
        entries, deliveries = await self.take_over_due(free)
        self._start(entries, deliveries)
        if (free := free - len(entries)) > 0:
            self._start(await self.read(free, block=True), None)

    def _start(self, entries: list[Entry], deliveries: list[int] | None) -> None:
        for k, (entry_id, fields) in enumerate(entries):
            task = asyncio.create_task(self._answer(entry_id, fields, deliveries[k] if deliveries else 1))
            self.tasks[entry_id] = task
            task.add_done_callback(partial(self._forget, entry_id))

    def _forget(self, entry_id: bytes, _task: asyncio.Task[None]) -> None:
        """Done callback of an entry's task: it no longer counts as in flight."""
        self.tasks.pop(entry_id, None)

    async def _answer(self, entry_id: bytes, fields: dict[bytes, bytes], delivered: int) -> None:
        """Answer one entry: every path ends with its final event published and the entry acknowledged,
        except a Redis failure, which leaves the entry pending for a takeover."""
        try:
            job = decode_job(fields[b"job"])
        except (KeyError, msgspec.DecodeError) as exc:
            log.error("dropping unreadable entry %s: %s", entry_id, exc)
            await self.ack(self.redis.pipeline(transaction=False), entry_id).execute()
            return
        try:
            await self._run(entry_id, fields, job, delivered)
        except Exception:
            log.exception("job %s failed in the external worker", job.request_id)
            failed = Failed(status=500, type="server_error", code="internal_error",
                            message="The worker failed while relaying the engine's answer.")
            with contextlib.suppress(Exception):
                await self._finish(entry_id, job, [failed])

    async def _run(self, entry_id: bytes, fields: dict[bytes, bytes], job: ChatJob, delivered: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(keys.cancel_flag(job.request_id))
        for i in range(job.n if delivered > 1 else 0):
            pipe.lindex(keys.engine_progress(job.request_id, i), -1)
        cancelled, *progress = await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        if cancelled:
            await self.ack(pipe, entry_id).execute()
            return
        if self.give_up_if_spent(pipe, entry_id, fields, job.request_id, job.model, delivered):
            await pipe.execute()
            return
        refusal = self._refusal(job)
        if refusal is not None and refusal.code == "unsupported_parameter" and self.native is not None:
            await self.native.answer(self.redis, job, lambda: self._should_stop(job))
            await self._finish(entry_id, job, [])
            return
        if refusal is not None or job.task != "generate":
            await self._finish(entry_id, job, [refusal or self._tokenize(job)])
            return
        prompt = self._prompt(job)
        if isinstance(prompt, Failed):
            await self._finish(entry_id, job, [prompt])
            return
        relay = Relay(self.redis, self.client, job, prompt_tokens=prompt[0], skip=[int(p or 0) for p in progress],
                      ttl_s=int(self.settings.request_timeout_s) + 60, token_counter=self._counter(),
                      reasoning=prompt[1])
        running = asyncio.create_task(relay.run())
        while True:  # the cancel flag is polled; the deadline is waited for exactly
            wait_s = CANCEL_POLL_S if job.deadline is None else min(CANCEL_POLL_S, max(0.0, job.deadline - time.time()))
            done, _ = await asyncio.wait({running}, timeout=wait_s)
            if done:
                break
            past_deadline = job.deadline is not None and job.deadline < time.time()
            if await self._should_stop(job):
                log.info("stopping job %s (%s): closing its engine request", job.request_id,
                         "deadline passed" if past_deadline else "client gone")
                running.cancel()  # closes the upstream response: the engine stops generating
                with contextlib.suppress(asyncio.CancelledError, EngineError):
                    await running
                if not running.cancelled() and running.exception() is None:
                    log.warning("job %s: the relay ran on to the engine's end through its cancellation",
                                job.request_id)
                timeout = Failed(status=504, type="timeout", code="timeout",
                                 message="The request's deadline passed while the engine generated.")
                await self._finish(entry_id, job, [timeout] if past_deadline else [])
                return
        try:
            events = running.result()
        except EngineError as exc:
            log.warning("engine refused or failed job %s: %s", job.request_id, exc.failed.message)
            events = [exc.failed]
            if exc.refused and self.supervisor is not None:
                self.supervisor.refused()  # an attached engine is down now: no more jobs read into failures
        self.info.decoded_tokens += sum(getattr(e, "completion_tokens", 0) for e in events)
        await self._finish(entry_id, job, events)

    async def _should_stop(self, job: ChatJob) -> bool:
        """The client has gone (cancel flag) or the deadline has passed."""
        if job.deadline is not None and job.deadline < time.time():
            return True
        return bool(await self.redis.exists(keys.cancel_flag(job.request_id)))

    async def _finish(self, entry_id: bytes, job: ChatJob, events: list[Any]) -> None:
        """The final events, then XACK + XDEL, and the progress lists dropped: one pipeline."""
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            pipe.publish(keys.reply_channel(job.request_id), encode(event))
        self.ack(pipe, entry_id)
        pipe.delete(*(keys.engine_progress(job.request_id, i) for i in range(max(1, job.n))))
        await pipe.execute()

    def _refusal(self, job: ChatJob) -> Failed | None:
        if job.v != 1:
            return Failed(status=400, message=f"unsupported job version {job.v}", code="unsupported_job_version")
        if job.deadline is not None and job.deadline < time.time():
            return Failed(status=504, type="timeout", code="timeout",
                          message="The request's deadline passed while it waited for a worker.")
        if job.task == "generate" and (lacked := lacked_features(job, self.lacks)):
            return Failed(status=400, code="unsupported_parameter", param=lacked[0],
                          message=f"'{lacked[0]}' is not supported by this model's engine "
                                  f"(EXTERNAL_ENGINE_LACKS); leave it out or use a natively served model.")
        if job.task == "generate" and job.params.prompt_logprobs is not None:
            return Failed(status=400, code="unsupported_parameter", param="prompt_logprobs",
                          message="Prompt logprobs ('prompt_logprobs', or 'echo' with 'logprobs') are not relayed "
                                  "from an external engine; use a natively served model.")
        if job.task != "generate" and self.tokenizer is None:
            return Failed(status=400, code="unsupported_task",
                          message="Tokenizing needs the model's tokenizer, which this worker could not load.")
        return None

    def _tokenize(self, job: ChatJob) -> Any:
        from workers.chat.sequence import tokenize

        return tokenize(job, self.tokenizer, self.max_seq_len, self.vocab_size)

    def _prompt(self, job: ChatJob) -> tuple[int, ReasoningMode] | Failed:
        """The prompt's length by the local tokenizer (the engine's usage corrects it at the end), refused when
        it leaves no room to generate, as the native worker does; 0 when no tokenizer could be loaded. And where
        the answer's reasoning is, read from the template as the native worker reads it."""
        if self.tokenizer is None:
            return 0, "none"
        from workers.chat.sequence import _prompt_ids, reasoning_mode

        ids = _prompt_ids(job, self.tokenizer, self.vocab_size)
        if isinstance(ids, Failed):
            return ids
        wanted = job.params.max_tokens
        if len(ids) + (wanted or 1) > self.max_seq_len:
            return Failed(status=400, code="context_length_exceeded",
                          param="messages" if job.messages else "prompt",
                          message=(f"This model's maximum context length is {self.max_seq_len} tokens. However, "
                                   f"you requested {len(ids) + (wanted or 0)} tokens ({len(ids)} in the "
                                   f"messages, {wanted or 0} in the completion)."))
        return len(ids), reasoning_mode(job, self.tokenizer, ids)

    def _counter(self) -> Callable[[str], int] | None:
        tokenizer = self.tokenizer
        if tokenizer is None:
            return None
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
