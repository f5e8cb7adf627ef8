"""What /health and /health/ready report: backends, live workers, models, queues, system metrics.

`/health` is liveness: it answers 200 whenever the process does, even with Redis down (it then says why), and
costs at most a PING and the registry's cached worker read, so probes can call it often. `/health/ready` is
readiness: 200 only when Redis answers, the reply hub is connected and at least one live worker serves the
default model (503 otherwise, with the reasons), plus the fleet view an operator wants: per-model queue depth,
pending and dead letters (one pipelined round trip for all queues) and the API host's CPU and memory.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psutil
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from api.cache import cache_stats
from api.registry import WorkerRegistry
from api.reply_hub import Hub
from common import keys
from common.protocol import WorkerInfo
from common.settings import Settings

REDIS_CHECK_S = 1.0  # the longest /health waits on Redis; past it, Redis counts as unreachable


async def _fleet(redis: aioredis.Redis, registry: WorkerRegistry) -> tuple[dict[str, Any], list[WorkerInfo]]:
    """Redis reachability (PING latency) and the live workers, within REDIS_CHECK_S in all."""
    async def probe() -> tuple[float, list[WorkerInfo]]:
        start = time.perf_counter()
        await redis.ping()
        latency = (time.perf_counter() - start) * 1000
        return latency, await registry.workers()

    try:
        latency, workers = await asyncio.wait_for(probe(), REDIS_CHECK_S)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return {"reachable": False, "error": error}, []
    return {"reachable": True, "latency_ms": round(latency, 2)}, workers


def worker_view(w: WorkerInfo, now: float) -> dict[str, Any]:
    return {
        "id": w.worker_id, "kind": w.kind, "model": w.model, "device": w.device, "dtype": w.dtype,
        "hostname": w.hostname, "pid": w.pid,
        "active_sequences": w.active_sequences, "max_batch_size": w.max_batch_size,
        # as the engine reports them: computing, waiting for room, share of its KV-cache pool in use
        "running_sequences": w.running_sequences, "waiting_sequences": w.waiting_sequences,
        "kv_cache_usage": w.kv_cache_usage,
        "batch_occupancy": round(w.active_sequences / w.max_batch_size, 3) if w.max_batch_size else None,
        "tokens_per_s": w.tokens_per_s, "jobs_per_s": w.jobs_per_s, "cpu_percent": w.cpu_percent,
        "uptime_s": round(now - w.started, 1),
        "last_beat_s": round(max(0.0, now - w.beat_at), 1) if w.beat_at else None,
        "memory": {"weights_bytes": w.weights_bytes, "kv_cache_bytes": w.kv_cache_bytes,
                   "prefix_cache_bytes": w.prefix_cache_bytes, "rss_bytes": w.rss_bytes,
                   "device_used_bytes": w.device_memory_used_bytes,
                   "device_total_bytes": w.device_memory_total_bytes,
                   # what loading the model took: tensor bytes (torch backends) and the process's RSS growth
                   "params_bytes": w.params_bytes, "buffers_bytes": w.buffers_bytes,
                   "load_rss_delta_bytes": w.load_rss_delta_bytes},
        "load_s": w.load_s, "last_error": w.last_error or None,
        "prefix_cache_hits": w.prefix_cache_hits,
        "prefix_cache_hit_tokens": w.prefix_cache_hit_tokens, "prefix_cache_query_tokens": w.prefix_cache_query_tokens,
        "mean_decode_batch": round(w.decoded_tokens / w.decode_steps, 2) if w.decode_steps else None,
        "prefilled_tokens": w.prefilled_tokens, "decoded_tokens": w.decoded_tokens, "jobs_done": w.jobs_done,
        "revision": w.revision,
        "backend": w.backend or None, "backend_reason": w.backend_reason or None,
        # model calls (decode steps) and items computed (inputs embedded, pairs scored, tokens decoded)
        "model_calls": w.decode_steps, "computed_items": w.decoded_tokens,
    }


def model_memory(workers: list[WorkerInfo]) -> dict[str, dict[str, Any]]:
    """Per served model: what one copy of it takes (as its workers measured at load) and how many copies run."""
    out: dict[str, dict[str, Any]] = {}
    for w in workers:
        row = out.setdefault(w.model, {"kind": w.kind, "backend": w.backend, "workers": 0, "params_bytes": 0,
                                       "buffers_bytes": 0, "load_rss_delta_bytes": 0})
        row["workers"] += 1
        for field in ("params_bytes", "buffers_bytes", "load_rss_delta_bytes"):
            row[field] = max(row[field], getattr(w, field))
    return dict(sorted(out.items()))


async def liveness(settings: Settings, redis: aioredis.Redis, registry: WorkerRegistry, hub: Hub,
                   open_requests: int) -> dict[str, Any]:
    """The body of /health (always 200)."""
    redis_state, workers = await _fleet(redis, registry)
    reasons = _problems(settings, redis_state, hub, workers, default_only=False)
    now = time.time()
    return {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "redis": redis_state,
        "reply_hub": {"connected": hub.connected, "error": hub.last_error},
        "workers": [worker_view(w, now) for w in workers],
        "models": sorted({w.model for w in workers}),
        "model_memory": model_memory(workers),
        "open_requests": open_requests,
        "cache": await _cache(redis, settings) if redis_state["reachable"] else None,
    }


async def _cache(redis: aioredis.Redis, settings: Settings) -> dict[str, Any] | None:
    """Hit and miss counts of the shared response caches (all replicas together)."""
    try:
        return await asyncio.wait_for(cache_stats(redis, settings), REDIS_CHECK_S)
    except Exception:
        return None


async def readiness(settings: Settings, redis: aioredis.Redis, registry: WorkerRegistry, hub: Hub,
                    open_requests: int) -> tuple[int, dict[str, Any]]:
    """The status and body of /health/ready."""
    redis_state, workers = await _fleet(redis, registry)
    reasons = _problems(settings, redis_state, hub, workers, default_only=True)
    now = time.time()
    queues: list[dict[str, Any]] = []
    if redis_state["reachable"]:
        try:
            queues = await asyncio.wait_for(queue_stats(redis, settings, workers), REDIS_CHECK_S)
        except Exception as exc:
            reasons.append(f"could not read the queues ({type(exc).__name__})")
    body = {
        "status": "not_ready" if reasons else "ready",
        "reasons": reasons,
        "default_model": settings.model_id,
        "redis": redis_state,
        "reply_hub": {"connected": hub.connected, "error": hub.last_error},
        "workers": [worker_view(w, now) for w in workers],
        "models": sorted({w.model for w in workers}),
        "queues": queues,
        "open_requests": open_requests,
        "limits": {"max_connections": settings.max_connections,
                   "concurrent_requests": settings.concurrent_requests,
                   "max_queued_jobs": settings.max_queued_jobs},
        "system": system_metrics(workers),
    }
    return (503 if reasons else 200), body


def _problems(settings: Settings, redis_state: dict[str, Any], hub: Hub, workers: list[WorkerInfo],
              default_only: bool) -> list[str]:
    """Why the replica cannot serve (empty when it can): /health reports them, /health/ready fails on them."""
    reasons = []
    if not redis_state["reachable"]:
        reasons.append(f"Redis unreachable ({redis_state['error']})")
    elif not hub.connected:
        reasons.append(f"reply hub not connected to Redis ({hub.last_error})")
    if redis_state["reachable"]:
        if default_only and not any(w.model == settings.model_id for w in workers):
            reasons.append(f"no live worker serves the default model '{settings.model_id}'")
        elif not workers:
            reasons.append("no live worker")
    return reasons


async def queue_stats(redis: aioredis.Redis, settings: Settings, workers: list[WorkerInfo]) -> list[dict[str, Any]]:
    """Per (kind, model) served now, and the default chat model: depth (XLEN: waiting + running), pending
    (delivered to a worker, not yet answered), waiting, dead letters, and the Batch API's low-priority stream
    (`batch_depth`); one pipelined round trip for all."""
    targets = sorted({(w.kind, w.model) for w in workers} | {("chat", settings.model_id)})
    pipe = redis.pipeline(transaction=False)
    for kind, model in targets:
        stream = keys.job_stream(kind, model)
        pipe.xlen(stream)
        pipe.xpending(stream, keys.WORKER_GROUP)
        pipe.xlen(keys.dead_letter_stream(kind, model))
        pipe.xlen(keys.batch_stream(kind, model))
    replies = await pipe.execute(raise_on_error=False)
    out = []
    for i, (kind, model) in enumerate(targets):
        depth, pending_info, dead, batch = replies[4 * i: 4 * i + 4]
        for reply in (depth, pending_info, dead, batch):
            if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
                raise reply
        depth = depth if isinstance(depth, int) else 0
        pending = int(pending_info["pending"]) if isinstance(pending_info, dict) else 0  # NOGROUP: none yet
        mine = [w for w in workers if w.kind == kind and w.model == model]
        out.append({
            "kind": kind, "model": model, "stream": keys.job_stream(kind, model),
            "depth": depth, "pending": pending, "waiting": max(0, depth - pending),
            "dead_letters": dead if isinstance(dead, int) else 0,
            "batch_depth": batch if isinstance(batch, int) else 0,
            "max_queued_jobs": settings.max_queued_jobs,
            "workers": len(mine),
            "active_sequences": sum(w.active_sequences for w in mine),
            "batch_capacity": sum(w.max_batch_size for w in mine),
            "tokens_per_s": round(sum(w.tokens_per_s for w in mine), 1),
        })
    return out


def system_metrics(workers: list[WorkerInfo]) -> dict[str, Any]:
    """The API host's CPU and memory (psutil), and the GPU memory the workers report from their devices (the API
    process never touches a GPU; the workers read `torch.cuda.mem_get_info` for their heartbeats)."""
    memory = psutil.virtual_memory()
    return {
        "cpu_count": psutil.cpu_count(),
        "cpu_percent": psutil.cpu_percent(interval=None),  # since the previous call (0.0 on the first)
        "load_average": [round(x, 2) for x in psutil.getloadavg()],
        "memory": {"total_bytes": memory.total, "available_bytes": memory.available, "percent": memory.percent},
        "process_rss_bytes": psutil.Process().memory_info().rss,
        "gpus": [{"worker": w.worker_id, "hostname": w.hostname, "device": w.device,
                  "used_bytes": w.device_memory_used_bytes, "total_bytes": w.device_memory_total_bytes}
                 for w in workers if w.device_memory_total_bytes],
    }
