"""The response cache: an exact LRU in Redis shared by every API replica, and the single-flight lease.

Each namespace (chat responses, embedding vectors) is three keys in one hash slot: the entries (plain string
keys, optionally with a TTL), a sorted set ranking their members by last use, and a counter that gives every
use a fresh, strictly increasing rank across replicas. A Lua script reads or writes an entry and re-ranks it in
one atomic step, and the write evicts the least recently used members until the namespace holds at most
`capacity` entries. An entry that expired by TTL leaves its member in the ranking until it is read (then the
member is dropped) or evicted, so it can take a place in the capacity until then.

Single-flight: the first replica to take a request's lease generates; identical requests meanwhile wait for
the done notice on the lease's channel (or for the lease to vanish, when its holder died) and read the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis

from common import keys
from common.redis_cluster import publish, text
from common.settings import Settings

if TYPE_CHECKING:
    from api.reply_hub import Hub

log = logging.getLogger("axion.api.cache")

CHAT_NAMESPACE = "chat"  # whole chat-completion responses
EMBED_NAMESPACE = "embed"  # one vector per (model, revision, input, dimensions, truncate)
KEY_VERSION = "1"  # bump when the canonical form changes: old entries then simply miss
LEASE_S = 30.0  # a single-flight lease lives this long unless its holder renews it
LEASE_RENEW_S = 10.0

# KEYS: ranking, clock, stats; ARGV: entry-key prefix, then members. Returns the values (false = missing).
_GET = """
local out = {}
local hits = 0
for i = 2, #ARGV do
  local value = redis.call('GET', ARGV[1] .. ARGV[i])
  if value then
    redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), ARGV[i])
    hits = hits + 1
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
  out[#out + 1] = value
end
if hits > 0 then redis.call('HINCRBY', KEYS[3], 'hits', hits) end
if #ARGV - 1 - hits > 0 then redis.call('HINCRBY', KEYS[3], 'misses', #ARGV - 1 - hits) end
return out
"""

# KEYS: ranking, clock; ARGV: entry-key prefix, capacity, ttl ms (0 = none), then member, value pairs.
_PUT = """
local ttl = tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  if ttl > 0 then
    redis.call('SET', ARGV[1] .. ARGV[i], ARGV[i + 1], 'PX', ttl)
  else
    redis.call('SET', ARGV[1] .. ARGV[i], ARGV[i + 1])
  end
  redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), ARGV[i])
end
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if excess > 0 then
  for _, member in ipairs(redis.call('ZPOPMIN', KEYS[1], excess)) do
    if _ % 2 == 1 then redis.call('DEL', ARGV[1] .. member) end
  end
end
return excess
"""


class LruStore:
    """One namespace of the shared LRU. `capacity` 0 turns it off (every read misses, writes do nothing)."""

    def __init__(self, redis: aioredis.Redis, namespace: str, capacity: int, ttl_s: float = 0.0) -> None:
        self.redis = redis
        self.namespace = namespace
        self.capacity = capacity
        self.ttl_ms = int(ttl_s * 1000)
        self._prefix = keys.cache_entry_prefix(namespace)
        self._ranking = keys.cache_ranking(namespace)
        self._clock = keys.cache_clock(namespace)
        self._stats = keys.cache_stats(namespace)
        self._get = redis.register_script(_GET)
        self._put = redis.register_script(_PUT)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    async def get_many(self, members: list[str]) -> list[bytes | None]:
        if not self.enabled or not members:
            return [None] * len(members)
        values = await self._get(keys=[self._ranking, self._clock, self._stats], args=[self._prefix, *members])
        return [v if v else None for v in values]

    async def get(self, member: str) -> bytes | None:
        return (await self.get_many([member]))[0]

    async def put_many(self, items: list[tuple[str, bytes]]) -> None:
        if not self.enabled or not items:
            return
        flat = [x for member, value in items for x in (member, value)]
        await self._put(keys=[self._ranking, self._clock], args=[self._prefix, self.capacity, self.ttl_ms, *flat])

    async def put(self, member: str, value: bytes) -> None:
        await self.put_many([(member, value)])

    async def members(self) -> list[str]:
        """Members from least to most recently used (for tests and `redis-cli` minded operators)."""
        return [text(m) for m in await self.redis.zrange(self._ranking, 0, -1)]

    async def stats(self) -> dict[str, int]:
        raw = await self.redis.hgetall(self._stats)
        return {"hits": int(raw.get(b"hits", 0)), "misses": int(raw.get(b"misses", 0)),
                "entries": int(await self.redis.zcard(self._ranking)), "capacity": self.capacity}


async def cache_stats(redis: aioredis.Redis, settings: Settings) -> dict[str, dict[str, int]]:
    """Hits, misses, entries and capacity of every namespace, summed over all API replicas (for /health).
    Embedding counts are per input, not per request: a request of 10 inputs with 3 cached adds 3 hits."""
    stores = {"chat": LruStore(redis, CHAT_NAMESPACE, settings.cache_capacity),
              "embed": LruStore(redis, EMBED_NAMESPACE, settings.embed_cache_capacity)}
    return {name: await store.stats() for name, store in stores.items()}


def cache_key(model: str, revision: str, request: dict[str, Any]) -> str:
    """SHA-256 of the canonical request: model, model revision and every output-changing field.

    `request` is the request as plain data with the fields that cannot change the output already removed;
    keys are sorted, so field order in the client's JSON does not matter.
    """
    canonical = msgspec.json.encode({"v": KEY_VERSION, "model": model, "revision": revision, "request": request},
                                    order="sorted")
    return hashlib.sha256(canonical).hexdigest()


@dataclass
class CacheDecision:
    """What the cache may do for one request: read it, write it, and the `x-axion-cache` value to send when
    nothing is read (`bypass`, or `miss` once a read found nothing)."""

    key: str | None
    read: bool
    write: bool

    @property
    def header(self) -> str:
        return "miss" if self.read else "bypass"


def decide(key: str | None, cache_control: str | None) -> CacheDecision:
    """`Cache-Control: no-cache` skips the read but stores the fresh answer; `no-store` skips both."""
    directives = {d.strip().lower() for d in (cache_control or "").split(",")}
    if key is None or "no-store" in directives:
        return CacheDecision(None, False, False)
    return CacheDecision(key, "no-cache" not in directives, True)


class SingleFlight:
    """Leases on cache keys, so one generation serves every identical request that arrives meanwhile."""

    def __init__(self, redis: aioredis.Redis, hub: Hub) -> None:
        self.redis = redis
        self.hub = hub

    async def try_lead(self, key: str, holder: str) -> bool:
        return bool(await self.redis.set(keys.cache_lease(key), holder, nx=True, px=int(LEASE_S * 1000)))

    async def renew(self, key: str, holder: str, most_s: float) -> None:
        """Keep the lease alive while its holder generates (run as a task, cancelled by the holder), at most
        `most_s`: no generation outlives its request's deadline, so a holder that never released the lease
        holds it no longer than that."""
        deadline = asyncio.get_running_loop().time() + most_s
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(LEASE_RENEW_S)
            with contextlib.suppress(Exception):
                await self.redis.set(keys.cache_lease(key), holder, xx=True, px=int(LEASE_S * 1000))

    async def release(self, key: str) -> None:
        """Free the lease and tell the waiters to read the cache (or to generate, when nothing was stored)."""
        with contextlib.suppress(Exception):
            pipe = self.redis.pipeline(transaction=False)
            publish(pipe.delete(keys.cache_lease(key)), keys.cache_done_channel(key), b"done")
            await pipe.execute()

    async def wait(self, key: str, store: LruStore, timeout: float) -> bytes | None:
        """Wait (at most `timeout`) for the leader; the cached answer, or None when the leader failed, died or
        took too long (then the caller generates itself)."""
        sub = await self.hub.open(channel=keys.cache_done_channel(key))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                if (value := await store.get(key)) is not None:
                    return value
                if not await self.redis.exists(keys.cache_lease(key)):
                    return None
                left = deadline - loop.time()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await sub.get(min(left, 1.0))
        finally:
            await self.hub.close(sub)
