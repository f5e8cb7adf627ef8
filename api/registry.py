"""Which workers are alive and which models they serve, read from their heartbeat keys.

Reads are cached for a fraction of a second: at hundreds of requests per second a read per request would cost
more than the request's own Redis traffic, and a worker's liveness only changes on the heartbeat's scale. The
read itself is two round trips whatever the keyspace holds: the worker index (a sorted set), then one MGET of
those workers' heartbeat keys (an expired key is a dead worker). Concurrent readers share one read.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import redis.asyncio as aioredis

from api.auth import may_use
from api.errors import APIError
from common import keys
from common.model_ids import model_id_problem
from common.protocol import WorkerInfo, decode_worker
from common.redis_cluster import mget, text
from common.settings import Settings

CACHE_S = 0.5
#: How often a request that waits for a worker (the grace period) re-reads the heartbeats.
GRACE_POLL_S = 0.25


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis, *, default_models: tuple[str, ...] = (),
                 grace_s: float = 0.0) -> None:
        self._redis = redis
        self._workers: list[WorkerInfo] = []
        self._read_at = float("-inf")
        self._reading: asyncio.Future[list[WorkerInfo]] | None = None
        # Models known without asking Redis: the replica's own default model, and every model it has seen served.
        # After a Redis restart without persistence the known-models set is empty until the workers' next beat;
        # these models still get a 503 ("no worker now", which clients retry) and never a 404.
        self._known = set(default_models)
        self.grace_s = grace_s

    async def model_problem(self, model: str, settings: Settings) -> str | None:
        """Why a request may not name `model` (one sentence), or None: the id's shape, and a folder path only with
        ALLOW_MODEL_PATHS, or when the operator configured it or a live worker serves it."""
        allow = settings.allow_model_paths or model in settings.configured_models
        if not allow and model.startswith("/"):
            allow = any(w.model == model for w in await self.workers())
        return model_id_problem(model, allow_paths=allow)

    async def workers(self, fresh: bool = False) -> list[WorkerInfo]:
        if fresh or time.monotonic() - self._read_at > CACHE_S:
            if self._reading is None:
                self._reading = asyncio.ensure_future(self._read())
                self._reading.add_done_callback(self._read_done)
            self._workers = await asyncio.shield(self._reading)
            self._read_at = time.monotonic()
            self._known.update(w.model for w in self._workers)
        return self._workers

    def _read_done(self, reading: asyncio.Future[list[WorkerInfo]]) -> None:
        if self._reading is reading:
            self._reading = None
        if not reading.cancelled():
            reading.exception()  # retrieved here: a read whose every waiter went away logs no warning

    async def _read(self) -> list[WorkerInfo]:
        ids = await self._redis.zrange(keys.WORKER_INDEX, 0, -1)
        if ids:
            names = [keys.worker_heartbeat(text(i)) for i in ids]
        else:  # workers from before the index (a rolling upgrade that started with the API) beat no index entry
            names = [name async for name in self._redis.scan_iter(match=keys.WORKER_HEARTBEAT_PATTERN, count=500)]
            if not names:
                return []
        found: list[WorkerInfo] = []
        for raw in await mget(self._redis, names):
            if raw is None:
                continue  # expired: the worker died (or has not beaten since a Redis restart)
            try:
                worker = decode_worker(raw)
            except msgspec.DecodeError:
                continue
            if worker.model:  # an empty model: a worker between models (workers/host.py), serving nothing
                found.append(worker)
        return sorted(found, key=lambda w: w.worker_id)

    async def served_models(self, kind: str | None = None) -> list[str]:
        return sorted({w.model for w in await self.workers() if kind is None or w.kind == kind})

    async def revision(self, model: str, kind: str = "chat") -> str:
        """The revision of `model` as its live workers report it. During a rolling update two revisions serve
        at once; the key then names both, and changes again once the old workers are gone."""
        return "+".join(sorted({w.revision for w in await self.workers() if w.model == model and w.kind == kind}))

    async def serves(self, model: str, kind: str, fresh: bool = False) -> bool:
        return any(w.model == model and w.kind == kind for w in await self.workers(fresh=fresh))

    async def require_model(self, model: str, kind: str = "chat", deadline: float | None = None) -> None:
        """404 for a model no worker ever announced, or one the caller's key may not use (the same answer, so a
        key learns nothing about models outside its list); 400 for a model served only by workers of another
        kind (a chat model asked for embeddings); for a known one with no live worker of `kind`, wait up to
        the grace period (a worker may be starting, or beating again after a Redis restart), then 503."""
        if not may_use(model) or model_id_problem(model, allow_paths=True) is not None:
            raise model_not_found(model)
        if await self.serves(model, kind) or await self.serves(model, kind, fresh=True):
            return
        others = sorted({w.kind for w in await self.workers() if w.model == model})
        if others:
            raise APIError(400, f"The model '{model}' is a {'/'.join(others)} model; this endpoint needs a {kind} "
                           "model.", param="model", code="model_not_supported")
        if await self._redis.sismember(keys.RETIRED_MODELS, model):  # unloaded by `axion models unload`
            self._known.discard(model)
            raise model_not_found(model)
        if model not in self._known and not await self._redis.sismember(keys.KNOWN_MODELS, model):
            raise model_not_found(model)
        until = time.monotonic() + self.grace_s
        if deadline is not None:
            until = min(until, deadline)
        while time.monotonic() < until:
            await asyncio.sleep(min(GRACE_POLL_S, max(0.0, until - time.monotonic())))
            if await self.serves(model, kind, fresh=True):
                return
        raise APIError(503, f"No live worker serves the model '{model}' right now (none has sent a heartbeat); "
                            "retry shortly.", code="model_unavailable", headers={"Retry-After": "5"})


def model_not_found(model: str) -> APIError:
    """The one 404 for a model that does not exist, or that the caller may not know exists."""
    return APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
