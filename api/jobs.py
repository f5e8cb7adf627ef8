"""One job on the fleet, seen from the API: admission, the reply subscription, the stream entry, the events.

Shared by every endpoint that generates (chat and legacy completions); the endpoint modules only turn events
into their own OpenAI objects. Free of the web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from api import connection
from api import protocol as p
from api.admission import QueueGate
from api.errors import APIError
from api.metrics import Metrics, RunTimer
from api.registry import WorkerRegistry
from api.reply_hub import Hub, Subscription
from common import keys
from common.protocol import (
    Accepted,
    ChatJob,
    Delta,
    Embedded,
    EmbedJob,
    Event,
    Failed,
    Finished,
    RerankJob,
    Scored,
    Tokenized,
    decode_event,
    encode,
)
from common.settings import Settings

log = logging.getLogger("axion.api.jobs")


@dataclass
class ChatContext:
    """What serving a chat request needs from the running app."""

    settings: Settings
    redis: aioredis.Redis
    hub: Hub
    registry: WorkerRegistry
    slots: asyncio.Semaphore
    open_requests: int = 0
    queue: QueueGate | None = None  # the MAX_QUEUED_JOBS bound; built from `redis` and `settings` when not given
    metrics: Metrics | None = None  # this replica's /metrics series (None: not measured)
    lane: str = "online"  # "batch": jobs go to the model's low-priority batch stream (the rq batch runner)

    def __post_init__(self) -> None:
        if self.queue is None:
            self.queue = QueueGate(self.redis, self.settings.max_queued_jobs)


class JobRun:
    """One admitted job: owns its subscription and its concurrency slot until `close()`."""

    def __init__(self, ctx: ChatContext, job: ChatJob | EmbedJob | RerankJob, stream: bool, *,
                 stream_key: str | None = None, kind: str = "chat", timeout_s: float | None = None,
                 shares_slot: bool = False) -> None:
        self.ctx = ctx
        self.shares_slot = shares_slot
        self.job = job
        self.kind = kind
        self.stream_key = stream_key or keys.chat_stream(job.model)
        if ctx.lane == "batch":
            self.stream_key = keys.batch_stream(kind, job.model)
        self.streaming = stream
        self.request_id = job.request_id
        self.created = int(time.time())
        self.timeout_s = timeout_s or ctx.settings.request_timeout_s
        self.deadline = time.monotonic() + self.timeout_s
        if isinstance(job, ChatJob):
            job.deadline = time.time() + self.timeout_s
        self.sub: Subscription | None = None
        self._holds_slot = False
        self._counted = False
        self._last_seq: dict[int, int] = {}  # per choice: the last token event relayed
        self.completed = False  # the final answer arrived: nothing to cancel on close
        self.timer = RunTimer(ctx.metrics, job.model)  # TTFT, inter-token, queue and e2e times for /metrics
        self._finished_events: dict[int, Finished] = {}
        self.outcome = "client went away"
        self._abort_connection = connection.abort.get()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Accepted | None:
        """Admit, subscribe, enqueue, and wait until a worker accepts the prompt (or refuses it, as an APIError).

        Admission, in order: this replica's MAX_CONNECTIONS (429 at once), a live worker for the model (404
        unknown; 503 after the WORKER_GRACE_S wait), one of this replica's CONCURRENT_REQUESTS slots (waited
        for, but a full model queue is a 429 before the wait), the model's MAX_QUEUED_JOBS (429, checked in the
        same step as the XADD). A streaming request waits at most one keep-alive interval: if it is still queued
        then, None comes back and the stream starts with keep-alive comments; a later refusal arrives as an
        error frame."""
        ctx = self.ctx
        try:
            if ctx.open_requests >= ctx.settings.max_connections:
                raise APIError(429, "Too many open requests on this server; retry shortly.",
                               code="too_many_requests", headers={"Retry-After": "1"})
            ctx.open_requests += 1
            self._counted = True
            self.timer.set_state("waiting")
            await ctx.registry.require_model(self.job.model, self.kind, self.deadline)
            await self._take_slot()
            self.sub = await ctx.hub.open(self.request_id)
            if self.streaming:
                self.sub.bound(ctx.settings.stream_buffer_bytes, self._client_too_slow)
            assert ctx.queue is not None
            await ctx.queue.enqueue(self.stream_key, self.job.model, encode(self.job))
            self.timer.enqueued = time.monotonic()
            first = await self.next_event(ctx.settings.sse_keepalive_s if self.streaming else None)
            if first is None:
                return None
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                self.outcome = "timed out"
            elif isinstance(exc, APIError):
                self.outcome = f"rejected {exc.status} {exc.code}"
            await self.close()
            if isinstance(exc, TimeoutError):
                raise self._timeout_error() from None
            raise
        if isinstance(first, Tokenized | Embedded | Scored):
            return first  # type: ignore[return-value]  # only `answer()` runs jobs that end this way
        if isinstance(first, Failed):
            self.outcome = f"refused {first.status} {first.code}"
            await self.close()
            raise APIError(first.status, first.message, type=first.type, param=first.param, code=first.code)
        if not isinstance(first, Accepted):
            await self.close()
            raise APIError(500, "Worker answered out of order.", code="internal_error")
        return first

    async def _take_slot(self) -> None:
        """One of this replica's CONCURRENT_REQUESTS slots; when none is free, check the model's queue first,
        so a request that would only wait to be refused is refused now. A run that shares its request's slot
        (`shares_slot`: the other prompts of a legacy completion) takes none."""
        ctx = self.ctx
        if self.shares_slot:
            return
        if ctx.slots.locked():
            assert ctx.queue is not None
            await ctx.queue.check(self.stream_key, self.job.model)
        # Not asyncio.wait_for: on Python 3.11 it drops a cancellation (the client left) that lands as the slot is
        # handed over, and the request would then run for nobody (see Subscription.get in reply_hub.py).
        async with asyncio.timeout(self._left()):
            await ctx.slots.acquire()
        self._holds_slot = True

    def _client_too_slow(self) -> None:
        """The stream's client stopped reading past STREAM_BUFFER_BYTES: cut its connection (the stream then ends
        and `close` cancels the job) and flag the job now, so the worker stops at its next step."""
        log.warning("request %s: the client stopped reading; %d bytes waited for it (STREAM_BUFFER_BYTES); "
                    "dropping it", self.request_id, self.ctx.settings.stream_buffer_bytes)
        self.outcome = "client too slow"
        task = asyncio.ensure_future(self._flag_cancelled())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._abort_connection is not None:
            self._abort_connection()

    async def _flag_cancelled(self) -> None:
        with contextlib.suppress(Exception):
            await self.ctx.redis.set(keys.cancel_flag(self.request_id), b"1", ex=max(1, int(self.timeout_s) + 60))

    async def answer(self) -> Tokenized | Embedded | Scored:
        """Run a job the worker answers in one event (tokenize, embeddings, rerank) and return that answer."""
        try:
            first = await self.start()
            if not isinstance(first, Tokenized | Embedded | Scored):
                raise APIError(500, "Worker answered out of order.", code="internal_error")
            self.outcome = f"answered ({type(first).__name__.lower()})"
            self.completed = True
            return first
        finally:
            await self.close()

    def _left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def _timeout_error(self) -> APIError:
        return APIError(504, f"The request did not finish within {self.timeout_s:g}s.",
                        type="timeout", code="timeout")

    async def next_event(self, wait: float | None = None) -> Event | None:
        """The next new event; None when `wait` seconds pass first (TimeoutError when the deadline does)."""
        assert self.sub is not None
        while True:
            left = self._left()
            try:
                raw = await self.sub.get(left if wait is None else min(wait, left))
            except TimeoutError:
                if wait is None or self._left() <= 0:
                    raise
                return None
            event = decode_event(raw)
            seq = getattr(event, "seq", None)
            if seq is not None:
                index = getattr(event, "index", 0)
                if seq <= self._last_seq.get(index, -1):
                    continue  # a repeat: a worker that resumed a crashed one replays what was relayed
                self._last_seq[index] = seq
                self.timer.token(index)
                if isinstance(event, Finished):
                    self._finished_events[index] = event
            elif isinstance(event, Accepted):
                self.timer.accepted()
            return event

    async def answer_event(self) -> Event:
        """The next event of an answer sent whole; a timeout, or the worker's failure, as the APIError to send."""
        try:
            event = await self.next_event()
        except TimeoutError:
            self.outcome = "timed out"
            raise self._timeout_error() from None
        if isinstance(event, Failed):
            self.outcome = f"failed {event.status} {event.code}"
            raise APIError(event.status, event.message, type=event.type, param=event.param, code=event.code)
        assert event is not None  # next_event without `wait` returns one or raises
        return event

    async def close(self) -> None:
        if self.sub is not None and not self.completed:  # the client left or timed out: stop the work
            await self._flag_cancelled()
        if self._counted:
            elapsed_ms = self.timer.elapsed_ms()
            extra: dict[str, object] = {"job_id": self.request_id, "model": self.job.model, "kind": self.kind,
                                        "stream": self.streaming, "outcome": self.outcome,
                                        "duration_ms": round(elapsed_ms, 1)}
            if self.timer.first_token is not None:
                extra["ttft_ms"] = round((self.timer.first_token - self.timer.started) * 1000, 1)
            if self.completed and self._finished_events:
                done = self._finished_events
                first = done[min(done)]
                completion_tokens = sum(f.completion_tokens for f in done.values())
                self.timer.finished(first.finish_reason, first.prompt_tokens, completion_tokens)
                extra.update(prompt_tokens=first.prompt_tokens, completion_tokens=completion_tokens)
            log.info("request %s model=%s stream=%s %s in %.0f ms", self.request_id, self.job.model, self.streaming,
                     self.outcome, elapsed_ms, extra=extra)
            self.timer.set_state(None)
        if self.sub is not None:
            sub, self.sub = self.sub, None
            await self.ctx.hub.close(sub)
        if self._holds_slot:
            self._holds_slot = False
            self.ctx.slots.release()
        if self._counted:
            self._counted = False
            self.ctx.open_requests -= 1

def finished_outcome(finished: dict[int, Finished]) -> str:
    usage = usage_of(*finished.values())
    reasons = ",".join(sorted({f.finish_reason for f in finished.values()}))
    return f"done finish={reasons} prompt={usage.prompt_tokens} completion={usage.completion_tokens}"


def usage_of(*choices: Finished) -> p.Usage:
    """One request's usage: the prompt counted once, the completions of all its choices added up."""
    prompt, completion = choices[0].prompt_tokens, sum(c.completion_tokens for c in choices)
    return p.Usage(prompt, completion, prompt + completion, p.PromptTokensDetails(choices[0].cached_tokens))


class UsageSoFar:
    """Usage while a stream runs (vLLM's `stream_options.continuous_usage_stats`): each prompt counted once when
    accepted, each choice's tokens as its events arrive."""

    def __init__(self) -> None:
        self._prompts: dict[int, int] = {}
        self._choices: dict[int, int] = {}

    def accepted(self, prompt: int, prompt_tokens: int) -> None:
        self._prompts[prompt] = prompt_tokens

    def produced(self, prompt: int, choice: int, event: Delta | Finished) -> None:
        self._choices[choice] = event.completion_tokens
        if isinstance(event, Finished):
            self._prompts[prompt] = event.prompt_tokens

    def usage(self) -> p.Usage:
        prompt, completion = sum(self._prompts.values()), sum(self._choices.values())
        return p.Usage(prompt, completion, prompt + completion)


def new_request_id(client_id: str | None = None) -> str:
    """A unique job id; a client's X-Request-Id (when it is a sane token) leads it, so logs can be searched by
    it, and a random suffix keeps two clients that send the same id off each other's reply channel."""
    suffix = uuid.uuid4().hex
    if client_id and len(client_id) <= 128 and all(c.isalnum() or c in "._:-" for c in client_id):
        return f"{client_id}.{suffix[:12]}"
    return suffix
