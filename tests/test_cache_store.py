"""The shared LRU and the cache key, on a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from api.cache import LruStore, cache_key, decide
from common.redis_server import EmbeddedRedis


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def url(redis_server: EmbeddedRedis) -> str:
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


async def _store(url: str, capacity: int, namespace: str = "t", ttl_s: float = 0.0) -> LruStore:
    return LruStore(aioredis.from_url(url), namespace, capacity, ttl_s)


def test_eviction_is_lru_at_capacity_3(url: str) -> None:
    async def go() -> None:
        store = await _store(url, 3)
        for name in ("a", "b", "c"):
            await store.put(name, name.encode())
        assert await store.get("a") == b"a"  # a is now the most recently used: b is the oldest
        await store.put("d", b"d")  # evicts b
        assert await store.members() == ["c", "a", "d"]
        assert await store.get("b") is None
        await store.get("c")
        await store.put("e", b"e")  # evicts a (order of last use: a, d, c)
        assert await store.members() == ["d", "c", "e"]
        assert [await store.get(m) for m in ("a", "c", "d", "e")] == [None, b"c", b"d", b"e"]
        stats = await store.stats()
        assert stats["entries"] == 3 and stats["capacity"] == 3
        assert stats["hits"] == 5 and stats["misses"] == 2
        await store.redis.aclose()

    _run(go())


def test_two_clients_share_one_lru(url: str) -> None:
    async def go() -> None:
        one, two = await _store(url, 2), await _store(url, 2)
        await one.put("x", b"1")
        await two.put("y", b"2")
        assert await two.get("x") == b"1"  # x used last, through the other client
        await one.put("z", b"3")  # evicts y
        assert await one.get("y") is None and await two.get("x") == b"1"
        await one.redis.aclose()
        await two.redis.aclose()

    _run(go())


def test_capacity_zero_is_off_and_ttl_expires(url: str) -> None:
    async def go() -> None:
        off = await _store(url, 0, "off")
        await off.put("a", b"a")
        assert await off.get("a") is None and await off.members() == []
        short = await _store(url, 10, "ttl", ttl_s=0.05)
        await short.put("a", b"a")
        assert await short.get("a") == b"a"
        await asyncio.sleep(0.2)
        assert await short.get("a") is None and await short.members() == []
        await off.redis.aclose()
        await short.redis.aclose()

    _run(go())


def test_get_many_keeps_order(url: str) -> None:
    async def go() -> None:
        store = await _store(url, 10, "many")
        await store.put_many([("a", b"1"), ("c", b"3")])
        assert await store.get_many(["a", "b", "c"]) == [b"1", None, b"3"]
        await store.redis.aclose()

    _run(go())


def test_key_depends_on_model_revision_and_request_not_order() -> None:
    base = cache_key("m", "rev1", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    assert base == cache_key("m", "rev1", {"temperature": 0, "messages": [{"content": "hi", "role": "user"}]})
    assert base != cache_key("m", "rev2", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    assert base != cache_key("n", "rev1", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0})


def test_cache_control_directives() -> None:
    assert (decide("k", None).read, decide("k", None).write, decide("k", None).header) == (True, True, "miss")
    no_cache = decide("k", "no-cache")
    assert (no_cache.read, no_cache.write, no_cache.header) == (False, True, "bypass")
    no_store = decide("k", "max-age=0, No-Store")
    assert (no_store.key, no_store.read, no_store.write, no_store.header) == (None, False, False, "bypass")
    assert decide(None, None).header == "bypass"
