"""A worker's heartbeat in Redis: its self-description under a TTL, its id in the worker index, its model in the
set of known models. All three in one pipeline, every beat.

Rewriting the index entry and the known model on every beat (not only at start) is what lets a fleet survive a
Redis restart without persistence: within one beat interval Redis knows every worker and model again, so
requests go back from 503 to served with no process restarted.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from common import keys
from common.protocol import WorkerInfo, encode

#: Index members older than this are pruned by any beat (workers that died without removing themselves).
INDEX_PRUNE_S = 3600.0


def write(pipe: aioredis.client.Pipeline, info: WorkerInfo, ttl_s: float) -> aioredis.client.Pipeline:
    """Queue one beat of `info` on `pipe` (the caller executes it)."""
    now = time.time()
    pipe.set(keys.worker_heartbeat(info.worker_id), encode(info), px=int(ttl_s * 1000))
    pipe.zadd(keys.WORKER_INDEX, {info.worker_id: now})
    pipe.zremrangebyscore(keys.WORKER_INDEX, "-inf", now - INDEX_PRUNE_S)
    if info.model:  # an empty model: a worker between models, serving nothing
        pipe.sadd(keys.KNOWN_MODELS, info.model)
        pipe.srem(keys.RETIRED_MODELS, info.model)
    return pipe


def remove(pipe: aioredis.client.Pipeline, worker_id: str) -> aioredis.client.Pipeline:
    """Queue the removal of a stopping worker's heartbeat and index entry."""
    pipe.delete(keys.worker_heartbeat(worker_id))
    pipe.zrem(keys.WORKER_INDEX, worker_id)
    return pipe
