"""The engine's process, as the chat worker manages it: spawn on a free port, wait until ready, restart after a
crash (with backoff), stop the whole process group at the end. An engine attached by URL (`AttachedEngine`) is
someone else's process: only its health is watched, so the worker reads no job while it cannot answer.

The engine runs under `guard` (see there), started from the event loop's thread: Linux sends the parent-death
signal when the *thread* that forked the child exits, so a fork from a pool thread would kill the guard early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common.redis_server import die_with_parent, free_port

log = logging.getLogger("axion.worker.engine")

HEALTH_PATHS = ("/v1/health", "/health/ready", "/health")
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# An engine that stays up this long after a restart counts as healthy again: the backoff starts over.
STABLE_S = 60.0
# What MAX needs to run offline and quietly; kept when the caller's environment already sets them.
ENGINE_ENV = {"MAX_SERVE_DISABLE_TELEMETRY": "1", "MODULAR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false"}


class EngineStartError(RuntimeError):
    """The engine exited or stayed unready through its start-up timeout; the message says which, with its log."""


def fill_command(argv: list[str], model: str, host: str, port: int, devices: str) -> list[str]:
    values = {"model": model, "host": host, "port": str(port), "devices": devices}
    return [arg.format(**values) for arg in argv]


async def is_ready(client: httpx.AsyncClient, base_url: str) -> bool:
    """The first health path the engine knows (not 404) decides: MAX and vLLM answer /v1/health or /health
    once they can serve; Axion's /health is liveness only, so its /health/ready is asked first."""
    for path in HEALTH_PATHS:
        try:
            status = (await client.get(base_url + path, timeout=2.0)).status_code
        except httpx.HTTPError:
            return False
        if status != 404:
            return status == 200
    return False


class EngineSupervisor:
    def __init__(self, argv: list[str], model: str, *, start_timeout_s: float, devices: str = "cpu",
                 host: str = "127.0.0.1", log_path: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.model = model
        self.devices = devices
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.log_path = log_path
        self.env = env or {}
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = asyncio.Event()
        self.restarts = 0
        self.state = "starting"
        self._stopping = False
        self._http = httpx.AsyncClient()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Spawn and wait until ready; EngineStartError (with the process stopped) when it does not get there."""
        self.port = free_port(self.host)
        command = fill_command(self.argv, self.model, self.host, self.port, self.devices)
        env = dict(os.environ) | {k: v for k, v in ENGINE_ENV.items() if k not in os.environ} | self.env
        env["BACKEND"] = "native"  # an Axion started as the engine must not start an engine of its own
        output = self.log_path.open("ab") if self.log_path else None
        log.info("starting the engine on port %d: %s", self.port, " ".join(command))
        self.process = subprocess.Popen([sys.executable, "-m", "workers.chat.external.guard", *command], env=env,
                                        stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=die_with_parent, cwd=Path(__file__).resolve().parents[3])
        if output:
            output.close()
        started = time.monotonic()
        while time.monotonic() - started < self.start_timeout_s:
            if self.process.poll() is not None:
                raise EngineStartError(f"the engine exited with status {self.process.returncode} while starting"
                                       f"{self._log_tail()}")
            if await is_ready(self._http, self.base_url):
                self.state = "ready"
                self.ready.set()
                log.info("the engine is ready at %s after %.1fs", self.base_url, time.monotonic() - started)
                return
            await asyncio.sleep(0.5)
        await self._terminate()
        raise EngineStartError(f"the engine was not ready within {self.start_timeout_s:g}s "
                               f"(EXTERNAL_ENGINE_START_TIMEOUT_S){self._log_tail()}")

    async def watch(self) -> None:
        """Until `stop`: when the engine dies, mark it down and restart it, backing off on repeated crashes."""
        up_since = time.monotonic()
        failures = 0
        while not self._stopping:
            await asyncio.sleep(0.2)
            if self.process is None or self.process.poll() is None:
                continue
            self.ready.clear()
            failures = 0 if time.monotonic() - up_since > STABLE_S else failures + 1
            delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
            self.state = f"restarting after exit status {self.process.returncode}"
            log.error("the engine exited with status %s; restarting it in %.0fs", self.process.returncode, delay)
            while not self._stopping:
                await asyncio.sleep(delay)
                if self._stopping:
                    return
                self.restarts += 1
                try:
                    await self.start()
                    up_since = time.monotonic()
                    break
                except EngineStartError as exc:
                    failures += 1
                    delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                    log.error("engine restart failed (%s); next try in %.0fs", exc, delay)

    def refused(self) -> None:
        """A request found no engine to connect to: nothing to do here, `watch` sees the process exit."""

    async def stop(self) -> None:
        self._stopping = True
        graceful = self.ready.is_set()  # a ready engine may be finishing requests; a starting one has none
        self.ready.clear()
        self.state = "stopped"
        await self._terminate(graceful)
        await self._http.aclose()

    async def _terminate(self, graceful: bool = False) -> None:
        """Stop the guard (it stops the engine's group: SIGTERM with a grace, SIGINT at once) and wait; SIGKILL
        the guard's group if it hangs."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM if graceful else signal.SIGINT)
        for _ in range(300):  # the guard gives the engine 10 s, then kills it
            if process.poll() is not None:
                return
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def _log_tail(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace")[-1500:]
        return f"; its log ({self.log_path}) ends with:\n{tail}"


class AttachedEngine:
    """An engine at EXTERNAL_ENGINE_URL, asked for its health every CHECK_S: after FAILURES_DOWN failed checks in
    a row it is down (the worker reads no new job, so jobs wait in the stream or go to other workers, as while a
    spawned engine restarts), and one good check brings it back; a request whose connection is refused marks it
    down at once (`refused`). The same `ready`, `state`, `restarts`, `watch` and `stop` as `EngineSupervisor`,
    for the worker and its heartbeat."""

    CHECK_S = 1.0
    FAILURES_DOWN = 2

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.ready = asyncio.Event()
        self.ready.set()  # `wait_attached` saw it ready before the worker started
        self.restarts = 0
        self.state = "ready"
        self._http = httpx.AsyncClient()
        self._down_since = 0.0

    async def watch(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.CHECK_S)
            if await is_ready(self._http, self.base_url):
                failures = 0
                if not self.ready.is_set():
                    log.info("the engine at %s answers again after %.0fs", self.base_url,
                             time.monotonic() - self._down_since)
                    self.state = "ready"
                    self.ready.set()
                continue
            failures += 1
            if failures == self.FAILURES_DOWN:
                self._mark_down("fails its health check")

    def refused(self) -> None:
        """A request found no engine to connect to: down at once; the next good check brings it back."""
        self._mark_down("refused a connection")

    def _mark_down(self, why: str) -> None:
        if self.ready.is_set():
            self._down_since = time.monotonic()
            self.ready.clear()
            self.state = "unreachable"
            log.error("the engine at %s %s; reading no job until it answers", self.base_url, why)

    async def stop(self) -> None:
        self.ready.clear()
        self.state = "stopped"
        await self._http.aclose()
