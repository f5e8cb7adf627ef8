"""Taking over the jobs of workers that died, and giving up on jobs that keep killing workers.

A job stays in its consumer group's pending list from the moment a worker reads it until that worker
acknowledges it after publishing the final event. A live worker re-claims its own in-flight entries every few
seconds (`XCLAIM ... JUSTID`, which resets their idle time without counting a delivery), so an entry idle for
longer than VISIBILITY_TIMEOUT_S belongs to a worker that is dead or stuck. Any worker with free slots takes
such entries over with `XAUTOCLAIM` (each takeover counts a delivery); after MAX_DELIVERIES deliveries the
job goes to the model's dead-letter stream and its client gets an error instead of a hang.
"""

from __future__ import annotations

import logging
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT, StreamIdT

from common import keys
from common.protocol import Failed, encode
from common.redis_cluster import publish

Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry: its id and its fields

log = logging.getLogger("axion.worker.recovery")


def read_entries(reply: object) -> list[Entry]:
    """The entries of an XREAD/XREADGROUP reply: RESP2's [[stream, entries], ...], or None when nothing came
    (redis-py types the reply as a union of every protocol's shape)."""
    streams = cast("list[tuple[bytes, list[Entry]]] | None", reply)
    return [entry for _stream, entries in streams or [] for entry in entries]


async def refresh_own(redis: aioredis.Redis, stream: str, consumer: str, entry_ids: list[bytes]) -> None:
    """Mark this worker's in-flight entries as alive (idle time back to 0; the delivery count is unchanged)."""
    if entry_ids:
        try:
            await redis.xclaim(stream, keys.WORKER_GROUP, consumer, 0, list[StreamIdT](entry_ids), justid=True)
        except ResponseError as exc:  # the group is gone (Redis restarted empty): nothing left to keep alive
            log.warning("could not refresh in-flight jobs on %s: %s", stream, exc)


async def take_over(redis: aioredis.Redis, stream: str, consumer: str, min_idle_ms: int,
                    count: int) -> list[tuple[Entry, int]]:
    """Claim up to `count` entries idle for `min_idle_ms` or more; each with how often it has been delivered.
    Entries deleted meanwhile (answered, then XDELed, but not acknowledged) are acknowledged here."""
    reply = await redis.xautoclaim(stream, keys.WORKER_GROUP, consumer, min_idle_ms, start_id="0-0", count=count)
    entries: list[Entry] = [(entry_id, fields) for entry_id, fields in reply[1] if fields]
    deleted = list(reply[2]) if len(reply) > 2 else []
    deleted += [entry_id for entry_id, fields in reply[1] if not fields]
    if deleted:
        await redis.xack(stream, keys.WORKER_GROUP, *deleted)
    if not entries:
        return []
    pipe = redis.pipeline(transaction=False)
    for entry_id, _ in entries:
        pipe.xpending_range(stream, keys.WORKER_GROUP, min=entry_id, max=entry_id, count=1)
    counts = [rows[0]["times_delivered"] if rows else 1 for rows in await pipe.execute()]
    for (entry_id, _), delivered in zip(entries, counts, strict=True):
        log.warning("took over job %s from %s (delivery %d)", entry_id.decode(), stream, delivered)
    return list(zip(entries, counts, strict=True))


def dead_letter(pipe: aioredis.client.Pipeline, dead_stream: str, fields: dict[bytes, bytes], request_id: str,
                deliveries: int) -> aioredis.client.Pipeline:
    """Keep the job for inspection and tell its client; the caller acknowledges the entry in the same pipe."""
    entry: dict[FieldT, EncodableT] = {key: value for key, value in fields.items()}  # redis-py's type is invariant
    entry[b"deliveries"] = str(deliveries).encode()
    pipe.xadd(dead_stream, entry, maxlen=10_000, approximate=True)
    failure = Failed(status=503, type="server_error", code="worker_lost",
                     message=f"The request was abandoned after {deliveries - 1} workers stopped while running it.")
    return publish(pipe, keys.reply_channel(request_id), encode(failure))
