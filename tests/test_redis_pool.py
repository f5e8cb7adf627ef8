"""The Redis client's pool under more commands in flight than redis-py's default pool holds (100), against a
real redis-server: 128 streams arriving at once on a GPU got 503s from MaxConnectionsError before the fix."""

from __future__ import annotations

import asyncio

from common import redis_client
from common.settings import load_settings


def _in_flight(url: str, commands: int, max_connections: int) -> list[object]:
    settings = load_settings({"REDIS_URL": url, "MAX_CONNECTIONS": str(max_connections), "REDIS_TIMEOUT_S": "2"})

    async def main() -> list[object]:
        client = redis_client.connect(settings)
        try:  # each BLPOP holds its connection for 0.3 s, so all of them are in flight together
            return await asyncio.gather(*(client.blpop([f"axion-test:pool:{i}"], timeout=0.3)
                                          for i in range(commands)), return_exceptions=True)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_more_commands_in_flight_than_redis_py_default_pool(redis_server) -> None:  # type: ignore[no-untyped-def]
    results = _in_flight(redis_server.url, 160, max_connections=200)
    assert [r for r in results if isinstance(r, BaseException)] == []


def test_a_full_pool_waits_for_a_free_connection_instead_of_failing(redis_server) -> None:  # type: ignore[no-untyped-def]
    """A pool of 4 + spare connections: the rest queue for a connection (each BLPOP frees its own after 0.3 s)."""
    results = _in_flight(redis_server.url, redis_client.POOL_SPARE + 12, max_connections=4)
    assert [r for r in results if isinstance(r, BaseException)] == []
