"""A decoding step's output into Redis: each sequence's new tokens onto its progress list, then every event.

On one Redis server (not a cluster) this is one EVAL: a Lua script does the RPUSHes, EXPIREs and PUBLISHes
server-side. As separate pipelined commands, two per streaming sequence, a step took 1.67-1.71 ms at 64 streams
(0.57-0.60 ms at 16) against 0.62-0.73 ms (0.33-0.35 ms) for the script, against a local redis-server
(`bench/publish_bench.py`, bench/RESULTS.md): redis-py packs and parses each command in Python, on the worker's
thread, and Redis answers each. EVAL sends the script's text each time rather than EVALSHA (a simpler script
by EVALSHA took 0.43 ms at 64 in a first try): a server that lost its script cache (a restart, a failover)
would fail an EVALSHA with NOSCRIPT after the same pipeline's XACK had gone through, losing the job's last
events.

In a Redis Cluster the progress lists of different requests live in different slots, which one script may not
touch: there the commands go one by one into the pipeline, as before.
"""

from __future__ import annotations

from typing import Any

from common import keys
from common.protocol import Event, encode
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


def queue_commands(pipe: Any, events: list[tuple[Any, Event]], ttl: int) -> None:
    """One RPUSH (+ EXPIRE the first time) per sequence with new tokens, one PUBLISH per event."""
    for seq, _ in events:
        if len(seq.output_ids) > seq.recorded:
            key = keys.progress(seq.request_id, seq.index)
            pipe.rpush(key, *seq.output_ids[seq.recorded:])
            if seq.recorded == 0:
                pipe.expire(key, ttl)
            seq.recorded = len(seq.output_ids)
    for seq, event in events:
        publish(pipe, keys.reply_channel(seq.request_id), encode(event))


def queue_script(pipe: Any, events: list[tuple[Any, Event]], ttl: int) -> None:
    """The same as one EVAL of PUBLISH_STEP: KEYS are the progress lists; ARGV is the TTL, then per list its
    count of new tokens, whether they are its first, the tokens; then the count of events, and per event its
    channel and message."""
    progress: list[str] = []
    args: list[Any] = [ttl]
    for seq, _ in events:
        if len(seq.output_ids) > seq.recorded:
            progress.append(keys.progress(seq.request_id, seq.index))
            new = seq.output_ids[seq.recorded:]
            args += [len(new), 1 if seq.recorded == 0 else 0, *new]
            seq.recorded = len(seq.output_ids)
    args.append(len(events))
    for seq, event in events:
        args += [keys.reply_channel(seq.request_id), encode(event)]
    pipe.eval(PUBLISH_STEP, len(progress), *progress, *args)
