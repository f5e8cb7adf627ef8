"""`POST /admin/models/load` and `/admin/models/unload`: hot swap over HTTP, as `axion models` does from a shell.

Who may call them: a key from ADMIN_API_KEYS; when that is unset, a key from API_KEYS (the operator's keys,
set in the deployment). Keys made with `axion keys create` are tenant keys and never admin keys: a customer
able to call the API must not be able to unload the models everybody uses. With neither setting the endpoints
answer 403: swapping models is never open to anonymous callers, even on a dev box without keys.

The endpoint only sends the command (202, with the workers it went to); the swap itself takes as long as the
drain and the load. Watch /v1/models, /health (`loading`, `last_error` per worker) or `axion status`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgspec
import redis.asyncio as aioredis
from litestar import Request
from litestar.datastructures import State

from api import auth
from api.errors import APIError
from api.protocol import decode_body
from api.protocol_admin import LoadRequest, UnloadRequest
from common import control, keys
from common.model_ids import load_problem
from common.protocol import WorkerInfo, decode_worker
from common.redis_cluster import mget, text
from common.settings import Settings, split_list


def check_admin(settings: Settings, authorization: str | None) -> None:
    """Refuse (401/403) a caller without an admin key; see the module docstring for which keys are admin keys."""
    admin_keys = split_list(settings.admin_api_keys) or split_list(settings.api_keys)
    if not admin_keys:
        raise APIError(403, "The admin endpoints are off: set ADMIN_API_KEYS (or API_KEYS) to use them.",
                       type="permission_error", code="admin_disabled")
    scheme, _, key = (authorization or "").strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise auth.unauthorized("The admin endpoints need an admin key: 'Authorization: Bearer ADMIN_KEY'.")
    digest = hashlib.sha256(key.encode()).digest()
    matched = False
    for known in admin_keys:  # no early exit: the time taken says nothing about which key came close
        matched |= hmac.compare_digest(digest, hashlib.sha256(known.encode()).digest())
    if matched:
        return
    principal = auth.current.get()
    if principal is not None and principal.id != "anonymous":  # a valid key, but a tenant's
        raise APIError(403, "This key may not manage models.", type="permission_error", code="permission_denied")
    raise auth.unauthorized("Incorrect admin key provided.")


async def live_workers(redis: aioredis.Redis) -> list[WorkerInfo]:
    """Every live heartbeat, idle workers included (the registry leaves those out: they serve nothing)."""
    ids = [text(i) for i in await redis.zrange(keys.WORKER_INDEX, 0, -1)]
    found = []
    for raw in await mget(redis, [keys.worker_heartbeat(i) for i in ids]) if ids else []:
        if raw is not None:
            try:
                found.append(decode_worker(raw))
            except msgspec.DecodeError:
                continue
    return found


async def _send(state: State, command: control.Command, worker: str | None) -> dict[str, Any]:
    redis: aioredis.Redis = state.redis
    try:
        targets = control.plan(command, await live_workers(redis), worker)
    except control.PlanError as exc:
        raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None
    if targets:
        await control.queue(redis.pipeline(transaction=False), command, targets).execute()
    return {"object": "model.command", "id": command.id, "action": command.action, "model": command.model,
            "kind": command.kind, "workers": targets, "status": "sent" if targets else "already_served"}


async def load_model(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    settings: Settings = state.chat.settings
    check_admin(settings, request.headers.get("authorization"))
    req = decode_body(await request.body(), LoadRequest)
    for param, name in (("model", req.model), ("served_name", req.served_name)):
        problem = name and load_problem(name, allow_paths=settings.allow_model_paths,
                                        patterns=split_list(settings.model_allowlist) if param == "model" else [])
        if problem:
            raise APIError(400, f"Invalid '{param}': {problem}", param=param, code="invalid_value")
    return await _send(state, control.new_command("load", req.model, req.kind, req.served_name), req.worker)


async def unload_model(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    check_admin(state.chat.settings, request.headers.get("authorization"))
    req = decode_body(await request.body(), UnloadRequest)
    return await _send(state, control.new_command("unload", req.model), req.worker)
