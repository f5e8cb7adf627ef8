"""Embeddings (OpenAI) and rerank (Cohere/Jina shape, as vLLM and llama.cpp serve it): types and serving."""

from __future__ import annotations

import base64
import struct
import time
from typing import Annotated, Any, Literal

import msgspec

from api.errors import APIError
from api.jobs import ChatContext, JobRun, new_request_id
from api.protocol import decode_body
from common import keys
from common.protocol import Embedded, EmbedJob, RerankJob, Scored

MAX_ITEMS = 2048
MAX_TEXT_CHARS = 100_000


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None
    truncate: bool = False


class Document(msgspec.Struct):
    text: str


class RerankRequest(msgspec.Struct, kw_only=True):
    model: str
    query: str
    documents: list[str | Document]
    top_n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    return_documents: bool = False
    truncate: bool = False


def _token_inputs(req: EmbeddingRequest) -> list[list[int]] | None:
    """Token-id input: a list of ids (one input) or a list of id lists; None for text input."""
    if isinstance(req.input, str) or not req.input:
        return None
    if all(isinstance(x, int) for x in req.input):
        inputs = [list(req.input)]
    elif all(isinstance(x, list) for x in req.input):
        inputs = list(req.input)
    else:
        return None
    if len(inputs) > MAX_ITEMS or any(not ids or any(not isinstance(i, int) or i < 0 for i in ids) for ids in inputs):
        raise APIError(400, f"Token-id inputs must be 1 to {MAX_ITEMS} non-empty lists of ids >= 0.",
                       param="input", code="invalid_value")
    return inputs  # type: ignore[return-value]


def _texts(req: EmbeddingRequest) -> list[str]:
    if isinstance(req.input, str):
        texts = [req.input]
    elif req.input and all(isinstance(x, str) for x in req.input):
        texts = list(req.input)  # type: ignore[arg-type]
    else:
        raise APIError(400, "'input' must be a non-empty string or a list of strings.", param="input",
                       code="invalid_value")
    if len(texts) > MAX_ITEMS:
        raise APIError(400, f"'input' holds at most {MAX_ITEMS} items.", param="input", code="invalid_value")
    for i, text in enumerate(texts):
        if not text.strip() or len(text) > MAX_TEXT_CHARS:
            raise APIError(400, f"Input {i} is empty or longer than {MAX_TEXT_CHARS} characters.",
                           param=f"input[{i}]", code="invalid_value")
    return texts


async def create_embeddings(ctx: ChatContext, body: bytes, client_id: str | None) -> dict[str, Any]:
    req = decode_body(body, EmbeddingRequest)
    token_inputs = _token_inputs(req)
    job = EmbedJob(request_id=new_request_id(client_id), model=req.model, created=time.time(),
                   texts=[] if token_inputs else _texts(req), token_inputs=token_inputs, truncate=req.truncate,
                   dimensions=req.dimensions)
    answer = await JobRun(ctx, job, stream=False, stream_key=keys.embed_stream(req.model), kind="embed").answer()
    assert isinstance(answer, Embedded)
    row = answer.dim * 4
    data = []
    for i in range(len(token_inputs or job.texts)):
        raw = answer.vectors[i * row:(i + 1) * row]
        vector: Any = (base64.b64encode(raw).decode() if req.encoding_format == "base64"
                       else list(struct.unpack(f"<{answer.dim}f", raw)))
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": answer.prompt_tokens, "total_tokens": answer.prompt_tokens}}


async def rerank(ctx: ChatContext, body: bytes, client_id: str | None) -> dict[str, Any]:
    req = decode_body(body, RerankRequest)
    if not req.query.strip():
        raise APIError(400, "'query' must not be empty.", param="query", code="invalid_value")
    documents = [d if isinstance(d, str) else d.text for d in req.documents]
    if not documents or len(documents) > MAX_ITEMS:
        raise APIError(400, f"'documents' must hold 1 to {MAX_ITEMS} items.", param="documents",
                       code="invalid_value")
    for i, doc in enumerate(documents):
        if not doc.strip() or len(doc) > MAX_TEXT_CHARS:
            raise APIError(400, f"Document {i} is empty or too long.", param=f"documents[{i}]", code="invalid_value")
    request_id = new_request_id(client_id)
    job = RerankJob(request_id=request_id, model=req.model, query=req.query, documents=documents,
                    created=time.time(), truncate=req.truncate)
    answer = await JobRun(ctx, job, stream=False, stream_key=keys.rerank_stream(req.model), kind="rerank").answer()
    assert isinstance(answer, Scored)
    ranked = sorted(range(len(documents)), key=lambda i: answer.scores[i], reverse=True)[: req.top_n]
    results = [{"index": i, "relevance_score": answer.scores[i]}
               | ({"document": {"text": documents[i]}} if req.return_documents else {}) for i in ranked]
    return {"id": f"rerank-{request_id}", "model": req.model, "results": results,
            "usage": {"prompt_tokens": answer.prompt_tokens, "total_tokens": answer.prompt_tokens}}
