"""The Responses API: a response runs as one chat job; its events become output items (reasoning, a message,
function calls) and, streamed, OpenAI's `response.*` events. Stored responses live in Redis with a TTL
(RESPONSE_STORE_TTL_S), so every API replica can continue (`previous_response_id`), retrieve or delete them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis.asyncio as aioredis

from api import auth
from api import protocol as p
from api import protocol_responses as r
from api.aliases import shown
from api.errors import APIError
from api.jobs import ChatContext, JobRun, finished_outcome
from api.reasoning import ReasoningSplitter, reasoning_mode
from api.serving_chat import build_job
from common import keys
from common.protocol import Accepted, Delta, Failed, Finished, TokenLogprob, ToolCall

_json = msgspec.json.Encoder()
_stored = msgspec.json.Decoder(r.StoredResponse)


class ResponseStore:
    def __init__(self, redis: aioredis.Redis, ttl_s: float) -> None:
        self.redis, self.ttl_s = redis, ttl_s

    async def save(self, stored: r.StoredResponse) -> None:
        await self.redis.set(keys.response(stored.response.id), _json.encode(stored), px=int(self.ttl_s * 1000))

    async def load(self, response_id: str, param: str | None = None) -> r.StoredResponse:
        """The caller's stored response; a 404 (a 400 naming `param` when a request field named it) when there is
        none, or when another key made it."""
        raw = await self.redis.get(keys.response(response_id))
        stored = _stored.decode(raw) if raw is not None else None
        if stored is None or stored.owner != auth.owner():
            if param is not None:
                raise APIError(400, f"Previous response with id '{response_id}' not found.", param=param,
                               code="previous_response_not_found")
            raise APIError(404, f"Response with id '{response_id}' not found.", code="not_found")
        return stored

    async def delete(self, response_id: str) -> r.DeletedResponse:
        await self.load(response_id)
        await self.redis.delete(keys.response(response_id))
        return r.DeletedResponse(response_id)


class OutputBuilder:
    """The response's output items as the answer arrives, and the stream events announcing each change (without
    `sequence_number`, which the run adds as it sends them)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.items: list[r.OutputItem] = []
        self._reasoning: r.ReasoningItem | None = None
        self._message: r.MessageItem | None = None

    def add(self, reasoning: str, text: str, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if reasoning:
            item = self._reasoning
            if item is None:
                item = self._reasoning = r.ReasoningItem(id=f"rs_{self.request_id}")
                events.append(self._added(item))
                item.content.append(r.ReasoningText())
            item.content[0].text += reasoning
            events.append(self._at(item, "response.reasoning_text.delta", content_index=0, delta=reasoning))
        if text or logprobs:
            events += self._close_reasoning()
            message = self._message
            if message is None:
                message = self._message = r.MessageItem(id=f"msg_{self.request_id}")
                events.append(self._added(message))
                message.content.append(r.OutputText())
                events.append(self._at(message, "response.content_part.added", content_index=0,
                                       part=r.OutputText()))
            part = message.content[0]
            part.text += text
            part.logprobs += logprobs
            events.append(self._at(message, "response.output_text.delta", content_index=0, delta=text,
                                   logprobs=logprobs))
        return events

    def finish(self, calls: list[ToolCall] | None, status: str) -> list[dict[str, Any]]:
        """Close the open items and add the function calls; an answer of nothing is one empty message."""
        events = self._close_reasoning(status)
        if self._message is None and not calls:
            self._message = r.MessageItem(id=f"msg_{self.request_id}")
            events.append(self._added(self._message))
            self._message.content.append(r.OutputText())
            events.append(self._at(self._message, "response.content_part.added", content_index=0,
                                   part=r.OutputText()))
        message, self._message = self._message, None
        if message is not None:
            part = message.content[0]
            message.status = status  # type: ignore[assignment]
            events += [self._at(message, "response.output_text.done", content_index=0, text=part.text,
                                logprobs=part.logprobs),
                       self._at(message, "response.content_part.done", content_index=0, part=part),
                       self._done(message)]
        for k, call in enumerate(calls or []):
            item = r.FunctionCallItem(id=f"fc_{self.request_id}_{k}", call_id=call.id, name=call.name)
            events.append(self._added(item))
            item.arguments, item.status = call.arguments, "completed"
            events += [self._at(item, "response.function_call_arguments.delta", delta=call.arguments),
                       self._at(item, "response.function_call_arguments.done", name=call.name,
                                arguments=call.arguments),
                       self._done(item)]
        return events

    def _close_reasoning(self, status: str = "completed") -> list[dict[str, Any]]:
        item, self._reasoning = self._reasoning, None
        if item is None:
            return []
        item.status = status  # type: ignore[assignment]
        return [self._at(item, "response.reasoning_text.done", content_index=0, text=item.content[0].text),
                self._done(item)]

    def _added(self, item: r.OutputItem) -> dict[str, Any]:
        self.items.append(item)
        return {"type": "response.output_item.added", "output_index": len(self.items) - 1,
                "item": msgspec.to_builtins(item)}  # a snapshot: the item changes as the answer goes on

    def _done(self, item: r.OutputItem) -> dict[str, Any]:
        return {"type": "response.output_item.done", "output_index": self.items.index(item),
                "item": msgspec.to_builtins(item)}

    def _at(self, item: r.OutputItem, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "item_id": item.id, "output_index": self.items.index(item),
                **{k: msgspec.to_builtins(v) for k, v in fields.items()}}


class ResponsesRun(JobRun):
    """One response: its chat job's events as a `response` object, or as `response.*` stream events."""

    def __init__(self, ctx: ChatContext, req: r.ResponsesRequest, chat: p.ChatCompletionRequest,
                 history: list[p.RequestMessage], request_id: str, store: ResponseStore,
                 timeout_s: float | None = None) -> None:
        super().__init__(ctx, build_job(chat, request_id), bool(req.stream), timeout_s=timeout_s)
        self.req, self.store = req, store
        self.messages = [*history, *r.input_messages(req)]  # the conversation, instructions left out
        self.response_id = f"resp_{request_id}"
        self.builder = OutputBuilder(request_id)
        self.splitter = ReasoningSplitter("none")
        self.finished: Finished | None = None
        self.sequence = 0
        self.owner = auth.owner()  # read now: a stream's body is sent after the request's own context

    def _accepted(self, accepted: Accepted | None) -> None:
        if accepted is not None:
            self.splitter = ReasoningSplitter(reasoning_mode(self.ctx.settings, accepted))

    def response(self, status: str, error: r.ResponseError | None = None) -> r.ResponseObject:
        req, done = self.req, self.finished
        usage = None
        if done is not None:
            usage = r.ResponseUsage(done.prompt_tokens, done.completion_tokens,
                                    done.prompt_tokens + done.completion_tokens,
                                    r.InputTokensDetails(done.cached_tokens))
        return r.ResponseObject(
            id=self.response_id, created_at=self.created, status=status, model=shown(req.model),  # type: ignore[arg-type]
            output=list(self.builder.items), usage=usage, error=error,
            incomplete_details=r.IncompleteDetails("max_output_tokens") if status == "incomplete" else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            previous_response_id=req.previous_response_id,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_logprobs=req.top_logprobs, tools=req.tools or [],
            tool_choice=req.tool_choice or "auto", parallel_tool_calls=req.parallel_tool_calls is not False,
            text=req.text or r.TextConfig(format=r.TextFormat(type="text")), store=req.store is not False,
            metadata=req.metadata or {}, user=req.user)

    def _take(self, event: Delta | Finished) -> list[dict[str, Any]]:
        reasoning, text = self.splitter.feed(event.text)
        if isinstance(event, Finished):
            rest = self.splitter.flush()
            reasoning, text = reasoning + rest[0], text + rest[1]
        events = self.builder.add(reasoning, text, event.logprobs or [])
        if isinstance(event, Finished):
            self.finished = event
            status = "incomplete" if event.finish_reason == "length" else "completed"
            events += self.builder.finish(event.tool_calls, status)
        return events

    async def _finish(self) -> r.ResponseObject:
        """The finished response, stored when asked (before the client hears of it, so it can be continued)."""
        assert self.finished is not None
        self.completed = True
        self.outcome = finished_outcome({0: self.finished})
        final = self.response("incomplete" if self.finished.finish_reason == "length" else "completed")
        if final.store:
            await self.store.save(r.StoredResponse(final, [*self.messages, *self._answer()], self.owner))
        return final

    def _answer(self) -> list[p.RequestMessage]:
        """The output as the chat turn a continuation sends back (reasoning left out, as templates do)."""
        text = "".join(part.text for item in self.builder.items if isinstance(item, r.MessageItem)
                       for part in item.content)
        calls = [p.MessageToolCall(i.call_id, p.FunctionCall(i.name, i.arguments))
                 for i in self.builder.items if isinstance(i, r.FunctionCallItem)]
        return [p.RequestMessage("assistant", text or (None if calls else ""), tool_calls=calls or None)]

    async def complete(self, accepted: Accepted | None) -> r.ResponseObject:
        self._accepted(accepted)
        try:
            while self.finished is None:
                event = await self.answer_event()
                if isinstance(event, Accepted):
                    self._accepted(event)
                elif isinstance(event, Delta | Finished):
                    self._take(event)
            return await self._finish()
        finally:
            await self.close()

    async def stream(self, accepted: Accepted | None) -> AsyncIterator[bytes]:
        """`response.created`, the items' events as they come, then `response.completed` (or `.incomplete`, or
        `.failed` with the error)."""
        self._accepted(accepted)
        try:
            for kind in ("response.created", "response.in_progress"):
                yield self._sse({"type": kind, "response": self.response("in_progress")})
            while self.finished is None:
                try:
                    event = await self.next_event(self.ctx.settings.sse_keepalive_s)
                except TimeoutError:
                    self.outcome = "timed out"
                    yield self._failed("timeout", self._timeout_error().message)
                    return
                if event is None:
                    yield b": keep-alive\n\n"
                elif isinstance(event, Failed):
                    self.outcome = f"failed {event.status} {event.code}"
                    yield self._failed(event.code or "server_error", event.message)
                    return
                elif isinstance(event, Accepted):
                    self._accepted(event)
                elif isinstance(event, Delta | Finished):
                    for item_event in self._take(event):
                        yield self._sse(item_event)
            final = await self._finish()
            yield self._sse({"type": f"response.{final.status}", "response": final})
        finally:
            await self.close()

    def _failed(self, code: str, message: str) -> bytes:
        return self._sse({"type": "response.failed", "response": self.response("failed", r.ResponseError(
            code, message))})

    def _sse(self, event: dict[str, Any]) -> bytes:
        event["sequence_number"] = self.sequence
        self.sequence += 1
        return b"event: " + event["type"].encode() + b"\ndata: " + _json.encode(event) + b"\n\n"


async def prepare(ctx: ChatContext, body: bytes, request_id: str,
                  timeout_s: float | None = None) -> ResponsesRun:
    """Decode and check a request, read the conversation it continues, and build its run (not yet started)."""
    req = r.decode_responses_request(body)
    store = ResponseStore(ctx.redis, ctx.settings.response_store_ttl_s)
    history: list[p.RequestMessage] = []
    if req.previous_response_id is not None:
        history = (await store.load(req.previous_response_id, "previous_response_id")).messages
    return ResponsesRun(ctx, req, r.chat_request(req, history), history, request_id, store, timeout_s)

