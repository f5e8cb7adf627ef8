"""Files for the Batch API, kept in Redis: the OpenAI `file` object and the content as a list of JSONL lines.

Why Redis and not a directory: every API replica answers /v1/files and every rq worker reads the input and
writes the outputs, and Redis is the one thing all of them already share; a directory would need a shared
volume on every host. A list of lines (not one string) lets the runner read its input a window at a time and
append each result as it arrives, so neither side holds a whole file. The price is memory: FILES_MAX_BYTES
bounds an upload, and outputs cost about their size in Redis until deleted.

Free of the web framework: the API routes and the rq batch runner both use it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, cast

import msgspec
import redis.asyncio as aioredis

from api.endpoints import BATCH_URLS
from api.errors import APIError
from common import keys
from common.redis_cluster import text

ENDPOINTS = BATCH_URLS  # the endpoints a line may call (api/endpoints.py `batchable`)
MAX_LINE_ERRORS = 100  # listed in a failed batch's errors; one more entry counts the rest
READ_CHUNK = 1000  # lines per LRANGE when a file is read back

FilePurpose = Literal["batch", "batch_output"]


class FileObject(msgspec.Struct, kw_only=True, omit_defaults=False):
    """OpenAI's `file` object (`openai.types.FileObject`)."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    object: Literal["file"] = "file"
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class BatchLine(msgspec.Struct):
    """One request of a batch input file."""

    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


_line_decoder = msgspec.json.Decoder(BatchLine)
_file_decoder = msgspec.json.Decoder(FileObject)


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def not_found(file_id: str) -> APIError:
    return APIError(404, f"No such file: '{file_id}'.", param="file_id", code="file_not_found")


def split_upload(data: bytes) -> list[bytes]:
    """An upload as stored: its lines as sent (blank ones too, so line numbers and the content stay the file's).
    Lines are checked when a batch names the file (`check_lines`), as OpenAI does: the upload takes any bytes."""
    return data.removesuffix(b"\n").split(b"\n") if data else []


def check_lines(raws: list[bytes], endpoint: str, max_lines: int) -> tuple[list[BatchLine], list[dict[str, Any]]]:
    """The requests of an input file, and OpenAI `errors.data` entries for every bad line (by its 1-based number
    in the file, at most MAX_LINE_ERRORS of them and one that counts the rest), so a client fixes all at once."""
    lines: list[BatchLine] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(raws, start=1):
        if not raw.strip():
            continue
        line, problem = _checked(raw, seen, endpoint)
        if problem is not None:
            errors.append({"code": problem[0], "message": problem[1], "line": number, "param": problem[2]})
        elif line is not None:
            lines.append(line)
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "The input file holds no requests.", "line": None,
                       "param": "input_file_id"})
    if len(lines) + len(errors) > max_lines:
        errors.insert(0, {"code": "too_many_requests", "line": None, "param": "input_file_id",
                          "message": f"{len(lines) + len(errors)} requests; at most {max_lines} (BATCH_MAX_LINES)."})
    if len(errors) > MAX_LINE_ERRORS:
        rest = len(errors) - MAX_LINE_ERRORS
        errors = [*errors[:MAX_LINE_ERRORS], {"code": "more_errors", "line": None, "param": None,
                                             "message": f"{rest} more problem(s) not listed."}]
    return lines, errors


def _checked(raw: bytes, seen: set[str], endpoint: str) -> tuple[BatchLine | None, tuple[str, str, str] | None]:
    """One line decoded, or (code, message, param) saying what is wrong with it."""
    try:
        line = _line_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        return None, ("invalid_request", f"Not a batch request: {exc}.", "body")
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None, ("invalid_json_line", "Not a valid JSON object.", "body")
    if not line.custom_id or len(line.custom_id) > 512:
        return None, ("invalid_custom_id", "'custom_id' must be 1 to 512 characters.", "custom_id")
    if line.custom_id in seen:
        return None, ("duplicate_custom_id", f"Duplicate custom_id '{line.custom_id}'.", "custom_id")
    seen.add(line.custom_id)
    if line.method != "POST":
        return None, ("invalid_method", f"'method' must be POST, not '{line.method}'.", "method")
    if line.url not in ENDPOINTS:
        return None, ("invalid_url", f"'url' must be one of {', '.join(ENDPOINTS)}, not '{line.url}'.", "url")
    if line.url != endpoint:
        return None, ("mismatched_url", f"The line's url '{line.url}' is not the batch's endpoint '{endpoint}'.",
                      "url")
    if not isinstance(line.body.get("model"), str):
        return None, ("invalid_request", "'body.model' must be a string.", "body.model")
    return line, None


class FileStore:
    """Files in Redis. Writes are ordered rather than transactional (a Redis Cluster spreads a file's keys and the
    index over slots): lines first, the `file` object and the index entry last, so a file is listed only once
    whole; a delete removes the object first."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def create(self, filename: str, purpose: FilePurpose, data: bytes, owner: str) -> FileObject:
        """Store a whole file (an upload) at once, as `owner`'s."""
        lines = split_upload(data)
        obj = FileObject(id=new_file_id(), bytes=len(data), created_at=int(time.time()), filename=filename,
                         purpose=purpose)
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(lines), READ_CHUNK):
            pipe.rpush(keys.file_lines(obj.id), *lines[start:start + READ_CHUNK])
        self._index(pipe, obj, owner)
        await pipe.execute()
        return obj

    async def seal(self, file_id: str, filename: str, size: int, owner: str) -> FileObject:
        """Publish a file whose lines were appended under `file_id` as they were produced (a batch output)."""
        obj = FileObject(id=file_id, bytes=size, created_at=int(time.time()), filename=filename,
                         purpose="batch_output")
        await self._index(self.redis.pipeline(transaction=False), obj, owner).execute()
        return obj

    @staticmethod
    def _index(pipe: aioredis.client.Pipeline, obj: FileObject, owner: str) -> aioredis.client.Pipeline:
        pipe.set(keys.file_owner(obj.id), owner)
        pipe.set(keys.file_meta(obj.id), msgspec.json.encode(obj))
        pipe.zadd(keys.files_index(owner), {obj.id: time.time()})
        return pipe

    async def get(self, file_id: str, owner: str | None = None) -> FileObject:
        """The file object; a 404 as for a missing file when `owner` is given and the file is someone else's
        (the batch runner, which reads for the batch's owner, gives none)."""
        raw, stored = await self.redis.mget([keys.file_meta(file_id), keys.file_owner(file_id)])
        if raw is None or (owner is not None and (text(stored) if stored else keys.ANONYMOUS_OWNER) != owner):
            raise not_found(file_id)
        return _file_decoder.decode(raw)

    async def lines(self, file_id: str, start: int = 0, stop: int = -1) -> list[bytes]:
        return cast(list[bytes], await self.redis.lrange(keys.file_lines(file_id), start, stop))

    async def content(self, file_id: str, owner: str) -> bytes:
        """The whole file as JSONL (each line ends in a newline), read in chunks."""
        await self.get(file_id, owner)
        parts: list[bytes] = []
        start = 0
        while chunk := await self.lines(file_id, start, start + READ_CHUNK - 1):
            parts.extend(chunk)
            start += len(chunk)
        return b"".join(line + b"\n" for line in parts)

    async def delete(self, file_id: str, owner: str) -> dict[str, Any]:
        await self.get(file_id, owner)
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(keys.file_meta(file_id), keys.file_lines(file_id), keys.file_owner(file_id))
        pipe.zrem(keys.files_index(owner), file_id)
        await pipe.execute()
        return {"id": file_id, "object": "file", "deleted": True}

    async def list(self, purpose: str | None, limit: int, after: str | None, owner: str) -> dict[str, Any]:
        """`owner`'s files, newest first; `after` is the last id of the previous page."""
        ids = [text(i) for i in await self.redis.zrevrange(keys.files_index(owner), 0, -1)]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1:]
        raws = await self.redis.mget([keys.file_meta(i) for i in ids]) if ids else []
        objs = [_file_decoder.decode(r) for r in raws if r is not None]
        objs = [o for o in objs if purpose is None or o.purpose == purpose]
        page = objs[:limit]
        return {"object": "list", "data": msgspec.to_builtins(page), "has_more": len(objs) > limit,
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}
