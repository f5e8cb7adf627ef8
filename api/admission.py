"""The per-model bound on waiting work: at most MAX_QUEUED_JOBS entries in a model's job stream, fleet-wide.

Workers XDEL an entry once it is answered, so a stream's XLEN is its jobs waiting plus running (delivered and
not yet answered, i.e. pending). The check and the XADD run in one Lua script: one round trip, the same as the
bare XADD it replaces, and exact across any number of API replicas (two replicas cannot both take the last
place). A full queue is a 429 with Retry-After at once; nothing waits on a worker to find out.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from api.errors import APIError

# KEYS[1] the job stream; ARGV[1] the bound, ARGV[2] the job. Returns {1, entry id} or {0, current length}.
_ENQUEUE = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then
  return {0, n}
end
return {1, redis.call('XADD', KEYS[1], '*', 'job', ARGV[2])}
"""


class QueueGate:
    def __init__(self, redis: aioredis.Redis, limit: int) -> None:
        self._redis = redis
        self.limit = limit
        self._enqueue = redis.register_script(_ENQUEUE)

    async def check(self, stream_key: str, model: str) -> None:
        """429 when the model's queue is already full: a request about to wait for one of this replica's
        CONCURRENT_REQUESTS slots learns it at once, instead of after the wait."""
        depth = int(await self._redis.xlen(stream_key))
        if depth >= self.limit:
            raise self._full(model, depth)

    async def enqueue(self, stream_key: str, model: str, job: bytes) -> bytes:
        """XADD the job under the field `job` unless the stream already holds `limit` entries (then 429)."""
        added, value = await self._enqueue(keys=[stream_key], args=[self.limit, job])
        if not added:
            raise self._full(model, int(value))
        return bytes(value)

    def _full(self, model: str, depth: int) -> APIError:
        return APIError(429, f"The queue for model '{model}' is full ({depth} jobs waiting or running, "
                             f"MAX_QUEUED_JOBS={self.limit}); retry shortly.", code="queue_full",
                        headers={"Retry-After": "1"})
