"""A decoding step's progress and events go to Redis in one Lua script (workers/chat/step_publish.py): against a
real redis-server, the lists, their expiry and the messages must be what the per-command pipeline wrote."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis

from common import keys
from common.protocol import Delta, Failed, Finished, TokenLogprob, decode_event
from workers.chat.step_publish import hold_back, queue_step


@dataclass
class Seq:
    request_id: str
    index: int = 0
    output_ids: list[int] = field(default_factory=list)
    recorded: int = 0
    progress_ttl_set: bool = False
    held: Delta | None = None
    sent: int = 0


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
    going = Seq("step-going", index=1, output_ids=[1, 2, 3], recorded=2, progress_ttl_set=True)
    replayed = Seq("step-replayed", output_ids=list(range(2500)))  # a resumed sequence: more than one RPUSH's worth
    # Taken over after its list expired: this worker's first push recreates the list, which must expire again.
    resumed = Seq("step-resumed", output_ids=[4, 5, 6], recorded=2)
    r.rpush(keys.progress(going.request_id, 1), 1, 2)
    subs = {}
    for seq in (fresh, going, replayed, resumed):
        subs[seq.request_id] = r.pubsub()
        subs[seq.request_id].subscribe(keys.reply_channel(seq.request_id))
        assert subs[seq.request_id].get_message(timeout=2)["type"] == "subscribe"
    events = [(fresh, Delta(seq=0, text="a", completion_tokens=1, index=0)),
              (going, Delta(seq=2, text="b", completion_tokens=3, index=1)),
              *[(replayed, Delta(seq=i, text="c", completion_tokens=i + 1, index=0)) for i in range(3)],
              (resumed, Delta(seq=2, text="e", completion_tokens=3, index=0)),
              (fresh, Finished(seq=1, text="", finish_reason="stop", prompt_tokens=3, completion_tokens=1))]
    _run(redis_server.url, events)
    assert [int(x) for x in r.lrange(keys.progress(fresh.request_id, 0), 0, -1)] == [7]
    assert [int(x) for x in r.lrange(keys.progress(going.request_id, 1), 0, -1)] == [1, 2, 3]
    assert [int(x) for x in r.lrange(keys.progress(replayed.request_id, 0), 0, -1)] == list(range(2500))
    assert 0 < r.ttl(keys.progress(fresh.request_id, 0)) <= 300
    assert r.ttl(keys.progress(going.request_id, 1)) == -1  # set with this worker's first push, not again
    assert [int(x) for x in r.lrange(keys.progress(resumed.request_id, 0), 0, -1)] == [6]
    assert 0 < r.ttl(keys.progress(resumed.request_id, 0)) <= 300
    assert (fresh.recorded, going.recorded, replayed.recorded, resumed.recorded) == (1, 3, 2500, 3)
    got: dict[str, list] = {rid: [] for rid in subs}
    for rid, sub in subs.items():
        while (message := sub.get_message(timeout=0.5)) is not None or not got[rid]:
            if message and message["type"] == "message":
                got[rid].append(decode_event(message["data"]))
    assert got == {"step-fresh": [events[0][1], events[-1][1]], "step-going": [events[1][1]],
                   "step-replayed": [e for s, e in events if s is replayed],
                   "step-resumed": [e for s, e in events if s is resumed]}
    _run(redis_server.url, [(fresh, Delta(seq=2, text="d", completion_tokens=1, index=0))])  # nothing new to record
    assert [int(x) for x in r.lrange(keys.progress(fresh.request_id, 0), 0, -1)] == [7]


def _token(seq: Seq, k: int, logprobs: bool = True) -> Delta:
    """The engine's event for `seq`'s token number `k`."""
    seq.output_ids.append(100 + k)
    lp = [TokenLogprob(token=f"t{k}", logprob=-k / 10, bytes=[116], top_logprobs=[])] if logprobs else None
    return Delta(seq=k, text=f"t{k} ", completion_tokens=k + 1, index=seq.index, logprobs=lp)


def test_stream_interval_publishes_every_n_tokens_merged_and_records_them_as_they_go(redis_server) -> None:  # type: ignore[no-untyped-def]
    """STREAM_INTERVAL=3 over 8 tokens then the finish: the first token at once, then pieces of three, and the
    held rest with the finish; text and logprobs whole and in order; the progress list holds what was published."""
    r = redis.Redis.from_url(redis_server.url)
    seq, other = Seq("interval-3"), Seq("interval-other", index=1)
    progress = keys.progress(seq.request_id, 0)
    published: list[list] = []
    for k in range(8):
        events = hold_back([(seq, _token(seq, k)), (other, _token(other, k, logprobs=False))], 3)
        published.append([event for s, event in events if s is seq])
        if events:
            _run(redis_server.url, events)
        assert r.llen(progress) == seq.sent == len(seq.output_ids) - (seq.held.completion_tokens - seq.sent
                                                                      if seq.held else 0)
    finish = Finished(seq=8, text="", finish_reason="length", prompt_tokens=4, completion_tokens=8)
    last = hold_back([(seq, finish)], 3)
    assert [e for _, e in last][-1] is finish and seq.held is None
    published.append([e for _, e in last])
    _run(redis_server.url, last)

    assert [[e.completion_tokens for e in step] for step in published] == [[1], [], [], [4], [], [], [7], [], [8, 8]]
    deltas = [e for step in published for e in step if isinstance(e, Delta)]
    assert "".join(d.text for d in deltas) == "".join(f"t{k} " for k in range(8))
    assert [t.token for d in deltas for t in d.logprobs or []] == [f"t{k}" for k in range(8)]
    assert [d.seq for d in deltas] == [0, 3, 6, 7]  # increasing: the API drops repeats by it
    assert [int(x) for x in r.lrange(progress, 0, -1)] == [100 + k for k in range(8)]


def test_stream_interval_sends_held_tokens_before_a_failure_and_one_is_every_token() -> None:
    seq = Seq("interval-failed")
    assert [e.completion_tokens for _, e in hold_back([(seq, _token(seq, 0))], 4)] == [1]
    assert hold_back([(seq, _token(seq, 1))], 4) == []
    failed = Failed(status=500, message="boom")
    out = [e for _, e in hold_back([(seq, failed)], 4)]
    assert isinstance(out[0], Delta) and out[0].text == "t1 " and out[1] is failed
    plain = Seq("interval-1")
    events = [(plain, _token(plain, 0)), (plain, _token(plain, 1))]
    assert hold_back(events, 1) is events and plain.held is None
