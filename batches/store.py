"""Batch state in Redis (one hash per batch), shaped as OpenAI's `batch` object on the way out.

One hash field per value: the runner bumps `completed`/`failed` with HINCRBY while the API may set `status`
to `cancelling`, and neither write can undo the other. Status changes go through one Lua script that moves a
batch only from the states it names, so a cancel and the runner's own transitions cannot cross.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, cast

import redis.asyncio as aioredis

from api.errors import APIError
from common import keys
from common.redis_cluster import text

COMPLETION_WINDOWS = {"24h": 24 * 3600}
TERMINAL = ("completed", "failed", "expired", "cancelled")
_INTS = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
         "cancelling_at", "cancelled_at")

# KEYS[1] the batch hash; ARGV[1] the new status, ARGV[2] now, ARGV[3..] the statuses it may move from.
_MOVE = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return false end
for i = 3, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
    return ARGV[1]
  end
end
return current
"""


def not_found(batch_id: str) -> APIError:
    return APIError(404, f"No such batch: '{batch_id}'.", param="batch_id", code="batch_not_found")


class BatchStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._move = redis.register_script(_MOVE)

    async def create(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None, models: frozenset[str] | None = None,
                     owner: str = keys.ANONYMOUS_OWNER) -> str:
        """A new batch in `validating`, `owner`'s (the creating key's id: only it sees the batch and its output
        files); `models` is what that key may use (None: any), which its lines are held to when they run."""
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        fields: dict[Any, Any] = {
            "id": batch_id, "endpoint": endpoint, "input_file_id": input_file_id,
            "completion_window": completion_window, "created_at": now,
            "expires_at": now + COMPLETION_WINDOWS[completion_window], "status": "validating",
            "total": 0, "completed": 0, "failed": 0, "metadata": json.dumps(metadata) if metadata else "",
            "models": json.dumps(sorted(models)) if models is not None else "", "owner": owner,
        }
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.batch(batch_id), mapping=fields)
        pipe.zadd(keys.batches_index(owner), {batch_id: time.time()})  # finer than created_at: pages keep order
        await pipe.execute()
        return batch_id

    async def fields(self, batch_id: str, owner: str | None = None) -> dict[str, str]:
        """The batch's hash; a 404 as for a missing batch when `owner` is given and it is someone else's."""
        raw = await self.redis.hgetall(keys.batch(batch_id))
        fields = {text(k): text(v) for k, v in raw.items()}
        if not fields or (owner is not None and batch_owner(fields) != owner):
            raise not_found(batch_id)
        return fields

    async def get(self, batch_id: str, owner: str | None = None) -> dict[str, Any]:
        return as_openai(await self.fields(batch_id, owner))

    async def status(self, batch_id: str) -> str | None:
        raw = await self.redis.hget(keys.batch(batch_id), "status")
        return text(raw) if raw is not None else None

    async def move(self, batch_id: str, to: str, *from_: str) -> str | None:
        """Set `to` (and `<to>_at`) if the batch is in one of `from_`; returns the status it has afterwards."""
        result = await self._move(keys=[keys.batch(batch_id)], args=[to, int(time.time()), *from_])
        return result.decode() if isinstance(result, bytes) else result

    async def update(self, batch_id: str, **fields: Any) -> None:
        values: dict[Any, Any] = dict(fields)
        await self.redis.hset(keys.batch(batch_id), mapping=values)

    async def list(self, limit: int, after: str | None, owner: str) -> dict[str, Any]:
        """`owner`'s batches, newest first; `after` is the last id of the previous page (OpenAI's cursor)."""
        index = keys.batches_index(owner)
        start = 0
        if after is not None:
            rank = await self.redis.zrevrank(index, after)
            start = 0 if rank is None else cast(int, rank) + 1
        ids = [text(i) for i in await self.redis.zrevrange(index, start, start + limit)]
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in ids[:limit]:
            pipe.hgetall(keys.batch(batch_id))
        rows = await pipe.execute() if ids else []
        data = [as_openai({k.decode(): v.decode() for k, v in row.items()}) for row in rows if row]
        return {"object": "list", "data": data, "has_more": len(ids) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def batch_owner(fields: dict[str, str]) -> str:
    """Batches made before owners were recorded belong to callers without a key."""
    return fields.get("owner") or keys.ANONYMOUS_OWNER


def as_openai(f: dict[str, str]) -> dict[str, Any]:
    """The hash as OpenAI's `batch` object (`openai.types.Batch`)."""
    out: dict[str, Any] = {"id": f["id"], "object": "batch", "endpoint": f["endpoint"], "errors": None,
                           "input_file_id": f["input_file_id"], "completion_window": f["completion_window"],
                           "status": f["status"], "output_file_id": f.get("output_file_id") or None,
                           "error_file_id": f.get("error_file_id") or None}
    for name in _INTS:
        out[name] = int(f[name]) if f.get(name) else None
    out["request_counts"] = {"total": int(f.get("total", 0)), "completed": int(f.get("completed", 0)),
                             "failed": int(f.get("failed", 0))}
    out["metadata"] = json.loads(f["metadata"]) if f.get("metadata") else None
    if f.get("errors"):
        out["errors"] = {"object": "list", "data": json.loads(f["errors"])}
    return out
