"""One batch line through the same serving code as an online request, on the model's low-priority stream.

The line's body is decoded, checked and answered by exactly what serves /v1/chat/completions, /v1/completions
and /v1/embeddings (`api/serving_*.py`, `api/chat_cache.py`, `api/embed_cache.py`, all free of the web
framework), so a batch answer equals the online answer to the same request and the response cache serves
both. The only difference is the stream: the context's `lane="batch"` makes every job go to
`keys.batch_stream`, which workers read only for slots online traffic leaves free.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from api import endpoints, limits
from api import protocol as p
from api import protocol_legacy as legacy
from api.chat_cache import ChatCache, as_fresh
from api.errors import APIError
from api.jobs import ChatContext
from api.serving_chat import ChatRun
from api.serving_completions import CompletionRun
from api.serving_embed import create_embeddings

log = logging.getLogger("axion.batches")

QUEUE_FULL_RETRY_S = 1.0  # a full batch stream (MAX_QUEUED_JOBS) means "wait", never "fail the line"


@dataclass
class LineResult:
    status_code: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status_code == 200


class LineRunner:
    """Answers batch lines against one ChatContext (its own reply hub and registry, lane "batch")."""

    def __init__(self, ctx: ChatContext) -> None:
        self.ctx = ctx
        self.chat_cache = ChatCache(ctx)

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> LineResult:
        """The line's answer as (status, body): 200 and the endpoint's object, or the error status and its
        OpenAI envelope. A full queue is waited out; any other failure is the line's, not the batch's."""
        raw = msgspec.json.encode(body)
        while True:
            try:
                limits.check_sizes(body, self.ctx.settings)
                problem = await self.ctx.registry.model_problem(str(body.get("model")), self.ctx.settings)
                if problem:
                    raise APIError(400, f"Invalid 'model': {problem}", param="model", code="invalid_value")
                return LineResult(200, await self._answer(url, raw, request_id))
            except APIError as exc:
                if exc.code == "queue_full":
                    await asyncio.sleep(QUEUE_FULL_RETRY_S)
                    continue
                return LineResult(exc.status, exc.body())
            except Exception as exc:  # a bug or an outage must not sink the other lines
                log.exception("batch line %s failed", request_id)
                return LineResult(500, APIError(500, f"Internal error ({type(exc).__name__}).",
                                                code="internal_error").body())

    async def _answer(self, url: str, raw: bytes, request_id: str) -> dict[str, Any]:
        if url == endpoints.EMBEDDINGS.path:
            answer, _ = await create_embeddings(self.ctx, raw, request_id)
            return answer
        if url == endpoints.COMPLETIONS.path:
            req = legacy.decode_completion_request(raw)
            _no_stream(req.stream)
            run = CompletionRun(self.ctx, req, request_id)
            await run.start()
            return msgspec.to_builtins(await run.complete())
        return msgspec.to_builtins(await self._chat(p.decode_chat_request(raw), request_id))

    async def _chat(self, req: p.ChatCompletionRequest, request_id: str) -> p.ChatCompletion:
        """As the online handler does it: a cached answer when the request is cacheable, else a run that fills
        the cache (and leads single-flight, so identical lines in flight are generated once)."""
        _no_stream(req.stream)
        cache = self.chat_cache
        decision = await cache.decide(req, None)
        hit, lease = await cache.read(decision, request_id)
        if hit is not None:
            return as_fresh(hit, request_id, req.model)
        save = functools.partial(cache.save, decision.key) if decision.write and decision.key else None
        run = ChatRun(self.ctx, req, request_id, on_complete=save, lease=lease)
        accepted = await run.start()
        assert accepted is not None  # only a streaming run may come back before the worker accepts
        return await run.complete(accepted)


def _no_stream(stream: bool | None) -> None:
    if stream:
        raise APIError(400, "'stream' is not supported in a batch.", param="stream", code="invalid_value")


def output_line(request_id: str, custom_id: str, result: LineResult) -> bytes:
    """OpenAI's batch output (or error) line: the response with its status and body; `error` stays null for a
    request that got an HTTP answer, error or not."""
    return msgspec.json.encode({"id": request_id, "custom_id": custom_id,
                                "response": {"status_code": result.status_code, "request_id": request_id,
                                             "body": result.body},
                                "error": None})


def unanswered_line(request_id: str, custom_id: str, code: str, message: str) -> bytes:
    """An error line for a request that never ran (the batch expired first)."""
    return msgspec.json.encode({"id": request_id, "custom_id": custom_id, "response": None,
                                "error": {"code": code, "message": message}})

