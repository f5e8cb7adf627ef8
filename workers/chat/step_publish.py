"""A decoding step's output into Redis: each sequence's new tokens onto its progress list, then every event.

On one Redis server (not a cluster) this is one EVAL: a Lua script does the RPUSHes, EXPIREs and PUBLISHes
server-side, where separate pipelined commands cost the worker's thread Python work per command
(`bench/publish_bench.py`). EVAL sends the script's text each time, not EVALSHA: a server that lost its script
cache (a restart, a failover) would fail an EVALSHA with NOSCRIPT after the same pipeline's XACK had gone through,
losing the job's last events.

In a Redis Cluster the progress lists of different requests live in different slots, which one script may not
touch: there the commands go one by one into the pipeline, as before.

STREAM_INTERVAL > 1 (as SGLang's `--stream-interval`) publishes a sequence's tokens every that many steps instead
of every step (`hold_back`): fewer messages for Redis to fan out and fewer SSE chunks for the API to write, for
streams that arrive in larger pieces.
"""

from __future__ import annotations

from typing import Any

from common import keys
from common.protocol import Delta, Event, encode
from common.redis_cluster import is_cluster, publish

PUBLISH_STEP = """
local ttl = ARGV[1]
local a = 2
for i = 1, #KEYS do
  local n = tonumber(ARGV[a])
  local first = ARGV[a + 1] == '1'
  local s = a + 2
  while s < a + 2 + n do
    local e = math.min(s + 999, a + 1 + n)
    redis.call('RPUSH', KEYS[i], unpack(ARGV, s, e))
    s = e + 1
  end
  if first then redis.call('EXPIRE', KEYS[i], ttl) end
  a = a + 2 + n
end
local events = tonumber(ARGV[a])
a = a + 1
for i = 1, events do
  redis.call('PUBLISH', ARGV[a], ARGV[a + 1])
  a = a + 2
end
return events
"""


def queue_step(pipe: Any, events: list[tuple[Any, Event]], ttl: int) -> None:
    """Queue the step's progress and events on `pipe` (progress first: a worker that takes a job over resumes
    from it). Each sequence's `recorded` moves to its token count."""
    if events:
        (queue_commands if is_cluster(pipe) else queue_script)(pipe, events, ttl)


def hold_back(events: list[tuple[Any, Event]], interval: int) -> list[tuple[Any, Event]]:
    """The events to publish now with STREAM_INTERVAL=`interval`: a sequence's Deltas are merged (text joined,
    logprobs in order) and go out once `interval` tokens have gathered; its first one goes at once (the time to
    the first token does not change), and whatever is held goes out just before any other event of it (its
    Finished, a Failed). Held tokens are not on the progress list yet either (`queue_step` records a sequence's
    tokens with its next published event): a worker that takes the job over after a crash generates them again,
    and none of them had reached the client."""
    if interval <= 1:
        return events
    out: list[tuple[Any, Event]] = []
    for seq, event in events:
        held: Delta | None = seq.held
        if isinstance(event, Delta):
            merged = event if held is None else _merge(held, event)
            if seq.sent == 0 or merged.completion_tokens - seq.sent >= interval:
                seq.held, seq.sent = None, merged.completion_tokens
                out.append((seq, merged))
            else:
                seq.held = merged
            continue
        if held is not None:
            seq.held = None
            out.append((seq, held))
        out.append((seq, event))
    return out


def _merge(held: Delta, new: Delta) -> Delta:
    logprobs = [*(held.logprobs or []), *(new.logprobs or [])] if held.logprobs or new.logprobs else None
    return Delta(seq=new.seq, text=held.text + new.text, completion_tokens=new.completion_tokens, index=new.index,
                 logprobs=logprobs)


def queue_commands(pipe: Any, events: list[tuple[Any, Event]], ttl: int) -> None:
    """One RPUSH (+ EXPIRE the first time) per sequence with new tokens, one PUBLISH per event."""
    for seq, _ in events:
        if len(seq.output_ids) > seq.recorded:
            key = keys.progress(seq.request_id, seq.index)
            pipe.rpush(key, *seq.output_ids[seq.recorded:])
            if not seq.progress_ttl_set:
                pipe.expire(key, ttl)
                seq.progress_ttl_set = True
            seq.recorded = len(seq.output_ids)
    for seq, event in events:
        publish(pipe, keys.reply_channel(seq.request_id), encode(event))


def queue_script(pipe: Any, events: list[tuple[Any, Event]], ttl: int) -> None:
    """The same as one EVAL of PUBLISH_STEP: KEYS are the progress lists; ARGV is the TTL, then per list its
    count of new tokens, whether to set its TTL (this worker's first push: the list may be new after a takeover),
    the tokens; then the count of events, and per event its
    channel and message."""
    progress: list[str] = []
    args: list[Any] = [ttl]
    for seq, _ in events:
        if len(seq.output_ids) > seq.recorded:
            progress.append(keys.progress(seq.request_id, seq.index))
            new = seq.output_ids[seq.recorded:]
            args += [len(new), 0 if seq.progress_ttl_set else 1, *new]
            seq.recorded, seq.progress_ttl_set = len(seq.output_ids), True
    args.append(len(events))
    for seq, event in events:
        args += [keys.reply_channel(seq.request_id), encode(event)]
    pipe.eval(PUBLISH_STEP, len(progress), *progress, *args)
