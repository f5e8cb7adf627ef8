"""One pub/sub connection per API replica, fanned out to per-request queues.

Pub/sub is at-most-once: a message published before the subscription is active is lost for good. So `open()`
returns only after Redis has confirmed the SUBSCRIBE, and the caller enqueues the job after that. One shared
connection keeps a replica at one Redis connection for any number of open streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import redis.asyncio as aioredis

from common import keys

log = logging.getLogger("axion.api.replies")

SUBSCRIBE_TIMEOUT_S = 5.0


class Subscription:
    """The events of one request, in arrival order, as raw JSON bytes."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.channel = keys.reply_channel(request_id)
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.confirmed = asyncio.get_running_loop().create_future()

    async def get(self, timeout: float | None) -> bytes:
        return await asyncio.wait_for(self.queue.get(), timeout)


class ReplyHub:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._pubsub = redis.pubsub()
        self._subs: dict[str, Subscription] = {}
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self.replica_channel = f"{keys.PREFIX}:api:{uuid.uuid4().hex[:12]}"

    async def start(self) -> None:
        # A standing subscription keeps the connection in pub/sub mode even when no request is open.
        await self._pubsub.subscribe(self.replica_channel)
        self._reader = asyncio.create_task(self._read_loop(), name="axion-reply-hub")

    async def stop(self) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()

    @property
    def open_count(self) -> int:
        return len(self._subs)

    async def open(self, request_id: str) -> Subscription:
        sub = Subscription(request_id)
        self._subs[sub.channel] = sub
        try:
            async with self._lock:
                await self._pubsub.subscribe(sub.channel)
            await asyncio.wait_for(asyncio.shield(sub.confirmed), SUBSCRIBE_TIMEOUT_S)
        except BaseException:
            await self.close(sub)
            raise
        return sub

    async def close(self, sub: Subscription) -> None:
        self._subs.pop(sub.channel, None)
        with contextlib.suppress(Exception):
            async with self._lock:
                await self._pubsub.unsubscribe(sub.channel)

    async def _read_loop(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: redis-py reconnects and resubscribes on the next read.
                log.warning("reply hub read failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            sub = self._subs.get(channel)
            if sub is None:
                continue
            if message["type"] == "message":
                sub.queue.put_nowait(message["data"])
            elif message["type"] == "subscribe" and not sub.confirmed.done():
                sub.confirmed.set_result(None)
