"""One job's answer from the external engine, turned into the same events the native engine publishes.

Numbering: engines stream text, several tokens per chunk at times, so events are numbered by character: a
Delta's `seq` is the index of its last character in the choice, the Finished's one past the end. After each
event, the choice's published length goes onto its `engine_progress` list, in the same pipeline. A worker that
takes the job over from a dead one reruns it and skips that many characters (greedy and seeded requests come
out the same; the API drops any repeat by `seq`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from common import keys
from common.protocol import (
    THINK_CLOSE,
    THINK_OPEN,
    Accepted,
    ChatJob,
    Delta,
    Event,
    Finished,
    ReasoningMode,
    ToolCall,
    encode,
)
from workers.chat.external.client import EngineClient, EngineError, Piece, Usage, unavailable

FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls"}


@dataclass
class Choice:
    index: int
    skip: int = 0  # characters a crashed worker already published
    chars: int = 0  # characters received so far
    pieces: int = 0  # chunks with text (a lower bound of the tokens, when no logprobs count them)
    tokens: int = 0  # tokens counted by their logprobs
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    reasoning: ReasoningMode = "none"  # where the API looks for the reasoning in the text (`Accepted.reasoning`)
    thinking: bool = False  # inside reasoning the engine sent apart

    def _tagged(self, piece: Piece) -> str:
        """The piece's text, with reasoning an engine sent apart put back where the API's splitter finds it:
        between <think> (unless the prompt opened it) and </think>."""
        text = ""
        if piece.reasoning:
            if not self.thinking:
                text, self.thinking = ("" if self.reasoning == "open" else THINK_OPEN), True
            text += piece.reasoning
        if piece.text and self.thinking:
            text, self.thinking = text + THINK_CLOSE, False
        return text + piece.text

    def completion_tokens(self) -> int:
        return self.tokens or self.pieces

    def add(self, piece: Piece) -> Delta | None:
        """Take one chunk's piece; the Delta to publish, or None when it brings nothing new to the client."""
        for call in piece.tool_calls:
            slot = self.calls.setdefault(int(call.get("index", len(self.calls))), {"id": "", "name": "", "args": ""})
            function = call.get("function") or {}
            slot["id"] = call.get("id") or slot["id"]
            slot["name"] += function.get("name") or ""
            slot["args"] += function.get("arguments") or ""
        if piece.finish_reason:
            self.finish_reason = FINISH_REASONS.get(piece.finish_reason, "stop")
        if piece.logprobs:
            self.tokens += len(piece.logprobs)
        text = self._tagged(piece)
        if not text:
            return None
        start, self.chars = self.chars, self.chars + len(text)
        self.pieces += 1
        self.text.append(text)
        if self.chars <= self.skip:
            return None
        new = text[max(0, self.skip - start):]
        return Delta(seq=self.chars - 1, text=new, completion_tokens=self.completion_tokens(), index=self.index,
                     logprobs=piece.logprobs)

    def tool_calls(self) -> list[ToolCall] | None:
        calls = [ToolCall(id=c["id"] or f"call_{self.index}_{i}", name=c["name"], arguments=c["args"])
                 for i, c in sorted(self.calls.items())]
        return calls or None


class Relay:
    """Stream `job` from the engine and publish its events on the job's reply channel."""

    def __init__(self, redis: aioredis.Redis, client: EngineClient, job: ChatJob, *, prompt_tokens: int,
                 skip: list[int], ttl_s: int, token_counter: Any = None, reasoning: ReasoningMode = "none") -> None:
        self.redis = redis
        self.client = client
        self.job = job
        self.prompt_tokens = prompt_tokens
        self.reasoning = reasoning
        self.choices = [Choice(i, skip=skip[i] if i < len(skip) else 0, reasoning=reasoning) for i in range(job.n)]
        self.ttl_s = ttl_s
        self.count_tokens = token_counter  # text -> tokens, for choices of n>1 (usage covers them all)
        self.usage: Usage | None = None
        self.accepted = False

    async def run(self) -> list[Event]:
        """Publish Accepted and the Deltas as they come; return the Finished events (the caller publishes them
        with the acknowledgement). EngineError when the engine refuses or the stream breaks."""
        stream = self.client.stream(self.job)
        async with contextlib.aclosing(stream):
            async for pieces, usage in stream:
                self.usage = usage or self.usage
                await self._publish([d for p in pieces if p.index < len(self.choices)
                                     if (d := self.choices[p.index].add(p)) is not None])
        if not self.accepted:
            await self._publish([])
        unfinished = [c.index for c in self.choices if c.finish_reason is None]
        if unfinished:
            raise unavailable(f"its stream ended before choice {unfinished[0]} finished")
        return self._finished()

    async def _publish(self, deltas: list[Delta]) -> None:
        if self.accepted and not deltas:
            return
        channel = keys.reply_channel(self.job.request_id)
        pipe = self.redis.pipeline(transaction=False)
        if not self.accepted:
            self.accepted = True
            pipe.publish(channel, encode(Accepted(prompt_tokens=self.prompt_tokens, reasoning=self.reasoning)))
        for delta in deltas:
            key = keys.engine_progress(self.job.request_id, delta.index)
            pipe.rpush(key, delta.seq + 1)
            pipe.expire(key, self.ttl_s)
            pipe.publish(channel, encode(delta))
        await pipe.execute()

    def _finished(self) -> list[Event]:
        usage = self.usage
        counts = [c.completion_tokens() for c in self.choices]
        if self.count_tokens is not None and len(self.choices) > 1:
            counts = [self.count_tokens("".join(c.text)) for c in self.choices]
        if usage is not None:  # exact in total: the first choice takes the difference
            counts[0] = max(0, usage.completion_tokens - sum(counts[1:]))
        prompt_tokens = usage.prompt_tokens if usage is not None and usage.prompt_tokens else self.prompt_tokens
        return [Finished(seq=c.chars, text="", finish_reason=c.finish_reason or "stop",  # type: ignore[arg-type]
                         prompt_tokens=prompt_tokens, completion_tokens=count,
                         cached_tokens=usage.cached_tokens if usage else 0, index=c.index,
                         tool_calls=c.tool_calls())
                for c, count in zip(self.choices, counts, strict=True)]


__all__ = ["EngineError", "Relay"]
