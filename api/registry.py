"""Which workers are alive and which models they serve, read from their heartbeat keys.

Reads are cached for a fraction of a second: at hundreds of requests per second a SCAN per request would cost
more than the request's own Redis traffic, and a worker's liveness only changes on the heartbeat's scale.
"""

from __future__ import annotations

import time

import msgspec
import redis.asyncio as aioredis

from api.auth import may_use
from api.errors import APIError
from common import keys
from common.model_ids import model_id_problem
from common.protocol import WorkerInfo, decode_worker

CACHE_S = 0.5


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._workers: list[WorkerInfo] = []
        self._read_at = float("-inf")

    async def workers(self, fresh: bool = False) -> list[WorkerInfo]:
        if fresh or time.monotonic() - self._read_at > CACHE_S:
            found: list[WorkerInfo] = []
            names = [name async for name in self._redis.scan_iter(match=keys.WORKER_HEARTBEAT_PATTERN, count=500)]
            if names:
                for raw in await self._redis.mget(names):
                    if raw is None:
                        continue
                    try:
                        found.append(decode_worker(raw))
                    except msgspec.DecodeError:
                        continue
            self._workers = sorted(found, key=lambda w: w.worker_id)
            self._read_at = time.monotonic()
        return self._workers

    async def served_models(self, kind: str | None = None) -> list[str]:
        return sorted({w.model for w in await self.workers() if kind is None or w.kind == kind})

    async def revision(self, model: str, kind: str = "chat") -> str:
        """The revision of `model` as its live workers report it. During a rolling update two revisions serve
        at once; the key then names both, and changes again once the old workers are gone."""
        return "+".join(sorted({w.revision for w in await self.workers() if w.model == model and w.kind == kind}))

    async def require_model(self, model: str, kind: str = "chat") -> None:
        """404 for a model no worker ever announced, or one the caller's key may not use (the same answer, so a
        key learns nothing about models outside its list); 400 for a model served only by workers of another
        kind (a chat model asked for embeddings); 503 for a known one with no live worker of `kind` now."""
        if not may_use(model) or model_id_problem(model, allow_paths=True) is not None:
            raise model_not_found(model)
        if model in await self.served_models(kind):
            return
        live = await self.workers(fresh=True)
        if model in {w.model for w in live if w.kind == kind}:
            return
        others = sorted({w.kind for w in live if w.model == model})
        if others:
            raise APIError(400, f"The model '{model}' is a {'/'.join(others)} model; this endpoint needs a {kind} "
                           "model.", param="model", code="model_not_supported")
        if await self._redis.sismember(keys.KNOWN_MODELS, model):
            raise APIError(503, f"No live worker serves the model '{model}' right now; retry shortly.",
                           code="model_unavailable", headers={"Retry-After": "5"})
        raise model_not_found(model)


def model_not_found(model: str) -> APIError:
    """The one 404 for a model that does not exist, or that the caller may not know exists."""
    return APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
