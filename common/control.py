"""Hot-swap commands: what `axion models load|unload` and `POST /admin/models/load|unload` send to workers.

A command goes to one worker's control stream (`keys.worker_control`), never to pub/sub: a worker busy loading
or draining reads it when it is done, and a worker that is not listening yet finds it on its first read. Which
workers get it (`plan`) is decided here from the live heartbeats, once for the CLI and the API alike:

* load MODEL --worker ID: that worker swaps its model for MODEL (drain the old one first);
* load MODEL: an idle worker (one serving nothing, after an unload) of the asked kind, else any idle one; with
  none idle the caller must name a worker. A model some worker already serves is not loaded twice;
* unload MODEL [--worker ID]: every worker serving MODEL (or the one named) drains it and goes idle.

Free of the web framework and of torch; the caller XADDs with `queue` on its own (sync or async) pipeline.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec

from common import keys
from common.protocol import WorkerInfo

Action = Literal["load", "unload"]
Kind = Literal["chat", "embed", "rerank"]
#: A control stream outlives its worker by this much (each send renews it); a stopping worker deletes its own.
CONTROL_TTL_S = 24 * 3600


class Command(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One entry of a control stream (field `command`, JSON)."""

    id: str
    action: Action
    model: str
    kind: Kind | None = None  # load: the kind of model (default: the worker's present kind)
    served_name: str | None = None  # load (chat): the id clients use, when it differs from what is loaded
    sent: float = 0.0


class PlanError(Exception):
    """A command that cannot be sent; `status` and `code` map onto the API's error envelope."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def new_command(action: Action, model: str, kind: Kind | None = None, served_name: str | None = None) -> Command:
    return Command(id=uuid.uuid4().hex[:12], action=action, model=model, kind=kind, served_name=served_name,
                   sent=time.time())


def plan(command: Command, workers: list[WorkerInfo], worker_id: str | None = None) -> list[str]:
    """The ids of the workers that must execute `command` (empty: nothing to do, the model is served already).
    `workers` are every live heartbeat, idle workers included."""
    served_as = command.served_name or command.model
    if worker_id is not None:
        target = next((w for w in workers if w.worker_id == worker_id), None)
        if target is None:
            raise PlanError(404, f"No live worker has the id '{worker_id}' (see `axion status`).",
                            "worker_not_found", "worker")
        if command.action == "unload" and target.model != command.model:
            raise PlanError(404, f"Worker '{worker_id}' does not serve '{command.model}'.", "model_not_found",
                            "model")
        return [worker_id]
    if command.action == "unload":
        serving = [w.worker_id for w in workers if w.model == command.model]
        if not serving:
            raise PlanError(404, f"No live worker serves the model '{command.model}'.", "model_not_found", "model")
        return serving
    kind = command.kind or "chat"
    if any(w.model == served_as and w.kind == kind for w in workers):
        return []
    idle = [w for w in workers if not w.model and not w.loading]
    idle.sort(key=lambda w: (w.kind != kind, w.worker_id))
    if not idle:
        raise PlanError(409, "No idle worker to load the model on; name one with --worker / \"worker\" (its "
                             "present model is drained and unloaded first), or unload a model first.",
                        "no_idle_worker", "worker")
    return [idle[0].worker_id]


def queue(pipe: Any, command: Command, worker_ids: list[str]) -> Any:
    """Queue the XADDs (and TTL renewals) of `command` to each worker on `pipe`; the caller executes it."""
    body = msgspec.json.encode(command)
    for worker_id in worker_ids:
        stream = keys.worker_control(worker_id)
        pipe.xadd(stream, {"command": body}, maxlen=1000, approximate=True)
        pipe.expire(stream, CONTROL_TTL_S)
    return pipe


def decode_command(raw: bytes) -> Command:
    return msgspec.json.decode(raw, type=Command)
