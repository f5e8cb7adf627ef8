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
    """The messages of one channel (a request's events, or a cache lease's done notice), in arrival order."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.confirmed = asyncio.get_running_loop().create_future()

    async def get(self, timeout: float | None) -> bytes:
        return await asyncio.wait_for(self.queue.get(), timeout)


class ReplyHub:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._pubsub = redis.pubsub()
        self._subs: dict[str, set[Subscription]] = {}  # by channel: several waiters may share a cache channel
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
        return sum(len(subs) for subs in self._subs.values())

    async def open(self, request_id: str | None = None, *, channel: str | None = None) -> Subscription:
        """Subscribe to a request's reply channel (or any `channel`); returns once Redis confirmed it."""
        sub = Subscription(channel or keys.reply_channel(request_id or ""))
        self._subs.setdefault(sub.channel, set()).add(sub)
        try:
            async with self._lock:
                await self._pubsub.subscribe(sub.channel)
            await asyncio.wait_for(asyncio.shield(sub.confirmed), SUBSCRIBE_TIMEOUT_S)
        except BaseException:
            await self.close(sub)
            raise
        return sub

    async def close(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is not None:
            subs.discard(sub)
        with contextlib.suppress(Exception):
            async with self._lock:
                if not self._subs.get(sub.channel):  # the last one out unsubscribes
                    self._subs.pop(sub.channel, None)
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
            for sub in self._subs.get(channel, ()):
                if message["type"] == "message":
                    sub.queue.put_nowait(message["data"])
                elif message["type"] == "subscribe" and not sub.confirmed.done():
                    sub.confirmed.set_result(None)
