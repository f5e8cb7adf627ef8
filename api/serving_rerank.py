"""Rerank (Cohere v1/v2 and Jina shapes, as vLLM and llama.cpp serve it) and vLLM's score API, both answered by
the rerank workers' cross-encoder: a score per (query, document) pair."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import msgspec

from api.aliases import shown
from api.errors import APIError
from api.jobs import ChatContext, JobRun, new_request_id
from api.protocol import decode_body
from api.serving_embed import checked_texts
from common import keys
from common.protocol import RerankJob, Scored


class Document(msgspec.Struct):
    text: str


class RerankRequest(msgspec.Struct, kw_only=True):
    """`return_documents` unset returns them, as vLLM does; false leaves them out."""

    model: str
    query: str
    documents: list[str | Document]
    top_n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    return_documents: bool | None = None
    truncate: bool = False


class ScoreRequest(msgspec.Struct, kw_only=True):
    """vLLM's /score: `text_1` against each of `text_2` (one to many), each `text_1` against one `text_2` (many to
    one), or pair by pair (lists of one length)."""

    model: str
    text_1: str | list[str]
    text_2: str | list[str]
    truncate: bool = False
    truncate_prompt_tokens: int | None = None


async def rerank(ctx: ChatContext, body: bytes, client_id: str | None) -> dict[str, Any]:
    req = decode_body(body, RerankRequest)
    if not req.query:
        raise APIError(400, "'query' must not be empty.", param="query", code="invalid_value")
    documents = checked_texts([d if isinstance(d, str) else d.text for d in req.documents], "documents")
    request_id = new_request_id(client_id)
    (answer,) = await _score(ctx, req.model, [(req.query, documents)], req.truncate, request_id)
    ranked = sorted(range(len(documents)), key=lambda i: answer.scores[i], reverse=True)[: req.top_n]
    results = [{"index": i, "relevance_score": answer.scores[i]}
               | ({"document": {"text": documents[i]}} if req.return_documents is not False else {}) for i in ranked]
    return {"id": f"rerank-{request_id}", "model": shown(req.model), "results": results,
            "usage": {"prompt_tokens": answer.prompt_tokens, "total_tokens": answer.prompt_tokens}}


async def score(ctx: ChatContext, body: bytes, client_id: str | None) -> dict[str, Any]:
    req = decode_body(body, ScoreRequest)
    if req.truncate_prompt_tokens is not None:
        raise APIError(400, "'truncate_prompt_tokens' is not supported; 'truncate: true' cuts to the model's limit.",
                       param="truncate_prompt_tokens", code="unsupported_parameter")
    firsts = checked_texts([req.text_1] if isinstance(req.text_1, str) else req.text_1, "text_1")
    seconds = checked_texts([req.text_2] if isinstance(req.text_2, str) else req.text_2, "text_2")
    if len(firsts) == 1:
        groups = [(firsts[0], seconds)]
    elif len(firsts) == len(seconds) or len(seconds) == 1:
        groups = [(first, [seconds[k % len(seconds)]]) for k, first in enumerate(firsts)]
    else:
        raise APIError(400, f"'text_1' holds {len(firsts)} texts and 'text_2' {len(seconds)}: give one of either, or "
                       "lists of one length.", param="text_1", code="invalid_value")
    request_id = new_request_id(client_id)
    answers = await _score(ctx, req.model, groups, req.truncate, request_id)
    scores = [s for answer in answers for s in answer.scores]
    tokens = sum(answer.prompt_tokens for answer in answers)
    return {"id": f"score-{request_id}", "object": "list", "created": int(time.time()), "model": shown(req.model),
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


async def _score(ctx: ChatContext, model: str, groups: list[tuple[str, list[str]]], truncate: bool,
                 request_id: str) -> list[Scored]:
    """One rerank job per query, run together under the request's one slot."""
    runs = [JobRun(ctx, RerankJob(request_id=f"{request_id}.{k}" if len(groups) > 1 else request_id, model=model,
                                  query=query, documents=documents, created=time.time(), truncate=truncate),
                   stream=False, stream_key=keys.rerank_stream(model), kind="rerank", shares_slot=k > 0)
            for k, (query, documents) in enumerate(groups)]
    answers = await asyncio.gather(*(run.answer() for run in runs))
    assert all(isinstance(answer, Scored) for answer in answers)
    return list(answers)  # type: ignore[arg-type]
