"""One way to run a process's event loop: uvloop where it is installed, else asyncio's own.

uvloop (libuv) and, for redis-py, hiredis cut the CPU each Redis round trip and pub/sub message costs, CPU that
comes out of the same cores as the model's forward passes (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # Windows has no uvloop
        return asyncio.run(main)
    return uvloop.run(main)


def backport_wait_for() -> None:
    """On Python 3.11, replace `asyncio.wait_for` with Python 3.12's, which is built on `asyncio.timeout`.

    3.11's `wait_for` returns the awaited result instead of raising when a cancellation lands as that result
    arrives (CPython gh-86296, fixed in 3.12), and the cancelled task runs on. redis-py bounds every send with
    `wait_for` when the connection has a socket timeout, which ours always have (`common/redis_client.py`), so a
    cancellation that reached a task while it wrote to Redis was lost: an external-engine relay cancelled at its
    request's deadline streamed on to the engine's end, a heartbeat loop cancelled at shutdown kept the worker
    alive (tests/test_cancellation.py). Idempotent; a no-op from Python 3.12."""
    if sys.version_info >= (3, 12) or asyncio.wait_for is _wait_for:
        return
    asyncio.wait_for = _wait_for  # type: ignore[assignment]


async def _wait_for(fut: Awaitable[T], timeout: float | None) -> T:
    """Python 3.12's `asyncio.wait_for`."""
    if timeout is not None and timeout <= 0:
        task = asyncio.ensure_future(fut)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait({task})
        try:
            return task.result()
        except asyncio.CancelledError as exc:
            raise TimeoutError from exc
    async with asyncio.timeout(timeout):
        return await fut
