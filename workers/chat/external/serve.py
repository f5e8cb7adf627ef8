"""Start a chat worker on the external engine when the backend choice says so; otherwise, or when the engine
cannot start, say why, so the caller serves the model natively (`run_worker` in axion/cli.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from common import redis_client
from common.settings import Settings, split_list
from workers.chat.choice import choose_backend, is_max_command
from workers.chat.external.client import FEATURES, MAX_LACKS, EngineClient
from workers.chat.external.guard import SCRATCH_ENV
from workers.chat.external.supervisor import (
    ENGINE_ENV,
    AttachedEngine,
    EngineStartError,
    EngineSupervisor,
    is_ready,
)
from workers.chat.external.worker import ExternalChatWorker

log = logging.getLogger("axion.worker")


@dataclass
class Outcome:
    served: bool  # the worker ran on the engine until it stopped
    reason: str | None  # why the native backend serves instead, when the engine could not start (None: not chosen)


def engine_lacks(settings: Settings, spawned_max: bool) -> frozenset[str]:
    if settings.external_engine_lacks != "auto":
        return frozenset(f for f in split_list(settings.external_engine_lacks) if f in FEATURES)
    return MAX_LACKS if spawned_max else frozenset()


def devices(settings: Settings) -> str:
    if settings.device == "cuda":
        return "gpu"
    if settings.device == "auto" and shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0:
                return "gpu"
    return "cpu"


def load_tokenizer(name: str) -> Any:
    """The model's tokenizer, to count prompt tokens and answer tokenize jobs locally; None when unavailable
    (an engine attached by URL may serve a model this machine does not have)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        log.warning("no local tokenizer for %s (%s): prompt tokens come from the engine's usage", name, exc)
        return None


async def wait_attached(url: str, timeout_s: float) -> None:
    async with httpx.AsyncClient() as http:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if await is_ready(http, url):
                return
            await asyncio.sleep(0.5)
    raise EngineStartError(f"the engine at {url} did not answer its health check within {timeout_s:g}s")


async def _unless_stopped(starting: Coroutine[Any, Any, None]) -> bool:
    """Run `starting` unless SIGTERM or SIGINT comes first; False when they did (the start is abandoned).
    The worker's own handlers replace these once it runs."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    start, stopped = asyncio.create_task(starting), asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if not start.done():
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await start
        return False
    start.result()
    return True


async def serve_external(settings: Settings) -> Outcome:
    choice = choose_backend(settings)
    if choice.backend != "external":
        return Outcome(False, None)  # the host loads it (workers/loading.py open_chat)
    log.info("backend for %s: %s (%s)", settings.model_id, choice.backend, choice.reason)
    supervisor: EngineSupervisor | None = None
    engine_tmp = Path(tempfile.mkdtemp(prefix="axion-engine-"))
    try:
        if choice.url:
            base_url = choice.url
            starting = wait_attached(base_url, settings.external_engine_start_timeout_s)
        else:
            assert choice.command is not None
            supervisor = EngineSupervisor(choice.command, settings.model_name, devices=devices(settings),
                                          start_timeout_s=settings.external_engine_start_timeout_s,
                                          log_path=engine_tmp / "engine.log",
                                          env={"TMPDIR": str(engine_tmp), SCRATCH_ENV: str(engine_tmp)})
            starting = supervisor.start()
        if not await _unless_stopped(starting):  # SIGTERM while the engine starts (minutes, for a compile)
            log.info("stopped while the engine was starting")
            if supervisor is not None:
                await supervisor.stop()
            shutil.rmtree(engine_tmp, ignore_errors=True)
            return Outcome(True, "stopped while starting")
        base_url = supervisor.base_url if supervisor else base_url
        client = EngineClient(base_url, connections=settings.external_engine_connections,
                              model=settings.external_engine_model,
                              timeout_s=settings.request_timeout_s + 60)
        await client.resolve_model([settings.model_name, settings.model_id])
    except (EngineStartError, httpx.HTTPError, ValueError) as exc:
        log.error("the external engine cannot serve %s: %s; falling back to the native backend",
                  settings.model_id, exc)
        if supervisor is not None:
            await supervisor.stop()
        shutil.rmtree(engine_tmp, ignore_errors=True)
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Outcome(False, f"fallback: {first_line}")
    tokenizer = await asyncio.to_thread(load_tokenizer, settings.model_name)
    redis = redis_client.connect(settings, block_ms=settings.batch_timeout_ms)
    engine = supervisor or AttachedEngine(base_url)
    watch = asyncio.create_task(engine.watch())
    is_max = choice.command is not None and is_max_command(choice.command)
    worker = ExternalChatWorker(settings, redis, client, reason=choice.reason, supervisor=engine,
                                tokenizer=tokenizer, lacks=engine_lacks(settings, is_max))
    try:
        await worker.run()
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        await engine.stop()
        await client.aclose()
        await redis.aclose()
        shutil.rmtree(engine_tmp, ignore_errors=True)
    return Outcome(True, choice.reason)


__all__ = ["ENGINE_ENV", "Outcome", "serve_external"]
