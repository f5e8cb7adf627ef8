"""Chat completions: request → job in the model's stream → events on the reply channel → OpenAI objects.

Free of the web framework: it takes a decoded request and returns either a finished `ChatCompletion` or an
async iterator of SSE frames, raising APIError for anything the client must hear about before the body starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import redis.asyncio as aioredis

from api import protocol as p
from api.errors import APIError
from api.registry import WorkerRegistry
from api.reply_hub import ReplyHub, Subscription
from common import keys
from common.protocol import (
    Accepted,
    ChatJob,
    ChatMessage,
    Delta,
    Event,
    Failed,
    Finished,
    SamplingParams,
    TokenLogprob,
    decode_event,
    encode,
)
from common.settings import Settings

log = logging.getLogger("axion.api.chat")

_json = msgspec.json.Encoder()


@dataclass
class ChatContext:
    """What serving a chat request needs from the running app."""

    settings: Settings
    redis: aioredis.Redis
    hub: ReplyHub
    registry: WorkerRegistry
    slots: asyncio.Semaphore
    open_requests: int = 0


def build_job(req: p.ChatCompletionRequest, request_id: str) -> ChatJob:
    temperature = 1.0 if req.temperature is None else req.temperature
    params = SamplingParams(
        temperature=float(temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=0 if req.top_k in (None, -1) else int(req.top_k),
        max_tokens=p.output_limit(req),
        min_tokens=req.min_tokens or 0,
        stop=p.stop_list(req),
        seed=req.seed,
        ignore_eos=bool(req.ignore_eos),
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        stop_token_ids=list(req.stop_token_ids or []),
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
    )
    messages = [ChatMessage(role=m.role, content=p.message_text(m), name=m.name) for m in req.messages]
    return ChatJob(request_id=request_id, model=req.model, messages=messages, params=params, created=time.time(),
                   n=req.n or 1)


class ChatRun:
    """One admitted request: owns its subscription and its concurrency slot until `close()`."""

    def __init__(self, ctx: ChatContext, req: p.ChatCompletionRequest, request_id: str) -> None:
        self.ctx = ctx
        self.req = req
        self.request_id = request_id
        self.completion_id = f"chatcmpl-{request_id}"
        self.created = int(time.time())
        self.deadline = time.monotonic() + ctx.settings.request_timeout_s
        self.sub: Subscription | None = None
        self._holds_slot = False
        self._counted = False
        self._last_seq = -1
        self._started = time.monotonic()
        self._outcome = "client went away"

    async def start(self) -> Accepted | None:
        """Admit, subscribe, enqueue, and wait until a worker accepts the prompt (or refuses it, as an APIError).

        A streaming request waits at most one keep-alive interval: if it is still queued then, None comes back
        and the stream starts with keep-alive comments; a later refusal arrives as an error frame."""
        ctx = self.ctx
        if ctx.open_requests >= ctx.settings.max_connections:
            raise APIError(429, "Too many open requests on this server; retry shortly.",
                           code="too_many_requests", headers={"Retry-After": "1"})
        ctx.open_requests += 1
        self._counted = True
        try:
            await ctx.registry.require_model(self.req.model)
            await asyncio.wait_for(ctx.slots.acquire(), self._left())
            self._holds_slot = True
            self.sub = await ctx.hub.open(self.request_id)
            job = build_job(self.req, self.request_id)
            await ctx.redis.xadd(keys.chat_stream(self.req.model), {"job": encode(job)})
            first = await self.next_event(ctx.settings.sse_keepalive_s if self.req.stream else None)
            if first is None:
                return None
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                self._outcome = "timed out"
            elif isinstance(exc, APIError):
                self._outcome = f"rejected {exc.status} {exc.code}"
            await self.close()
            if isinstance(exc, TimeoutError):
                raise self._timeout_error() from None
            raise
        if isinstance(first, Failed):
            self._outcome = f"refused {first.status} {first.code}"
            await self.close()
            raise APIError(first.status, first.message, type=first.type, param=first.param, code=first.code)
        if not isinstance(first, Accepted):
            await self.close()
            raise APIError(500, "Worker answered out of order.", code="internal_error")
        return first

    def _left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def _timeout_error(self) -> APIError:
        return APIError(504, f"The request did not finish within {self.ctx.settings.request_timeout_s:g}s.",
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
                if seq <= self._last_seq:
                    continue  # a repeat (e.g. replayed after a worker restart): already relayed
                self._last_seq = seq
            return event

    async def close(self) -> None:
        if self._counted:
            log.info("request %s model=%s stream=%s %s in %.0f ms", self.request_id, self.req.model,
                     bool(self.req.stream), self._outcome, (time.monotonic() - self._started) * 1000)
        if self.sub is not None:
            sub, self.sub = self.sub, None
            await self.ctx.hub.close(sub)
        if self._holds_slot:
            self._holds_slot = False
            self.ctx.slots.release()
        if self._counted:
            self._counted = False
            self.ctx.open_requests -= 1

    async def complete(self, accepted: Accepted) -> p.ChatCompletion:
        n = self.req.n or 1
        texts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        finished: dict[int, Finished] = {}
        try:
            while len(finished) < n:
                try:
                    event = await self.next_event()
                except TimeoutError:
                    self._outcome = "timed out"
                    raise self._timeout_error() from None
                if isinstance(event, Failed):
                    self._outcome = f"failed {event.status} {event.code}"
                    raise APIError(event.status, event.message, type=event.type, param=event.param,
                                   code=event.code)
                if isinstance(event, Delta | Finished):
                    texts[event.index].append(event.text)
                    logprobs[event.index].extend(event.logprobs or [])
                if isinstance(event, Finished):
                    finished[event.index] = event
            self._outcome = _finished_outcome(finished)
        finally:
            await self.close()
        choices = [p.Choice(i, p.AssistantMessage("assistant", "".join(texts[i])),
                            p.ChoiceLogprobs(logprobs[i]) if self.req.logprobs else None, finished[i].finish_reason)
                   for i in range(n)]
        return p.ChatCompletion(self.completion_id, "chat.completion", self.created, self.req.model, choices,
                                usage_of(*finished.values()))

    async def stream(self, accepted: Accepted | None) -> AsyncIterator[bytes]:
        """SSE frames; a failure after the first frame is sent as a `data: {"error": ...}` frame."""
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        n = self.req.n or 1
        finished: dict[int, Finished] = {}
        try:
            for i in range(n):
                yield self._frame(i, p.ChoiceDelta(role="assistant", content=""), None, None, include_usage)
            while len(finished) < n:
                try:
                    event = await self.next_event(self.ctx.settings.sse_keepalive_s)
                except TimeoutError:
                    self._outcome = "timed out"
                    yield b"data: " + self._timeout_error().to_json() + b"\n\n"
                    return
                if event is None:  # queued or in a long prefill: keep proxies from closing a silent stream
                    yield b": keep-alive\n\n"
                    continue
                if isinstance(event, Failed):
                    self._outcome = f"failed {event.status} {event.code}"
                    err = APIError(event.status, event.message, type=event.type, param=event.param, code=event.code)
                    yield b"data: " + err.to_json() + b"\n\n"
                    return
                if not isinstance(event, Delta | Finished):
                    continue
                logprobs = p.ChoiceLogprobs(event.logprobs) if event.logprobs else None
                finish = event.finish_reason if isinstance(event, Finished) else None
                if event.text or logprobs or finish:
                    delta = p.ChoiceDelta(content=event.text) if event.text else p.ChoiceDelta()
                    yield self._frame(event.index, delta, logprobs, finish, include_usage)
                if isinstance(event, Finished):
                    finished[event.index] = event
            self._outcome = _finished_outcome(finished)
            if include_usage:
                yield self._encode(p.ChatCompletionUsageChunk(
                    self.completion_id, "chat.completion.chunk", self.created, self.req.model, [],
                    usage_of(*finished.values())))
            yield b"data: [DONE]\n\n"
        finally:
            await self.close()

    def _frame(self, index: int, delta: p.ChoiceDelta, logprobs: p.ChoiceLogprobs | None,
               finish: p.FinishReason | None, include_usage: bool) -> bytes:
        choices = [p.ChunkChoice(index, delta, logprobs, finish)]
        chunk: msgspec.Struct
        if include_usage:
            chunk = p.ChatCompletionUsageChunk(self.completion_id, "chat.completion.chunk", self.created,
                                               self.req.model, choices, None)
        else:
            chunk = p.ChatCompletionChunk(self.completion_id, "chat.completion.chunk", self.created,
                                          self.req.model, choices)
        return self._encode(chunk)

    @staticmethod
    def _encode(chunk: msgspec.Struct) -> bytes:
        return b"data: " + _json.encode(chunk) + b"\n\n"


def _finished_outcome(finished: dict[int, Finished]) -> str:
    usage = usage_of(*finished.values())
    reasons = ",".join(sorted({f.finish_reason for f in finished.values()}))
    return f"done finish={reasons} prompt={usage.prompt_tokens} completion={usage.completion_tokens}"


def usage_of(*choices: Finished) -> p.Usage:
    """One request's usage: the prompt counted once, the completions of all its choices added up."""
    prompt, completion = choices[0].prompt_tokens, sum(c.completion_tokens for c in choices)
    return p.Usage(prompt, completion, prompt + completion, p.PromptTokensDetails(choices[0].cached_tokens))


def new_request_id(client_id: str | None = None) -> str:
    """A unique job id; a client's X-Request-Id (when it is a sane token) leads it, so logs can be searched by
    it, and a random suffix keeps two clients that send the same id off each other's reply channel."""
    suffix = uuid.uuid4().hex
    if client_id and len(client_id) <= 128 and all(c.isalnum() or c in "._:-" for c in client_id):
        return f"{client_id}.{suffix[:12]}"
    return suffix
