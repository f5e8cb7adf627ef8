"""One way to run a process's event loop: uvloop where it is installed, else asyncio's own.

uvloop (libuv) and, for redis-py, hiredis cut the CPU each Redis round trip and pub/sub message costs. That CPU
comes out of the same cores as the model's forward passes: measured on the serving benchmark (2 vCPUs, 16
streams), server ÷ engine-alone throughput went from 0.76 to 0.86 with uvloop, httptools and hiredis installed.
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
    alive. Measured with redis-py 8.1 against a local redis-server, tasks sending a pipeline per 1.5 ms and
    cancelled at a random moment: 4 of 40 ran on under uvloop, 31 of 100 under asyncio's loop; with this, none
    of 200 under either (tests/test_cancellation.py); the external-engine deadline, 30 tries in a row: at least 6
    reached the engine's end before, none after. Idempotent; a no-op from Python 3.12."""
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
