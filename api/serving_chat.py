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
    )
    messages = [ChatMessage(role=m.role, content=p.message_text(m), name=m.name) for m in req.messages]
    return ChatJob(request_id=request_id, model=req.model, messages=messages, params=params, created=time.time())


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

    async def start(self) -> Accepted:
        """Admit, subscribe, enqueue, and wait until a worker accepts the prompt (or refuses it)."""
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
            first = await self.next_event()
        except BaseException as exc:
            await self.close()
            if isinstance(exc, TimeoutError):
                raise self._timeout_error() from None
            raise
        if isinstance(first, Failed):
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

    async def next_event(self) -> Event:
        assert self.sub is not None
        while True:
            event = decode_event(await self.sub.get(self._left()))
            seq = getattr(event, "seq", None)
            if seq is not None:
                if seq <= self._last_seq:
                    continue  # a repeat (e.g. replayed after a worker restart): already relayed
                self._last_seq = seq
            return event

    async def close(self) -> None:
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
        parts: list[str] = []
        try:
            while True:
                try:
                    event = await self.next_event()
                except TimeoutError:
                    raise self._timeout_error() from None
                if isinstance(event, Delta):
                    parts.append(event.text)
                elif isinstance(event, Finished):
                    parts.append(event.text)
                    usage = usage_of(event)
                    choice = p.Choice(0, p.AssistantMessage("assistant", "".join(parts)), None, event.finish_reason)
                    return p.ChatCompletion(self.completion_id, "chat.completion", self.created, self.req.model,
                                            [choice], usage)
                elif isinstance(event, Failed):
                    raise APIError(event.status, event.message, type=event.type, param=event.param,
                                   code=event.code)
        finally:
            await self.close()

    async def stream(self, accepted: Accepted) -> AsyncIterator[bytes]:
        """SSE frames; a failure after the first frame is sent as a `data: {"error": ...}` frame."""
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        try:
            yield self._frame(p.ChoiceDelta(role="assistant", content=""), None, include_usage)
            while True:
                try:
                    event = await self.next_event()
                except TimeoutError:
                    yield b"data: " + self._timeout_error().to_json() + b"\n\n"
                    break
                if isinstance(event, Delta):
                    if event.text:
                        yield self._frame(p.ChoiceDelta(content=event.text), None, include_usage)
                elif isinstance(event, Finished):
                    delta = p.ChoiceDelta(content=event.text) if event.text else p.ChoiceDelta()
                    yield self._frame(delta, event.finish_reason, include_usage)
                    if include_usage:
                        usage = usage_of(event)
                        yield self._encode(p.ChatCompletionUsageChunk(
                            self.completion_id, "chat.completion.chunk", self.created, self.req.model, [], usage))
                    yield b"data: [DONE]\n\n"
                    break
                elif isinstance(event, Failed):
                    err = APIError(event.status, event.message, type=event.type, param=event.param, code=event.code)
                    yield b"data: " + err.to_json() + b"\n\n"
                    break
        finally:
            await self.close()

    def _frame(self, delta: p.ChoiceDelta, finish: p.FinishReason | None, include_usage: bool) -> bytes:
        choices = [p.ChunkChoice(0, delta, None, finish)]
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


def usage_of(event: Finished) -> p.Usage:
    return p.Usage(event.prompt_tokens, event.completion_tokens, event.prompt_tokens + event.completion_tokens,
                   p.PromptTokensDetails(event.cached_tokens))


def new_request_id() -> str:
    return uuid.uuid4().hex
