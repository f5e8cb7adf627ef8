"""OpenAI's Files and Batch API over HTTP: /v1/files and /v1/batches.

The routes only parse, store and enqueue; the state lives in Redis (`batches/files.py`, `batches/store.py`) and
the work runs in an rq worker (`batches/runner.py`), so any API replica answers for any batch.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.datastructures import State, UploadFile

from api import auth
from api.errors import APIError
from api.extension import Extension
from api.protocol import decode_body
from batches import queue
from batches.files import ENDPOINTS, FileStore
from batches.store import COMPLETION_WINDOWS, BatchStore
from common.settings import Settings

MAX_PAGE = 100


class BatchCreate(msgspec.Struct, kw_only=True):
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/embeddings", "/v1/completions"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None


def _files(state: State) -> FileStore:
    return FileStore(state.redis)


def _batches(state: State) -> BatchStore:
    return BatchStore(state.redis)


def _limit(raw: str | None, default: int = 20) -> int:
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PAGE:
        raise APIError(400, f"'limit' must be an integer from 1 to {MAX_PAGE}.", param="limit", code="invalid_value")
    return value


@post("/v1/files", status_code=200)
async def upload_file(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    settings: Settings = state.chat.settings
    try:
        form = await request.form()
    except Exception:
        form = None
    if form is None or not isinstance(form.get("file"), UploadFile):
        raise APIError(400, "Send the file as multipart/form-data with a 'file' part and 'purpose'.", param="file",
                       code="invalid_value")
    purpose = form.get("purpose")
    if purpose != "batch":
        raise APIError(400, f"'purpose' must be 'batch' (got {purpose!r}); only batch input files are stored.",
                       param="purpose", code="invalid_value")
    upload: UploadFile = form["file"]
    data = await upload.read()
    if len(data) > settings.files_max_bytes:
        raise APIError(413, f"The file is {len(data)} bytes; FILES_MAX_BYTES is {settings.files_max_bytes}.",
                       param="file", code="file_too_large")
    obj = await _files(state).create(upload.filename or "upload.jsonl", "batch", data, auth.owner())
    return msgspec.to_builtins(obj)


@get("/v1/files")
async def list_files(state: State, purpose: str | None = None, limit: str | None = None,
                     after: str | None = None) -> dict[str, Any]:
    return await _files(state).list(purpose, _limit(limit, 100), after, auth.owner())


@get("/v1/files/{file_id:str}")
async def get_file(state: State, file_id: str) -> dict[str, Any]:
    return msgspec.to_builtins(await _files(state).get(file_id, auth.owner()))


@get("/v1/files/{file_id:str}/content")
async def file_content(state: State, file_id: str) -> Response[bytes]:
    return Response(await _files(state).content(file_id, auth.owner()), media_type="application/jsonl")


@delete("/v1/files/{file_id:str}", status_code=200)
async def delete_file(state: State, file_id: str) -> dict[str, Any]:
    return await _files(state).delete(file_id, auth.owner())


@post("/v1/batches", status_code=200)
async def create_batch(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    req = decode_body(await request.body(), BatchCreate)
    files = _files(state)
    try:
        meta = await files.get(req.input_file_id, auth.owner())
    except APIError:
        raise APIError(404, f"No such input file: '{req.input_file_id}'.", param="input_file_id",
                       code="file_not_found") from None
    if meta.purpose != "batch":
        raise APIError(400, "The input file must be uploaded with purpose 'batch'.", param="input_file_id",
                       code="invalid_value")
    assert req.completion_window in COMPLETION_WINDOWS and req.endpoint in ENDPOINTS
    store = _batches(state)
    principal = auth.current.get()
    batch_id = await store.create(req.input_file_id, req.endpoint, req.completion_window, req.metadata,
                                  principal.models if principal is not None else None, auth.owner())
    if getattr(state, "rq_redis", None) is None:
        state.rq_redis = queue.connect(state.chat.settings)
    await asyncio.to_thread(queue.enqueue, state.rq_redis, batch_id)
    return await store.get(batch_id)


@get("/v1/batches")
async def list_batches(state: State, limit: str | None = None, after: str | None = None) -> dict[str, Any]:
    return await _batches(state).list(_limit(limit), after, auth.owner())


@get("/v1/batches/{batch_id:str}")
async def get_batch(state: State, batch_id: str) -> dict[str, Any]:
    return await _batches(state).get(batch_id, auth.owner())


@post("/v1/batches/{batch_id:str}/cancel", status_code=200)
async def cancel_batch(state: State, batch_id: str) -> dict[str, Any]:
    """Stop feeding new lines; the lines in flight finish and the batch ends `cancelled` with their outputs."""
    store = _batches(state)
    await store.get(batch_id, auth.owner())  # 404 first, also for another key's batch
    status = await store.move(batch_id, "cancelling", "validating", "in_progress")
    if status not in ("cancelling", "cancelled"):
        raise APIError(400, f"The batch is {status}; only a validating or running batch can be cancelled.",
                       param="batch_id", code="invalid_state")
    return await store.get(batch_id)


UPLOAD_BODY: dict[str, Any] = {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "JSONL: one {custom_id, method, url, body} request per line"},
                   "purpose": {"enum": ["batch"]}}}}}

ROUTES = [upload_file, list_files, get_file, file_content, delete_file, create_batch, list_batches, get_batch,
          cancel_batch]
#: The Batch API as the app takes it (`axion/app.py`), with its request bodies for the OpenAPI document.
EXTENSION = Extension(ROUTES, bodies={"/v1/batches": BatchCreate}, uploads={"/v1/files": UPLOAD_BODY},
                      page_limits={"/v1/files": MAX_PAGE, "/v1/batches": MAX_PAGE})
