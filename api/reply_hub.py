"""One pub/sub connection per API replica, fanned out to per-request queues.

Pub/sub is at-most-once: a message published before the subscription is active is lost for good. So `open()`
returns only after Redis has confirmed the SUBSCRIBE, and the caller enqueues the job after that. One shared
connection keeps a replica at one Redis connection for any number of open streams.

The same rule decides what a lost connection means. Whatever was published while it was down is gone, so every
request waiting on it at that moment gets a 503 `redis_unavailable` event (a streaming client gets it as an error
frame) instead of waiting for tokens that will never come or relaying an answer with a hole in it. The reader
reconnects by itself (redis-py resubscribes the channels still open); new requests are refused with the same
503 until it has, and `connected` tells /health. A Redis that hangs instead of closing the connection is found
by a PING after `timeout_s` of silence: no PONG within `timeout_s` more counts as a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.errors import APIError, redis_unavailable
from common import keys
from common.protocol import Failed, encode

log = logging.getLogger("axion.api.replies")

SUBSCRIBE_TIMEOUT_S = 5.0
RECONNECT_S = 0.5

_LOST = encode(Failed(status=503, type="server_error", code="redis_unavailable",
                      message="The connection to Redis was lost while this request waited for its answer; retry."))


class Subscription:
    """The messages of one channel (a request's events, or a cache lease's done notice), in arrival order."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.confirmed = asyncio.get_running_loop().create_future()
        self.failed = False

    async def get(self, timeout: float | None) -> bytes:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def fail(self) -> None:
        """The connection dropped: a subscription still being set up raises in `open()`; a live one receives a
        final 503 event after whatever had arrived before the drop."""
        if self.failed:
            return
        self.failed = True
        if not self.confirmed.done():
            self.confirmed.set_exception(redis_unavailable("Redis dropped the connection during SUBSCRIBE."))
        else:
            self.queue.put_nowait(_LOST)


class ReplyHub:
    def __init__(self, redis: aioredis.Redis, timeout_s: float = 2.0) -> None:
        self._pubsub = redis.pubsub()
        self.timeout_s = timeout_s
        self._heard_at = time.monotonic()  # when the connection last proved alive (any message)
        self._ping_at: float | None = None  # when an unanswered PING went out
        self._subs: dict[str, set[Subscription]] = {}  # by channel: several waiters may share a cache channel
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.replica_channel = f"{keys.PREFIX}:api:{uuid.uuid4().hex[:12]}"
        self.connected = False
        self.last_error: str | None = None
        self._down_logged = False

    async def start(self) -> None:
        """Connect and start the reader. Never fails: with Redis down the reader keeps trying, and requests get
        a 503 until it succeeds, so an API replica may start before Redis does."""
        try:
            await self._connect()
        except Exception as exc:
            self._lost(exc)
        self._reader = asyncio.create_task(self._read_loop(), name="axion-reply-hub")

    async def _connect(self) -> None:
        # A standing subscription keeps the connection in pub/sub mode even when no request is open.
        await self._pubsub.subscribe(self.replica_channel)
        assert self._pubsub.connection is not None
        self._pubsub.connection.register_connect_callback(self._reconnected)
        self._set_connected()

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
        if not self.connected:
            raise redis_unavailable(f"No connection to Redis for replies ({self.last_error}).")
        sub = Subscription(channel or keys.reply_channel(request_id or ""))
        self._subs.setdefault(sub.channel, set()).add(sub)
        try:
            async with self._lock:
                await self._pubsub.subscribe(sub.channel)
            await asyncio.wait_for(asyncio.shield(sub.confirmed), SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            await self.close(sub)
            raise redis_unavailable(f"Redis did not confirm a subscription within {SUBSCRIBE_TIMEOUT_S:g}s.") \
                from None
        except BaseException:
            await self.close(sub)
            raise
        return sub

    async def close(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is not None:
            subs.discard(sub)
        if not self.connected:  # nothing to tell Redis now; the reconnect drops the channels no one holds
            if not self._subs.get(sub.channel):
                self._subs.pop(sub.channel, None)
            return
        with contextlib.suppress(Exception):
            async with self._lock:
                if not self._subs.get(sub.channel):  # the last one out unsubscribes
                    self._subs.pop(sub.channel, None)
                    await self._pubsub.unsubscribe(sub.channel)

    async def _read_loop(self) -> None:
        while True:
            try:
                if self._pubsub.connection is None:  # never connected yet (Redis was down at start)
                    await self._connect()
                message = await self._pubsub.get_message(timeout=min(1.0, self.timeout_s))
                await self._keepalive(message is not None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: the next read reconnects and resubscribes.
                self._lost(exc)
                await asyncio.sleep(RECONNECT_S)
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

    async def _keepalive(self, heard: bool) -> None:
        """PING a silent connection; raise when the PONG is overdue (the server hangs: no error would come)."""
        now = time.monotonic()
        if heard:
            self._heard_at, self._ping_at = now, None
        elif self._ping_at is not None:
            if now - self._ping_at > self.timeout_s:
                self._ping_at = None
                if self._pubsub.connection is not None:
                    await self._pubsub.connection.disconnect()
                raise RedisTimeoutError(f"no PONG within {self.timeout_s:g}s")
        elif now - self._heard_at > self.timeout_s:
            self._ping_at = now
            async with self._lock:
                await self._pubsub.ping()

    def _lost(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        if not self._down_logged:
            self._down_logged = True
            log.warning("reply hub has no Redis connection (%s); failing %d waiting requests, reconnecting",
                        self.last_error, self.open_count)
        self.connected = False
        self._fail(confirmed_only=False)

    def _reconnected(self, _connection: object) -> None:
        """redis-py's connect callback, run on every reconnect after it has resubscribed our channels. Messages
        published while the connection was down are lost, so every request subscribed before is failed (those
        the read error already failed are skipped); channels closed meanwhile are unsubscribed. A subscription
        still awaiting its confirmation was resubscribed with the rest and goes on."""
        self._fail(confirmed_only=True)
        stale = [c for c in self._pubsub.channels if self._name(c) not in self._subs
                 and self._name(c) != self.replica_channel]
        if stale:
            task = asyncio.ensure_future(self._unsubscribe(stale))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._set_connected()

    def _set_connected(self) -> None:
        if self._down_logged:
            log.info("reply hub reconnected to Redis")
        self.connected = True
        self.last_error = None
        self._down_logged = False
        self._heard_at, self._ping_at = time.monotonic(), None

    def _fail(self, confirmed_only: bool) -> None:
        for subs in self._subs.values():
            for sub in subs:
                if not confirmed_only or sub.confirmed.done():
                    sub.fail()

    async def _unsubscribe(self, channels: list[bytes | str]) -> None:
        with contextlib.suppress(Exception):
            async with self._lock:
                await self._pubsub.unsubscribe(*channels)

    @staticmethod
    def _name(channel: bytes | str) -> str:
        return channel.decode() if isinstance(channel, bytes) else channel


__all__ = ["APIError", "ReplyHub", "Subscription"]
