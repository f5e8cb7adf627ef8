"""The chat-completion side of the response cache: which requests may be cached, their keys, hits served as a
`chat.completion` or replayed as SSE chunks, and single-flight for identical requests in flight.

Every answer is stored in its non-streamed form (a `chat.completion`); a streamed run collects the same object
as it relays its chunks, so either form fills the cache for both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec

from api import protocol as p
from api.cache import CacheDecision, LruStore, SingleFlight, cache_key, decide
from api.jobs import ChatContext

log = logging.getLogger("axion.api.cache")

# Fields that cannot change the output: left out of the key. `max_tokens` and `max_completion_tokens` are
# folded into one `output_limit`, so the two spellings of the same limit share entries.
_NOT_IN_KEY = ("user", "stream", "stream_options", "max_tokens", "max_completion_tokens")
_completion_decoder = msgspec.json.Decoder(p.ChatCompletion)
_json = msgspec.json.Encoder()


def is_deterministic(req: p.ChatCompletionRequest) -> bool:
    """Greedy, or seeded: the same request gives the same answer (the default caching policy)."""
    return req.temperature == 0 or req.seed is not None


def canonical_request(req: p.ChatCompletionRequest) -> dict[str, Any]:
    """The request as plain data with every output-changing field and nothing else; fields left unset are
    dropped, so an absent field and an explicit null share a key."""
    data = {k: v for k, v in msgspec.to_builtins(req).items() if v is not None and k not in _NOT_IN_KEY}
    data["output_limit"] = p.output_limit(req)
    return data


class Lease:
    """This request generates for every identical one meanwhile; `release` tells them to read the cache."""

    def __init__(self, flight: SingleFlight, key: str, holder: str, most_s: float) -> None:
        self._flight, self.key = flight, key
        self._renewal = asyncio.ensure_future(flight.renew(key, holder, most_s))

    async def release(self) -> None:
        self._renewal.cancel()
        await self._flight.release(self.key)


class ChatCache:
    def __init__(self, ctx: ChatContext) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.store = LruStore(ctx.redis, "chat", settings.cache_capacity, settings.cache_ttl_s)
        self.flight = SingleFlight(ctx.redis, ctx.hub)

    async def decide(self, req: p.ChatCompletionRequest, cache_control: str | None) -> CacheDecision:
        """A key only for a cacheable request to a model some live worker serves (its revision is part of the
        key; with no live worker, the request goes its normal way to the 404/503 it deserves)."""
        key = None
        if self.store.enabled and (self.ctx.settings.cache_policy == "all" or is_deterministic(req)):
            revision = await self.ctx.registry.revision(req.model, "chat")
            if revision:
                key = cache_key(req.model, revision, canonical_request(req))
        return decide(key, cache_control)

    async def lookup(self, key: str) -> p.ChatCompletion | None:
        raw = await self.store.get(key)
        return None if raw is None else _completion_decoder.decode(raw)

    async def read(self, decision: CacheDecision, holder: str) -> tuple[p.ChatCompletion | None, Lease | None]:
        """What a request the decision lets read gets: a hit (stored, or left by the single-flight leader it
        waited for), else the lease to generate under (None: generate without one)."""
        if not (decision.read and decision.key):
            return None, None
        hit = await self.lookup(decision.key)
        if hit is not None:
            return hit, None
        return await self.claim(decision.key, holder)

    async def claim(self, key: str, holder: str) -> tuple[p.ChatCompletion | None, Lease | None]:
        """Miss so far: lead the generation, or wait for the request that leads it. Returns a hit (found after
        all, or left by the leader), else the lease to generate under (None when waiting ended without an
        answer: the leader failed, died or ran past the deadline; the caller then generates on its own)."""
        if await self.flight.try_lead(key, holder):
            lease = Lease(self.flight, key, holder, self.ctx.settings.request_timeout_s)
            hit = await self.lookup(key)  # an answer stored between the miss and the lease
            if hit is not None:
                await lease.release()
                return hit, None
            return None, lease
        raw = await self.flight.wait(key, self.store, self.ctx.settings.request_timeout_s)
        return (None if raw is None else _completion_decoder.decode(raw)), None

    async def save(self, key: str, completion: p.ChatCompletion) -> None:
        """Store a finished answer; a cache failure never fails the request that produced it."""
        try:
            await self.store.put(key, _json.encode(completion))
        except Exception as exc:
            log.warning("could not store a response in the cache (%s)", type(exc).__name__)


def as_fresh(hit: p.ChatCompletion, request_id: str, model: str) -> p.ChatCompletion:
    """A hit under this request's own id and time (clients use the id to tell completions apart)."""
    return msgspec.structs.replace(hit, id=f"chatcmpl-{request_id}", created=int(time.time()), model=model)


def replay(completion: p.ChatCompletion, include_usage: bool) -> Iterator[bytes]:
    """A cached completion as the SSE frames a live run sends: the role, the content (with its logprobs),
    the tool calls or an empty delta with the finish reason, the usage chunk when asked for, `[DONE]`."""
    def frame(choice: p.ChunkChoice) -> bytes:
        chunk: msgspec.Struct
        if include_usage:
            chunk = p.ChatCompletionUsageChunk(completion.id, "chat.completion.chunk", completion.created,
                                               completion.model, [choice], None)
        else:
            chunk = p.ChatCompletionChunk(completion.id, "chat.completion.chunk", completion.created,
                                          completion.model, [choice])
        return b"data: " + _json.encode(chunk) + b"\n\n"

    for choice in completion.choices:
        yield frame(p.ChunkChoice(choice.index, p.ChoiceDelta(role="assistant", content=""), None, None))
        message = choice.message
        if message.content or message.reasoning_content:
            delta = p.ChoiceDelta(content=message.content or None, reasoning_content=message.reasoning_content)
            yield frame(p.ChunkChoice(choice.index, delta, choice.logprobs, None))
        if message.tool_calls:
            calls = [p.DeltaToolCall(i, c.id, c.function) for i, c in enumerate(message.tool_calls)]
            yield frame(p.ChunkChoice(choice.index, p.ChoiceDelta(tool_calls=calls), None, choice.finish_reason))
        else:
            yield frame(p.ChunkChoice(choice.index, p.ChoiceDelta(), None, choice.finish_reason))
    if include_usage:
        yield b"data: " + _json.encode(p.ChatCompletionUsageChunk(
            completion.id, "chat.completion.chunk", completion.created, completion.model, [], completion.usage)) + \
            b"\n\n"
    yield b"data: [DONE]\n\n"


async def replay_stream(completion: p.ChatCompletion, include_usage: bool) -> AsyncIterator[bytes]:
    for frame in replay(completion, include_usage):
        yield frame


