"""Shared by the external-engine tests: start an Axion front on an engine, find the engine's processes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from common.redis_server import free_port
from tests.conftest import Proc, Server, axion_env, get_json, wait_ready

GUARD = "workers.chat.external.guard"


def start_front(model_dir: Path, logs: Path, name: str, timeout: float = 120, wait: bool = True, **env: str) -> Server:
    """`axion serve` (own embedded Redis) whose chat worker uses the backend the `env` settings pick; with
    `wait`, once its chat worker beats."""
    port = free_port()
    settings = {"SERVE_EMBEDDINGS": "false", "MAX_SEQ_LEN": "1024", "SSE_KEEPALIVE_S": "0.2", "BACKEND": "auto"}
    proc = Proc(["serve"], axion_env(model_dir, None, port, **(settings | env)), logs / f"{name}.log").start()
    server = Server(f"http://127.0.0.1:{port}", str(model_dir), [proc])
    if not wait:
        return server
    try:
        wait_ready(server.base_url, [proc], timeout=timeout)
    except BaseException:
        proc.stop()
        raise
    return server


def chat_worker_info(server: Server) -> dict:
    workers = [w for w in get_json(f"{server.base_url}/health")["workers"] if w["kind"] == "chat"]
    assert len(workers) == 1, workers
    return workers[0]


def guards(root_pid: int) -> list[psutil.Process]:
    """The engine guards under a process (a front's `serve` or its worker)."""
    try:
        procs = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if GUARD in " ".join(_cmdline(p))]


def engine_tree(root_pid: int) -> list[psutil.Process]:
    """The guard's descendants: the engine and everything it started."""
    found = guards(root_pid)
    assert len(found) == 1, f"expected one engine guard under {root_pid}, found {found}"
    return found[0].children(recursive=True)


def wait_engine_started(front: Server, processes: int, timeout: float = 60) -> list[psutil.Process]:
    """Wait until the front's engine guard has at least `processes` descendants; return them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = guards(front.procs[0].process.pid)
        tree = found[0].children(recursive=True) if found else []
        if len(tree) >= processes:
            return tree
        time.sleep(0.2)
    pytest.fail(f"the engine did not start {processes} processes within {timeout}s:\n{front.procs[0].log()[-3000:]}")


def wait_gone(procs: list[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    """Wait until none of `procs` runs any more; return those still running after `timeout`."""
    deadline = time.monotonic() + timeout
    alive = procs
    while time.monotonic() < deadline:
        alive = [p for p in procs if _running(p)]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def wait_backend(server: Server, reason_part: str, timeout: float = 120) -> dict:
    """Poll /health until the chat worker's backend reason contains `reason_part`."""
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        info = chat_worker_info(server)
        if reason_part in (info.get("backend_reason") or ""):
            return info
        time.sleep(0.3)
    pytest.fail(f"backend reason never contained {reason_part!r}: {info.get('backend_reason')}")


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def kill_9_worker_and_check_nothing_left(front_pid: int, tree: list[psutil.Process]) -> None:
    """SIGKILL the chat worker that runs the engine's guard; the engine's processes (`tree`) and the guard must go,
    and so must the engine's TMPDIR, which the guard removes as the worker could not."""
    guard = guards(front_pid)
    worker = guard[0].parent()
    assert worker is not None and "worker" in worker.cmdline()
    scratch = Path(guard[0].environ()["TMPDIR"])
    assert scratch.is_dir()
    worker.send_signal(signal.SIGKILL)
    assert wait_gone(tree + guard) == []
    assert not scratch.exists()
