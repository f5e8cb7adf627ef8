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

In a Redis Cluster one hub serves one shard with sharded pub/sub (`sharded=True`: SSUBSCRIBE, `smessage`), and
`api/cluster_hub.py` routes each channel to its shard's hub. The standing channel stays a plain SUBSCRIBE (it
only keeps the connection in pub/sub mode, and a plain channel belongs to no slot, so it never moves). A channel
whose slot moved to another node is refused (MOVED) or dropped by the server (an `sunsubscribe` nobody asked
for): `open()` then raises ShardMoved (the router refreshes its slot map and retries), and a request already
waiting gets a 503, as on a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.errors import APIError, redis_unavailable
from common import keys
from common.protocol import Failed, encode

log = logging.getLogger("axion.api.replies")

SUBSCRIBE_TIMEOUT_S = 5.0
KEEPALIVE_SLACK_S = 0.005  # a read that times out this much early still counts as the deadline reached
RECONNECT_S = 0.5

_LOST = encode(Failed(status=503, type="server_error", code="redis_unavailable",
                      message="The connection to Redis was lost while this request waited for its answer; retry."))
_TOO_SLOW = encode(Failed(status=408, type="invalid_request_error", code="client_too_slow",
                          message="The client stopped reading this stream; its undelivered output passed "
                                  "STREAM_BUFFER_BYTES and the request was dropped."))
_MOVED = encode(Failed(status=503, type="server_error", code="redis_unavailable",
                       message="The Redis Cluster moved this request's reply channel to another node while the "
                               "request waited for its answer; retry."))


class ShardMoved(Exception):
    """The node no longer owns the channel's slot: route it again with a fresh slot map."""


class ShardPubSub(PubSub):
    """redis-py's PubSub, resubscribing shard channels one slot at a time after a reconnect: one SSUBSCRIBE of
    channels in several slots is refused (CROSSSLOT), even when one node owns them all."""

    async def _resubscribe_shard_channels(self) -> None:
        by_slot: dict[int, dict] = {}
        for channel, handler in self.shard_channels.items():
            by_slot.setdefault(key_slot(self.encoder.encode(channel)), {})[channel] = handler
        for subscriptions in by_slot.values():
            await self._resubscribe(subscriptions, self.ssubscribe)


class Subscription:
    """The messages of one channel (a request's events, or a cache lease's done notice), in arrival order.

    With `bound(limit, on_overflow)`, at most `limit` bytes wait: past it, what waits is dropped for one final
    `client_too_slow` event and `on_overflow` runs (the consumer is a client that stopped reading)."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.confirmed = asyncio.get_running_loop().create_future()
        self.failed = False
        self.waiting_bytes = 0
        self._limit: int | None = None
        self._on_overflow: Callable[[], None] | None = None

    def bound(self, limit: int, on_overflow: Callable[[], None]) -> None:
        self._limit, self._on_overflow = limit, on_overflow

    def deliver(self, data: bytes) -> None:
        """Queue one message from the channel (nothing more once the bound was passed)."""
        if self.failed:
            return
        self.waiting_bytes += len(data)
        if self._limit is not None and self.waiting_bytes > self._limit:
            self.failed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.waiting_bytes = len(_TOO_SLOW)
            self.queue.put_nowait(_TOO_SLOW)
            if self._on_overflow is not None:
                self._on_overflow()
            return
        self.queue.put_nowait(data)

    async def get(self, timeout: float | None) -> bytes:
        if not self.queue.empty():  # events already waiting (a burst, a stream behind): no timer to arm
            data = self.queue.get_nowait()
        else:
            # Not asyncio.wait_for: on Python 3.11 it loses a cancellation that lands as the queue hands over an
            # event (it returns the event instead), and a request whose client left then runs to its end.
            async with asyncio.timeout(timeout):
                data = await self.queue.get()
        self.waiting_bytes -= len(data)
        return data

    def fail(self, moved: bool = False) -> None:
        """The connection dropped (or, `moved`, the channel's slot went to another node): a subscription still
        being set up raises in `open()`; a live one receives a final 503 event after whatever had arrived."""
        if self.failed:
            return
        self.failed = True
        if not self.confirmed.done():
            self.confirmed.set_exception(ShardMoved(self.channel) if moved else
                                         redis_unavailable("Redis dropped the connection during SUBSCRIBE."))
        else:
            self.waiting_bytes += len(_MOVED if moved else _LOST)
            self.queue.put_nowait(_MOVED if moved else _LOST)


class Hub(Protocol):
    """What the API uses of a reply hub: `ReplyHub` on one Redis server, `ClusterReplyHub` (api/cluster_hub.py)
    on a Redis Cluster."""

    @property
    def connected(self) -> bool: ...

    @property
    def last_error(self) -> str | None: ...

    @property
    def open_count(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def open(self, request_id: str | None = None, *, channel: str | None = None) -> Subscription: ...

    async def close(self, sub: Subscription) -> None: ...


class ReplyHub:
    def __init__(self, redis: aioredis.Redis, timeout_s: float = 2.0, *, sharded: bool = False) -> None:
        self.sharded = sharded
        self._pubsub = ShardPubSub(redis.connection_pool) if sharded else redis.pubsub()
        self._subscribe = self._pubsub.ssubscribe if sharded else self._pubsub.subscribe
        self._unsubscribe_cmd = self._pubsub.sunsubscribe if sharded else self._pubsub.unsubscribe
        self._types = ("smessage", "ssubscribe") if sharded else ("message", "subscribe")
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
            # One bound on the lock, the SUBSCRIBE and its confirmation: requests queued behind a SUBSCRIBE stuck
            # on a reconnect must not hold the lock, one after another, while the reader waits for it to PING.
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                async with self._lock:
                    if not self.connected:  # lost while this request waited for the lock
                        raise redis_unavailable(f"No connection to Redis for replies ({self.last_error}).")
                    await self._subscribe(sub.channel)
                await asyncio.shield(sub.confirmed)
        except TimeoutError:
            await self.close(sub)
            raise redis_unavailable(f"Redis did not confirm a subscription within {SUBSCRIBE_TIMEOUT_S:g}s.") \
                from None
        except (MovedError, AskError):
            await self.close(sub)
            raise
        except RedisError as exc:  # the SUBSCRIBE could not be sent: the connection is broken for every request
            await self.close(sub)
            self._lost(exc)
            raise redis_unavailable(f"No connection to Redis for replies ({self.last_error}).") from None
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
                    if self._holds(sub.channel):
                        await self._unsubscribe_cmd(sub.channel)

    async def _read_loop(self) -> None:
        while True:
            try:
                if self._pubsub.connection is None:  # never connected yet (Redis was down at start)
                    await self._connect()
                message = await self._pubsub.get_message(timeout=self._wait_s())
                await self._keepalive(message is not None)
            except asyncio.CancelledError:
                raise
            except (MovedError, AskError) as exc:  # an SSUBSCRIBE sent to a node that no longer owns the slot
                self._moved(functools.partial(self._in_slot, slot=exc.slot_id), confirmed=False)
                continue
            except Exception as exc:  # Redis went away: the next read reconnects and resubscribes.
                self._lost(exc)
                await asyncio.sleep(RECONNECT_S)
                continue
            if message is None:
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            data_type, confirm_type = self._types
            for sub in self._subs.get(channel, ()):
                if message["type"] == data_type:
                    sub.deliver(message["data"])
                elif message["type"] == confirm_type and not sub.confirmed.done():
                    sub.confirmed.set_result(None)
            if self.sharded and message["type"] == "sunsubscribe" and self._subs.get(channel):
                self._moved(functools.partial(operator.eq, channel), confirmed=True)  # the server dropped it

    def _in_slot(self, channel: str, slot: int) -> bool:
        return self._slot(channel) == slot

    def _wait_s(self) -> float:
        """How long the next read may wait: until the next keep-alive decision (a PING due, or its PONG overdue),
        at most 1 s. Waiting a fixed second instead let a read that woke a hair before the deadline (timer
        granularity: seen with uvloop) postpone the PING by a whole second, so a hung Redis took 3 timeouts to
        notice, not 2."""
        due = (self._ping_at if self._ping_at is not None else self._heard_at) + self.timeout_s
        return min(1.0, max(KEEPALIVE_SLACK_S, due - time.monotonic()))

    async def _keepalive(self, heard: bool) -> None:
        """PING a silent connection; raise when the PONG is overdue (the server hangs: no error would come)."""
        now = time.monotonic()
        late = now + KEEPALIVE_SLACK_S
        if heard:
            self._heard_at, self._ping_at = now, None
        elif self._ping_at is not None:
            if late - self._ping_at > self.timeout_s:
                self._ping_at = None
                if self._pubsub.connection is not None:
                    await self._pubsub.connection.disconnect()
                raise RedisTimeoutError(f"no PONG within {self.timeout_s:g}s")
        elif late - self._heard_at > self.timeout_s:
            self._ping_at = now
            try:
                async with asyncio.timeout(self.timeout_s), self._lock:  # a lock held that long: the link is stuck
                    await self._pubsub.ping()
            except TimeoutError:
                raise RedisTimeoutError(f"could not send a PING within {self.timeout_s:g}s") from None

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
        held = self._pubsub.shard_channels if self.sharded else self._pubsub.channels
        stale = [c for c in held if self._name(c) not in self._subs and self._name(c) != self.replica_channel]
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
                for channel in channels:  # one at a time: a sharded unsubscribe may not span slots
                    await self._unsubscribe_cmd(channel)

    def _moved(self, matches: Callable[[str], bool], confirmed: bool) -> None:
        """Fail the subscriptions of the channels `matches` picks (confirmed ones, or those still being set up)
        whose slot this node no longer owns, and forget those channels, so no reconnect resubscribes them here."""
        for channel, subs in list(self._subs.items()):
            if not matches(channel):
                continue
            for sub in list(subs):
                if sub.confirmed.done() == confirmed:
                    sub.fail(moved=True)
            if all(sub.failed for sub in subs):  # a newer SSUBSCRIBE of the channel may still be on its way
                for name in (channel, channel.encode()):
                    self._pubsub.shard_channels.pop(name, None)

    def _holds(self, channel: str) -> bool:
        """Whether the server still has this channel subscribed here (a moved shard channel was dropped)."""
        if not self.sharded:
            return True
        held = self._pubsub.shard_channels
        return channel in held or channel.encode() in held

    @staticmethod
    def _slot(channel: str) -> int:
        return key_slot(channel.encode())

    @staticmethod
    def _name(channel: bytes | str) -> str:
        return channel.decode() if isinstance(channel, bytes) else channel


__all__ = ["APIError", "ReplyHub", "ShardMoved", "Subscription"]
