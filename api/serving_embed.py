"""Embeddings (OpenAI): types and serving."""

from __future__ import annotations

import base64
import struct
import time
from typing import Annotated, Any, Literal

import msgspec

from api.aliases import shown
from api.embed_cache import Row, embed_store, lookup, members, permissions, split
from api.errors import APIError
from api.jobs import ChatContext, JobRun, new_request_id
from api.protocol import decode_body
from common import keys
from common.protocol import Embedded, EmbedJob

MAX_ITEMS = 2048
MAX_TEXT_CHARS = 100_000


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None
    truncate: bool = False


def _token_inputs(req: EmbeddingRequest) -> list[list[int]] | None:
    """Token-id input: a list of ids (one input) or a list of id lists; None for text input."""
    if isinstance(req.input, str) or not req.input:
        return None
    inputs: list[Any]
    if all(isinstance(x, int) for x in req.input):
        inputs = [list(req.input)]
    elif all(isinstance(x, list) for x in req.input):
        inputs = list(req.input)
    else:
        return None
    if len(inputs) > MAX_ITEMS or any(not ids or any(not isinstance(i, int) or i < 0 for i in ids) for ids in inputs):
        raise APIError(400, f"Token-id inputs must be 1 to {MAX_ITEMS} non-empty lists of ids >= 0.",
                       param="input", code="invalid_value")
    return inputs


def _texts(req: EmbeddingRequest) -> list[str]:
    if isinstance(req.input, str):
        texts = [req.input]
    elif req.input and all(isinstance(x, str) for x in req.input):
        texts = list(req.input)  # type: ignore[arg-type]
    else:
        raise APIError(400, "'input' must be a non-empty string or a list of strings.", param="input",
                       code="invalid_value")
    return checked_texts(texts, "input")


def checked_texts(texts: list[str], param: str) -> list[str]:
    """`texts` as given: 1 to MAX_ITEMS of them, none empty or over MAX_TEXT_CHARS (embeddings, rerank, score)."""
    if not texts or len(texts) > MAX_ITEMS:
        raise APIError(400, f"'{param}' must hold 1 to {MAX_ITEMS} items.", param=param, code="invalid_value")
    for i, text in enumerate(texts):
        if not text or len(text) > MAX_TEXT_CHARS:
            raise APIError(400, f"Text {i} of '{param}' is empty or longer than {MAX_TEXT_CHARS} characters.",
                           param=f"{param}[{i}]", code="invalid_value")
    return texts


async def create_embeddings(ctx: ChatContext, body: bytes, client_id: str | None,
                            cache_control: str | None = None) -> tuple[dict[str, Any], str]:
    """The OpenAI embeddings object and the `x-axion-cache` value. Cached inputs come from the embedding cache;
    the others (each distinct one once) go to the model in one job and into the cache."""
    req = decode_body(body, EmbeddingRequest)
    token_inputs = _token_inputs(req)
    inputs: list[str] | list[list[int]] = token_inputs or _texts(req)
    await ctx.registry.require_model(req.model, "embed")  # 404/503 hold even when every input is cached
    store = embed_store(ctx.redis, ctx.settings)
    read, write = permissions(store, cache_control)
    revision = await ctx.registry.revision(req.model, "embed")
    found = await lookup(store, members(req.model, revision, inputs, req.dimensions, req.truncate), read, write)
    untold = 0  # tokens of computed inputs that an older worker reported only as a total
    if todo := found.missing:
        positions = list(todo.values())
        answer = await _run(ctx, req, client_id, [inputs[i] for i in positions], token_inputs is not None,
                            positions)
        computed = split(answer.vectors, answer.dim, answer.tokens or [0] * len(positions))
        if answer.tokens is None:
            untold = answer.prompt_tokens  # such rows are not cached, and a repeated input counts once
        elif write:
            await store.put_many([(m, row.pack()) for m, row in zip(todo, computed, strict=True)])
        by_member = dict(zip(todo, computed, strict=True))
        found.rows = [row or by_member[m] for m, row in zip(found.members, found.rows, strict=True)]
    rows: list[Row] = found.rows  # type: ignore[assignment]  # every row is filled now
    data = [{"object": "embedding", "index": i, "embedding": _vector(row.vector, req.encoding_format)}
            for i, row in enumerate(rows)]
    tokens = sum(row.tokens for row in rows) + untold
    return ({"object": "list", "data": data, "model": shown(req.model),
             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, found.header)


async def _run(ctx: ChatContext, req: EmbeddingRequest, client_id: str | None, inputs: list[Any],
               token_ids: bool, positions: list[int]) -> Embedded:
    """One embedding job for `inputs`; `positions` are their indexes in the client's request, which error
    messages name."""
    job = EmbedJob(request_id=new_request_id(client_id), model=req.model, created=time.time(),
                   texts=[] if token_ids else inputs, token_inputs=inputs if token_ids else None,
                   truncate=req.truncate, dimensions=req.dimensions, positions=positions)
    answer = await JobRun(ctx, job, stream=False, stream_key=keys.embed_stream(req.model), kind="embed").answer()
    assert isinstance(answer, Embedded)
    return answer


def _vector(raw: bytes, encoding_format: str) -> Any:
    if encoding_format == "base64":
        return base64.b64encode(raw).decode()
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))
