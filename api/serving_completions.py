"""Legacy completions (`POST /v1/completions`): raw prompts, no chat template, the `text_completion` objects.

Several prompts become several jobs, run at once; choice `i` of prompt `k` is index `k * n + i`, as OpenAI
numbers them. Logprobs use the legacy shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import msgspec

from api import protocol as p
from api import protocol_legacy as lg
from api.aliases import shown
from api.errors import APIError
from api.jobs import ChatContext, JobRun, UsageSoFar, finished_outcome, usage_of
from api.prompt_logprobs import joined, legacy_shape, vllm_shape
from api.serving_chat import sampling_params
from common.protocol import Accepted, ChatJob, Delta, Event, Failed, Finished, PromptLogprobs, TokenLogprob, TopLogprob

_json = msgspec.json.Encoder()


def build_jobs(req: lg.CompletionRequest, request_id: str) -> list[ChatJob]:
    prompts = lg.completion_prompts(req)
    params = sampling_params(req, req.logprobs is not None)
    if params.max_tokens == 0:  # score the prompt only: one token is made, and dropped (`CompletionRun`)
        params.max_tokens = 1
    return [ChatJob(request_id=request_id if len(prompts) == 1 else f"{request_id}-{k}", model=req.model,
                    messages=[], params=params, created=time.time(), n=req.n or 1, echo=bool(req.echo),
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_ids=None if isinstance(prompt, str) else prompt,
                    add_special_tokens=req.add_special_tokens)
            for k, prompt in enumerate(prompts)]


class LegacyLogprobsBuilder:
    """Accumulates TokenLogprob entries of one choice into the legacy shape, with character offsets."""

    def __init__(self, start: int) -> None:
        self.out = lg.LegacyLogprobs([], [], [], [])
        self._offset = start

    def add(self, entries: list[TokenLogprob]) -> lg.LegacyLogprobs:
        added = lg.LegacyLogprobs([], [], [], [])
        for entry in entries:
            for target in (self.out, added):
                target.tokens.append(entry.token)
                target.token_logprobs.append(entry.logprob)
                target.top_logprobs.append(_by_text(entry))
                target.text_offset.append(self._offset)
            self._offset += len(entry.token)
        return added


def _by_text(entry: TokenLogprob) -> dict[str, float]:
    """The alternatives keyed by their text, as the legacy shape has it, and the sampled token always (OpenAI: up
    to `logprobs` + 1 entries, so `logprobs: 0` still shows it); tokens that read the same (pieces of a UTF-8
    character both shown as U+FFFD) keep the likelier one."""
    top: dict[str, float] = {}
    choices: list[TopLogprob | TokenLogprob] = [*entry.top_logprobs, entry]
    for alt in choices:
        top[alt.token] = max(alt.logprob, top.get(alt.token, alt.logprob))
    return top


class CompletionRun:
    def __init__(self, ctx: ChatContext, req: lg.CompletionRequest, request_id: str) -> None:
        self.req = req
        self.n = req.n or 1
        # One request, one CONCURRENT_REQUESTS slot, held by the first prompt's run: a slot per prompt would
        # deadlock a request of more prompts than slots, its runs waiting for slots its own runs hold.
        self.runs = [JobRun(ctx, job, bool(req.stream), shares_slot=k > 0)
                     for k, job in enumerate(build_jobs(req, request_id))]
        self.completion_id = f"cmpl-{request_id}"
        self.created = int(time.time())
        self.accepted: list[Accepted | None] = []
        self._echoed: set[int] = set()
        self.prompt_scores: dict[int, PromptLogprobs] = {}  # per prompt, the first its workers sent
        self.echo_scored = bool(req.echo) and req.logprobs is not None  # the echoed prompt carries logprobs
        self.scores_only = bool(req.echo) and req.max_tokens == 0  # the generated token is dropped

    async def start(self) -> None:
        results = await asyncio.gather(*(run.start() for run in self.runs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise errors[0]
        self.accepted = list(results)  # type: ignore[arg-type]

    async def close(self) -> None:
        for run in self.runs:
            await run.close()

    def _echo(self, k: int) -> str:
        accepted = self.accepted[k] if k < len(self.accepted) else None
        return (accepted.prompt_text or "") if accepted is not None and self.req.echo else ""

    async def _events(self, k: int, run: JobRun, queue: asyncio.Queue[tuple[int, Event | BaseException]]) -> None:
        done = 0
        try:
            while done < self.n:
                event = await run.next_event()
                if event is None:
                    continue
                if isinstance(event, Accepted):
                    self.accepted[k] = event
                await queue.put((k, event))
                done += isinstance(event, Finished)
                if isinstance(event, Failed):
                    return
            run.completed = True
        except Exception as exc:  # handed to the consumer, which raises it or sends it as a frame
            await queue.put((k, exc))

    async def _merged(self) -> AsyncIterator[tuple[int, Event]]:
        """Every job's events as they come, tagged with the prompt's position."""
        queue: asyncio.Queue[tuple[int, Event | BaseException]] = asyncio.Queue()
        tasks = [asyncio.create_task(self._events(k, run, queue)) for k, run in enumerate(self.runs)]
        finished = 0
        try:
            while finished < len(self.runs) * self.n:
                k, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished += isinstance(item, Finished)
                yield k, item
                if isinstance(item, Failed):
                    return
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    async def complete(self) -> lg.Completion:
        texts: dict[int, list[str]] = {}
        builders: dict[int, LegacyLogprobsBuilder] = {}
        finished: dict[int, Finished] = {}
        try:
            async for k, event in self._merged():
                if isinstance(event, Failed):
                    raise APIError(event.status, event.message, type=event.type, param=event.param, code=event.code)
                if isinstance(event, PromptLogprobs):
                    self.prompt_scores.setdefault(k, event)
                if not isinstance(event, Delta | Finished):
                    continue
                event = self._kept(event)
                index = k * self.n + event.index
                texts.setdefault(index, [self._echo(k)]).append(event.text)
                if self.req.logprobs is not None:
                    builders.setdefault(index, LegacyLogprobsBuilder(len(self._echo(k)))).add(event.logprobs or [])
                if isinstance(event, Finished):
                    finished[index] = event
        except TimeoutError:
            raise APIError(504, "The request did not finish in time.", type="timeout", code="timeout") from None
        else:
            self._record_outcomes(finished)
        finally:
            await self.close()
        choices = [lg.CompletionChoice(i, "".join(texts.get(i, [])), self._logprobs(i // self.n, builders.get(i)),
                                      finished[i].finish_reason, self._vllm_prompt_logprobs(i // self.n))
                   for i in sorted(finished)]
        per_prompt = [usage_of(*[finished[k * self.n + i] for i in range(self.n)]) for k in range(len(self.runs))]
        usage = p.Usage(sum(u.prompt_tokens for u in per_prompt), sum(u.completion_tokens for u in per_prompt),
                        sum(u.total_tokens for u in per_prompt))
        return lg.Completion(self.completion_id, "text_completion", self.created, shown(self.req.model), choices, usage)

    def _kept(self, event: Delta | Finished) -> Delta | Finished:
        """The event as the client sees it: with `max_tokens` 0 the generated token is dropped."""
        if not self.scores_only:
            return event
        if isinstance(event, Delta):
            return Delta(seq=event.seq, text="", completion_tokens=0, index=event.index)
        return Finished(seq=event.seq, text="", finish_reason="length", prompt_tokens=event.prompt_tokens,
                        completion_tokens=0, cached_tokens=event.cached_tokens, index=event.index)

    def _logprobs(self, k: int, builder: LegacyLogprobsBuilder | None) -> lg.LegacyLogprobs | None:
        """A choice's legacy logprobs: the echoed prompt's, then its own tokens'."""
        if builder is None:
            return None
        scores = self.prompt_scores.get(k) if self.echo_scored else None
        return builder.out if scores is None else joined(legacy_shape(scores), builder.out)

    def _vllm_prompt_logprobs(self, k: int) -> p.VllmPromptLogprobs | None:
        scores = self.prompt_scores.get(k)
        return vllm_shape(scores) if scores is not None and self.req.prompt_logprobs is not None else None

    def _record_outcomes(self, finished: dict[int, Finished]) -> None:
        """Each prompt's line in the request log says how it ended (it said "client went away" for every legacy
        completion: the assignment sat after a `raise`, out of reach)."""
        for k, run in enumerate(self.runs):
            run.outcome = finished_outcome({i: finished[k * self.n + i] for i in range(self.n)})

    async def stream(self) -> AsyncIterator[bytes]:
        include_usage, continuous = p.usage_options(self.req)
        so_far = UsageSoFar() if continuous else None
        for k, accepted in enumerate(self.accepted):
            if so_far is not None and accepted is not None:
                so_far.accepted(k, accepted.prompt_tokens)
        builders: dict[int, LegacyLogprobsBuilder] = {}
        finished: dict[int, Finished] = {}
        try:
            for k in range(len(self.runs)):
                yield self._echo_chunks(k)
            async for k, event in self._merged():
                if isinstance(event, Accepted):  # a queued prompt's acceptance came after the stream started
                    if so_far is not None:
                        so_far.accepted(k, event.prompt_tokens)
                    yield self._echo_chunks(k)
                    continue
                if isinstance(event, PromptLogprobs):
                    self.prompt_scores.setdefault(k, event)
                    yield self._echo_chunks(k)
                    continue
                if isinstance(event, Failed):
                    err = APIError(event.status, event.message, type=event.type, param=event.param, code=event.code)
                    yield b"data: " + err.to_json() + b"\n\n"
                    return
                if not isinstance(event, Delta | Finished):
                    continue
                yield self._echo_chunks(k, unscored=True)
                event = self._kept(event)
                index = k * self.n + event.index
                logprobs = None
                if self.req.logprobs is not None:
                    builder = builders.setdefault(index, LegacyLogprobsBuilder(len(self._echo(k))))
                    logprobs = builder.add(event.logprobs or [])
                finish = event.finish_reason if isinstance(event, Finished) else None
                if isinstance(event, Finished):
                    finished[index] = event
                if so_far is not None:
                    so_far.produced(k, index, event)
                if event.text or finish or logprobs:
                    yield self._chunk(index, event.text, logprobs, finish, so_far)
            self._record_outcomes(finished)
            if include_usage:
                usage = p.Usage(sum(f.prompt_tokens for i, f in finished.items() if i % self.n == 0),
                                sum(f.completion_tokens for f in finished.values()), 0)
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                payload = lg.Completion(self.completion_id, "text_completion", self.created, shown(self.req.model),
                                        [], usage)
                yield b"data: " + _json.encode(payload) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except TimeoutError:
            yield b"data: " + APIError(504, "The request did not finish in time.", type="timeout",
                                       code="timeout").to_json() + b"\n\n"
        finally:
            await self.close()

    def _echo_chunks(self, k: int, unscored: bool = False) -> bytes:
        """The prompt's text first, once per choice, when `echo` asks for it (and the worker has sent it), with its
        logprobs when asked (sent before the first token; `unscored`: a token came first, send it without)."""
        echo = self._echo(k)
        scores = self.prompt_scores.get(k) if self.echo_scored else None
        if not echo or k in self._echoed or (self.echo_scored and scores is None and not unscored):
            return b""
        self._echoed.add(k)
        logprobs = legacy_shape(scores) if scores is not None else None
        return b"".join(self._chunk(k * self.n + i, echo, logprobs, None) for i in range(self.n))

    def _chunk(self, index: int, text: str, logprobs: lg.LegacyLogprobs | None, finish: p.FinishReason | None,
               so_far: UsageSoFar | None = None) -> bytes:
        choice = lg.CompletionChoice(index, text, logprobs, finish)
        payload = lg.Completion(self.completion_id, "text_completion", self.created, shown(self.req.model), [choice],
                                so_far.usage() if so_far is not None else None)
        return b"data: " + _json.encode(payload) + b"\n\n"
