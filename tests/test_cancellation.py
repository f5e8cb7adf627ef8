"""A task cancelled while it sends to Redis stops (common/aio.py's `wait_for` backport, Python 3.11).

On 3.11, redis-py's send goes through `asyncio.wait_for`, which drops a cancellation that lands as the send
completes: an external-engine relay cancelled at its deadline streamed on to the engine's end (the flake of
test_external_engine's deadline case), a heartbeat cancelled at shutdown could keep a worker alive."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from common import aio, redis_client
from common.settings import load_settings
from workers.stream_worker import StreamWorker

WaitFor = Callable[[Awaitable[Any], float | None], Awaitable[Any]]


async def _cancel_as_the_result_arrives(wait_for: WaitFor) -> str:
    inner = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(wait_for(inner, 10))
    await asyncio.sleep(0)  # the task now waits on `inner`
    inner.set_result("sent")
    task.cancel()  # in the same turn of the loop as the result
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    return "ran on"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the bug is 3.11's; 3.12's wait_for is the one we backport")
def test_python_311_wait_for_loses_that_cancellation() -> None:
    """The race exists on the interpreter under test, deterministically, so the tests below can fail."""
    assert asyncio.run(_cancel_as_the_result_arrives(asyncio.tasks.wait_for)) == "ran on"


def test_the_backport_keeps_it() -> None:
    assert asyncio.run(_cancel_as_the_result_arrives(aio._wait_for)) == "cancelled"


def test_the_backport_times_out_and_returns_as_wait_for_does() -> None:
    async def main() -> None:
        assert await aio._wait_for(asyncio.sleep(0, "done"), 1) == "done"
        assert await aio._wait_for(asyncio.sleep(0, "no bound"), None) == "no bound"
        with pytest.raises(TimeoutError):
            await aio._wait_for(asyncio.sleep(5), 0.01)
        with pytest.raises(TimeoutError):
            await aio._wait_for(asyncio.sleep(5), 0)
        done = asyncio.get_running_loop().create_future()
        done.set_result("ready")
        assert await aio._wait_for(done, 0) == "ready"  # already done: its result even with no time left

    asyncio.run(main())


def test_tasks_cancelled_while_they_send_pipelines_stop(redis_server) -> None:  # type: ignore[no-untyped-def]
    """As the relay does per chunk (PUBLISH, RPUSH, EXPIRE in one pipeline), cancelled at 60 different moments;
    the client is the one every process opens. Without the backport 4-31% of these ran on (uvloop / asyncio)."""
    settings = load_settings({"REDIS_URL": redis_server.url, "REDIS_TIMEOUT_S": "2"})

    async def main() -> list[int]:
        client = redis_client.connect(settings)

        async def relay(k: int) -> None:
            for _ in range(400):
                pipe = client.pipeline(transaction=False)
                pipe.publish(f"axion-test:cancel:{k}", "x" * 64).rpush(f"axion-test:cancel:{k}", 1)
                pipe.expire(f"axion-test:cancel:{k}", 60)
                await pipe.execute()
                await asyncio.sleep(0.001)

        ran_on = []
        try:
            for k in range(60):
                task = asyncio.ensure_future(relay(k))
                await asyncio.sleep(0.02 + (k % 11) * 0.0017)
                task.cancel()
                try:
                    await task
                    ran_on.append(k)
                except asyncio.CancelledError:
                    pass
        finally:
            await client.aclose()
        return ran_on

    assert aio.run(main()) == []


class _IdleWorker(StreamWorker):
    async def iteration(self) -> None:
        await asyncio.sleep(0.005)


def test_a_worker_whose_heartbeat_is_sending_still_stops(redis_server) -> None:  # type: ignore[no-untyped-def]
    """A heartbeat every ~3 ms, so the stop's cancellation usually finds it writing to Redis: every one of 30
    workers stops within 5 s. Before the backport a cancelled beat could run on and keep `run` waiting for it for
    good (the worker that did not exit within 30 s of SIGTERM, seen in test_admission_e2e's teardown)."""
    settings = load_settings({"REDIS_URL": redis_server.url, "REDIS_TIMEOUT_S": "2", "HEARTBEAT_TTL_S": "0.01"})

    async def main() -> list[int]:
        client = redis_client.connect(settings)
        hung = []
        try:
            for k in range(30):
                worker = _IdleWorker(settings, client, kind="chat", model_id=f"axion-test-cancel-{k}",
                                     stream=f"axion-test:cancel-stream:{k}", device="cpu", dtype="float32")
                worker.handles_signals = False
                running = asyncio.ensure_future(worker.run())
                await asyncio.sleep(0.03 + (k % 7) * 0.0023)
                worker.stop()
                done, _ = await asyncio.wait({running}, timeout=5)
                if not done:
                    hung.append(k)
                    running.cancel()
        finally:
            await client.aclose()
        return hung

    assert aio.run(main()) == []
