"""The yardstick of `bench/cache_bench.py`: a Litestar app whose one route reads the request body, does one Redis
GET and returns the value, under uvicorn exactly as `axion api` runs (one process, same Redis client options).

Whatever a cache hit costs beyond this (decoding and validating the request, the cache key, the Lua script,
re-encoding) is the cache path's own overhead.

    BARE_REDIS_URL=redis://... BARE_KEY=k python -m uvicorn --factory bench._bare_app:create_app --port 8001
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from litestar import Litestar, Request, Response, post
from litestar.datastructures import State


@post("/bare", status_code=200)
async def bare(request: Request[Any, Any, State], state: State) -> Response[bytes]:
    await request.body()
    value = await state.redis.get(state.key)
    if value is None:
        return Response(b'{"error": "the bench key is not set"}', status_code=500, media_type="application/json")
    return Response(value, media_type="application/json")


def create_app() -> Litestar:
    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.redis = aioredis.from_url(os.environ["BARE_REDIS_URL"], health_check_interval=30)
        app.state.key = os.environ["BARE_KEY"]
        try:
            yield
        finally:
            await app.state.redis.aclose()

    return Litestar(route_handlers=[bare], lifespan=[lifespan], logging_config=None)
