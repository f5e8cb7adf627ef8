"""A small process between the chat worker and the engine, so no engine process outlives the worker.

`python -m workers.chat.external.guard CMD ARGS...` starts CMD in a process group of its own and stays with it:
- the worker is asked (PR_SET_PDEATHSIG) to SIGTERM the guard when it dies, even by `kill -9`, and the guard
  also watches its parent id, in case that signal was lost;
- on SIGTERM, or when the parent is gone, it stops the engine's whole group (SIGTERM, then SIGKILL after a
  grace) plus any descendant that left the group, then exits; SIGINT does the same with no grace (an engine
  still starting has nothing to finish, and MAX ignores SIGTERM while it compiles);
- when the engine's main process exits by itself, it kills what that left behind (MAX's model worker keeps
  running after its server dies) and exits with the engine's status, so the worker sees one crash.
A guard is needed because MAX's model worker is a grandchild: a parent-death signal reaches children only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from common.redis_server import die_with_parent

GRACE_S = 10.0
NO_GRACE_S = 0.5
SCRATCH_ENV = "AXION_ENGINE_SCRATCH"  # a folder (the engine's TMPDIR) the guard removes when it ends
POLL_S = 0.2


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def stop_group(pgid: int, known: list[psutil.Process], grace_s: float = GRACE_S) -> None:
    """SIGTERM the group and the known descendants, wait up to `grace_s`, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        for proc in known:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            alive = [p for p in known if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            try:
                os.killpg(pgid, 0)
                group_alive = True
            except (ProcessLookupError, PermissionError):
                group_alive = False
            if not alive and not group_alive:
                return
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m workers.chat.external.guard CMD [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    grace: float | None = None  # set by a signal: how long the engine may take to stop

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal grace
        grace = NO_GRACE_S if signum == signal.SIGINT else min(grace or GRACE_S, GRACE_S)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    die_with_parent()  # in case the worker started us without it
    return _guard(argv, parent, lambda: grace)


def _guard(argv: list[str], parent: int, stopping: Callable[[], float | None]) -> int:
    engine = subprocess.Popen(argv, start_new_session=True)
    print(f"guard {os.getpid()}: engine pid {engine.pid} (group {engine.pid}): {' '.join(argv)}", flush=True)
    known: dict[int, psutil.Process] = {}
    last_scan = 0.0
    while True:
        if time.monotonic() - last_scan > 1.0:  # remember descendants that might leave the group
            for proc in _descendants(engine.pid):
                known.setdefault(proc.pid, proc)
            last_scan = time.monotonic()
        code = engine.poll()
        if code is not None:
            stop_group(engine.pid, [*known.values(), *_descendants(os.getpid())], grace_s=2.0)
            print(f"guard {os.getpid()}: engine exited with status {code}", flush=True)
            return code if code > 0 else 1
        grace = stopping()
        if grace is not None or os.getppid() != parent:
            why = "asked to stop" if grace is not None else "the worker is gone"
            print(f"guard {os.getpid()}: {why}; stopping the engine's process group", flush=True)
            stop_group(engine.pid, [*known.values(), *_descendants(engine.pid)], grace_s=grace or GRACE_S)
            with contextlib.suppress(subprocess.TimeoutExpired):
                engine.wait(timeout=1)
            scratch = os.environ.get(SCRATCH_ENV, "")  # the engine's TMPDIR: a killed worker cannot remove it
            if os.getppid() != parent and scratch and Path(scratch).name.startswith("axion-engine-"):
                shutil.rmtree(scratch, ignore_errors=True)
            return 0
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
