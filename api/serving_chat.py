"""Chat completions: request → job in the model's stream → events on the reply channel → OpenAI objects.

Free of the web framework: it takes a decoded request and returns either a finished `ChatCompletion` or an
async iterator of SSE frames, raising APIError for anything the client must hear about before the body starts.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec

from api import protocol as p
from api.aliases import shown
from api.errors import APIError
from api.guided import guided_decoding
from api.jobs import ChatContext, JobRun, UsageSoFar, finished_outcome, usage_of
from api.prompt_logprobs import vllm_shape
from api.reasoning import ReasoningSplitter, reasoning_mode, split
from api.template import template_options

if TYPE_CHECKING:
    from api.chat_cache import Lease
    from api.protocol_legacy import CompletionRequest
from common.protocol import (
    Accepted,
    ChatJob,
    ChatMessage,
    Delta,
    Failed,
    Finished,
    PromptLogprobs,
    ReasoningMode,
    SamplingParams,
    TokenLogprob,
    ToolCall,
)


def _message(text: str, calls: list[ToolCall] | None, reasoning: str | None = None) -> p.AssistantMessage:
    """OpenAI's assistant message: with tool calls, `content` is null unless the model also wrote text; the
    reasoning apart, as vLLM's `reasoning_content`."""
    if not calls:
        return p.AssistantMessage("assistant", text, reasoning_content=reasoning)
    return p.AssistantMessage("assistant", text or None,
                              [p.ToolCallOut(c.id, p.FunctionCall(c.name, c.arguments)) for c in calls], reasoning)

_json = msgspec.json.Encoder()


def sampling_params(req: p.ChatCompletionRequest | CompletionRequest, logprobs: bool) -> SamplingParams:
    """The job's sampling parameters from the fields chat and legacy completions share."""
    return SamplingParams(
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=0 if req.top_k in (None, -1) else int(req.top_k),
        max_tokens=p.output_limit(req),
        min_tokens=p.min_output(req),
        stop=p.stop_list(req),
        seed=req.seed,
        ignore_eos=bool(req.ignore_eos),
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        stop_token_ids=list(req.stop_token_ids or []),
        logprobs=logprobs,
        top_logprobs=req.top_logprobs or 0,
        prompt_logprobs=p.prompt_scoring(req),
        guided=guided_decoding(req, isinstance(req, p.ChatCompletionRequest) and p.forces_tool(req)),
    )


def chat_messages(messages: list[p.RequestMessage]) -> list[ChatMessage]:
    """The messages as the worker's template takes them (for a chat job and for /tokenize alike)."""
    return [ChatMessage(role=m.role, content=p.message_text(m), name=m.name, tool_call_id=m.tool_call_id,
                        tool_calls=[ToolCall(c.id, c.function.name, c.function.arguments)
                                    for c in m.tool_calls] if m.tool_calls else None)
            for m in messages]


def build_job(req: p.ChatCompletionRequest, request_id: str) -> ChatJob:
    messages = chat_messages(req.messages)
    params = sampling_params(req, bool(req.logprobs))
    choice = req.tool_choice
    return ChatJob(request_id=request_id, model=req.model, messages=messages, created=time.time(), n=req.n or 1,
                   params=params, tools=msgspec.to_builtins(req.tools) if req.tools else None,
                   tool_choice=msgspec.to_builtins(choice) if choice is not None else None,
                   parallel_tool_calls=req.parallel_tool_calls is not False, **template_options(req))


class ChatRun(JobRun):
    """A chat completion: the job's events as a `chat.completion` or as `chat.completion.chunk` frames.

    Both forms collect the whole answer as it goes, so a finished run, streamed or not, hands its
    `chat.completion` to `on_complete` (the response cache)."""

    def __init__(self, ctx: ChatContext, req: p.ChatCompletionRequest, request_id: str,
                 on_complete: Callable[[p.ChatCompletion], Awaitable[None]] | None = None,
                 lease: Lease | None = None, timeout_s: float | None = None) -> None:
        super().__init__(ctx, build_job(req, request_id), bool(req.stream), timeout_s=timeout_s)
        self.req = req
        self.lease = lease  # single-flight: identical requests wait for this run; freed when it ends
        self.completion_id = f"chatcmpl-{request_id}"
        self.shown_model = shown(req.model)  # the name the client sent (an alias is echoed)
        self.on_complete = on_complete
        n = req.n or 1
        self._texts: list[list[str]] = [[] for _ in range(n)]
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self._finished: dict[int, Finished] = {}
        self._so_far = UsageSoFar()
        last = req.messages[-1]  # `echo`: the answer goes on from the assistant's last message, shown with it
        self._echo = p.message_text(last) if req.echo and last.role == "assistant" else ""
        self._continuous = False
        self._mode: ReasoningMode = "none"
        self._splitters: dict[int, ReasoningSplitter] = {}
        self._prompt_scores: PromptLogprobs | None = None

    async def close(self) -> None:
        await super().close()
        if self.lease is not None:
            lease, self.lease = self.lease, None
            await lease.release()

    def _record(self, event: Delta | Finished) -> None:
        self._so_far.produced(0, event.index, event)
        self._texts[event.index].append(event.text)
        self._logprobs[event.index].extend(event.logprobs or [])
        if isinstance(event, Finished):
            self._finished[event.index] = event

    async def _done(self) -> p.ChatCompletion:
        """The finished run as one `chat.completion`, handed to `on_complete` on the way."""
        self.completed = True
        finished = self._finished
        self.outcome = finished_outcome(finished)
        answers = [split(self._mode, "".join(texts)) for texts in self._texts]
        choices = [p.Choice(i, _message(self._echo + answers[i][1], finished[i].tool_calls, answers[i][0]),
                            p.ChoiceLogprobs(self._logprobs[i]) if self.req.logprobs else None,
                            finished[i].finish_reason)
                   for i in range(len(self._texts))]
        scores = self._prompt_scores
        completion = p.ChatCompletion(self.completion_id, "chat.completion", self.created, self.shown_model, choices,
                                      usage_of(*finished.values()),
                                      prompt_logprobs=vllm_shape(scores) if scores is not None else None)
        if self.on_complete is not None:
            await self.on_complete(completion)
        return completion

    def _accepted(self, event: Accepted) -> None:
        self._so_far.accepted(0, event.prompt_tokens)
        self._mode = reasoning_mode(self.ctx.settings, event)

    def _split(self, event: Delta | Finished) -> tuple[str, str]:
        """(reasoning, content) of the event's text, the choice's held text too when it is the last."""
        splitter = self._splitters.setdefault(event.index, ReasoningSplitter(self._mode))
        reasoning, content = splitter.feed(event.text)
        if isinstance(event, Finished):
            rest = splitter.flush()
            reasoning, content = reasoning + rest[0], content + rest[1]
        return reasoning, content

    async def complete(self, accepted: Accepted | None) -> p.ChatCompletion:
        if accepted is not None:
            self._accepted(accepted)
        n = self.req.n or 1
        try:
            while len(self._finished) < n:
                event = await self.answer_event()
                if isinstance(event, Accepted):
                    self._accepted(event)
                if isinstance(event, PromptLogprobs) and self._prompt_scores is None:
                    self._prompt_scores = event
                if isinstance(event, Delta | Finished):
                    self._record(event)
            return await self._done()
        finally:
            await self.close()

    async def stream(self, accepted: Accepted | None) -> AsyncIterator[bytes]:
        """SSE frames; a failure after the first frame is sent as a `data: {"error": ...}` frame."""
        include_usage, self._continuous = p.usage_options(self.req)
        if accepted is not None:
            self._accepted(accepted)
        n = self.req.n or 1
        finished = self._finished
        try:
            for i in range(n):
                yield self._frame(i, p.ChoiceDelta(role="assistant", content=self._echo), None, None, include_usage)
            while len(finished) < n:
                try:
                    event = await self.next_event(self.ctx.settings.sse_keepalive_s)
                except TimeoutError:
                    self.outcome = "timed out"
                    yield b"data: " + self._timeout_error().to_json() + b"\n\n"
                    return
                if event is None:  # queued or in a long prefill: keep proxies from closing a silent stream
                    yield b": keep-alive\n\n"
                    continue
                if isinstance(event, Failed):
                    self.outcome = f"failed {event.status} {event.code}"
                    err = APIError(event.status, event.message, type=event.type, param=event.param, code=event.code)
                    yield b"data: " + err.to_json() + b"\n\n"
                    return
                if isinstance(event, Accepted):
                    self._accepted(event)
                if not isinstance(event, Delta | Finished):
                    continue
                self._record(event)
                logprobs = p.ChoiceLogprobs(event.logprobs) if event.logprobs else None
                finish = event.finish_reason if isinstance(event, Finished) else None
                calls = event.tool_calls if isinstance(event, Finished) else None
                reasoning, text = self._split(event)
                if (text or reasoning) and calls:  # text before the calls, then the calls with the finish reason
                    yield self._frame(event.index, p.ChoiceDelta(content=text or None,
                                                                 reasoning_content=reasoning or None),
                                      logprobs, None, include_usage)
                    logprobs = None
                if calls:
                    delta = p.ChoiceDelta(tool_calls=[p.DeltaToolCall(i, c.id, p.FunctionCall(c.name, c.arguments))
                                                      for i, c in enumerate(calls)])
                    yield self._frame(event.index, delta, logprobs, finish, include_usage)
                elif text or reasoning or logprobs or finish:
                    delta = p.ChoiceDelta(content=text or None, reasoning_content=reasoning or None)
                    yield self._frame(event.index, delta, logprobs, finish, include_usage)
            completion = await self._done()
            if include_usage:
                yield self._encode(p.ChatCompletionUsageChunk(
                    self.completion_id, "chat.completion.chunk", self.created, self.shown_model, [], completion.usage))
            yield b"data: [DONE]\n\n"
        finally:
            await self.close()

    def _frame(self, index: int, delta: p.ChoiceDelta, logprobs: p.ChoiceLogprobs | None,
               finish: p.FinishReason | None, include_usage: bool) -> bytes:
        choices = [p.ChunkChoice(index, delta, logprobs, finish)]
        chunk: msgspec.Struct
        if include_usage or self._continuous:
            chunk = p.ChatCompletionUsageChunk(self.completion_id, "chat.completion.chunk", self.created,
                                               self.shown_model, choices,
                                               self._so_far.usage() if self._continuous else None)
        else:
            chunk = p.ChatCompletionChunk(self.completion_id, "chat.completion.chunk", self.created,
                                          self.shown_model, choices)
        return self._encode(chunk)

    @staticmethod
    def _encode(chunk: msgspec.Struct) -> bytes:
        return b"data: " + _json.encode(chunk) + b"\n\n"


