"""A decoding step's progress and events go to Redis in one Lua script (workers/chat/step_publish.py): against a
real redis-server, the lists, their expiry and the messages must be what the per-command pipeline wrote."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis

from common import keys
from common.protocol import Delta, Finished, decode_event
from workers.chat.step_publish import queue_step


@dataclass
class Seq:
    request_id: str
    index: int = 0
    output_ids: list[int] = field(default_factory=list)
    recorded: int = 0


def _run(url: str, events: list) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            pipe = client.pipeline(transaction=False)
            queue_step(pipe, events, ttl=300)
            pipe.get("axion-test:after-the-step")  # the rest of the worker's pipeline still follows
            replies = await pipe.execute()
            assert replies[0] == len(events) and replies[1] is None
        finally:
            await client.aclose()

    asyncio.run(main())


def test_progress_lists_expiry_and_events_in_order(redis_server) -> None:  # type: ignore[no-untyped-def]
    r = redis.Redis.from_url(redis_server.url)
    fresh = Seq("step-fresh", output_ids=[7])
    going = Seq("step-going", index=1, output_ids=[1, 2, 3], recorded=2)
    replayed = Seq("step-replayed", output_ids=list(range(2500)))  # a resumed sequence: more than one RPUSH's worth
    r.rpush(keys.progress(going.request_id, 1), 1, 2)
    subs = {}
    for seq in (fresh, going, replayed):
        subs[seq.request_id] = r.pubsub()
        subs[seq.request_id].subscribe(keys.reply_channel(seq.request_id))
        assert subs[seq.request_id].get_message(timeout=2)["type"] == "subscribe"
    events = [(fresh, Delta(seq=0, text="a", completion_tokens=1, index=0)),
              (going, Delta(seq=2, text="b", completion_tokens=3, index=1)),
              *[(replayed, Delta(seq=i, text="c", completion_tokens=i + 1, index=0)) for i in range(3)],
              (fresh, Finished(seq=1, text="", finish_reason="stop", prompt_tokens=3, completion_tokens=1))]
    _run(redis_server.url, events)
    assert [int(x) for x in r.lrange(keys.progress(fresh.request_id, 0), 0, -1)] == [7]
    assert [int(x) for x in r.lrange(keys.progress(going.request_id, 1), 0, -1)] == [1, 2, 3]
    assert [int(x) for x in r.lrange(keys.progress(replayed.request_id, 0), 0, -1)] == list(range(2500))
    assert 0 < r.ttl(keys.progress(fresh.request_id, 0)) <= 300
    assert r.ttl(keys.progress(going.request_id, 1)) == -1  # set when its first tokens were recorded, not again
    assert (fresh.recorded, going.recorded, replayed.recorded) == (1, 3, 2500)
    got: dict[str, list] = {rid: [] for rid in subs}
    for rid, sub in subs.items():
        while (message := sub.get_message(timeout=0.5)) is not None or not got[rid]:
            if message and message["type"] == "message":
                got[rid].append(decode_event(message["data"]))
    assert got == {"step-fresh": [events[0][1], events[-1][1]], "step-going": [events[1][1]],
                   "step-replayed": [e for s, e in events if s is replayed]}
    _run(redis_server.url, [(fresh, Delta(seq=2, text="d", completion_tokens=1, index=0))])  # nothing new to record
    assert [int(x) for x in r.lrange(keys.progress(fresh.request_id, 0), 0, -1)] == [7]
