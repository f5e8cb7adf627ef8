"""Fixtures: a tiny model on disk, a real redis-server on a free port, and real Axion processes over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.redis_server import EmbeddedRedis, free_port

REPO = Path(__file__).resolve().parent.parent
# The tests compare served text with float32 `generate`; DTYPE=auto would serve bf16 on a CPU with AMX.
# Tests of other dtypes pass their own DTYPE to the processes they start.
os.environ["DTYPE"] = "float32"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from devtools.chat_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real all-MiniLM-L6-v2 weights exported to ONNX (served by fastembed); once per session (~5 s)."""
    from devtools.embed_models import export_minilm_onnx

    return export_minilm_onnx(tmp_path_factory.mktemp("minilm") / "minilm-onnx")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@dataclass
class Proc:
    """A running `axion` subcommand with its log file."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> Proc:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "axion.cli", *self.args], env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:  # stuck: its threads' stacks go to its log first (SIGUSR1)
                self.process.send_signal(signal.SIGUSR1)
                time.sleep(1.0)
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def axion_env(model_dir: Path, redis_url: str | None, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(MODEL_NAME=str(model_dir), SERVER_HOST="127.0.0.1", SERVER_PORT=str(port), LOG_LEVEL="info",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               ALLOW_MODEL_PATHS="true",  # the tiny models live in absolute temporary folders
               BACKEND="native")  # the external-engine tests ask for theirs (tests/test_external_engine.py)
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra)
    return env


def get_json(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_ready(base_url: str, procs: list[Proc], workers: int = 1, timeout: float = 120) -> dict:
    """Wait until /health lists `workers` live workers; fail early with the logs if a process died."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.process.poll() is not None:
                pytest.fail(f"{proc.args} exited with {proc.process.returncode}:\n{proc.log()[-4000:]}")
        try:
            health = get_json(f"{base_url}/health")
            if len(health["workers"]) >= workers:
                return health
            last = health
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    logs = "\n".join(p.log()[-3000:] for p in procs)
    pytest.fail(f"server not ready within {timeout}s (last: {last}):\n{logs}")


@dataclass
class Server:
    base_url: str
    model: str
    procs: list[Proc]
    redis_url: str | None = None

    def client(self, **kwargs: object):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, **kwargs)

    def async_client(self, **kwargs: object):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, **kwargs)


@contextlib.contextmanager
def serving(model_dir: Path, logs: Path, **extra: str) -> Iterator[Server]:
    """`axion serve` of one chat model (no embedding workers) with `extra` settings, ready; it must exit cleanly."""
    port = free_port()
    env = axion_env(model_dir, None, port, **({"SERVE_EMBEDDINGS": "false"} | extra))
    proc = Proc(["serve"], env, logs / "serve.log").start()
    server = Server(f"http://127.0.0.1:{port}", str(model_dir), [proc])
    try:
        wait_ready(server.base_url, [proc])
        yield server
    finally:
        code = proc.stop()
        assert code == 0, f"axion serve exited with {code}:\n{proc.log()[-3000:]}"


@pytest.fixture(scope="session")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`axion serve` exactly as a user runs it: REDIS_URL unset, so it starts its own embedded Redis."""
    with serving(tiny_model_dir, tmp_path_factory.mktemp("logs"), MAX_SEQ_LEN="1024", SSE_KEEPALIVE_S="0.2",
                 MAX_BATCH_SIZE="2") as server:
        yield server


def enqueue_orphan(r: Any, stream: str, job: Any, delivered: int = 1) -> bytes:
    """Queue `job` as a 'ghost' worker's: read by a consumer that then died, so only a takeover answers it.
    XADD and the ghost's read run in one transaction, so no live worker reads the entry first; `delivered` > 1
    sets the entry's delivery count as if earlier takeovers had failed too."""
    from common import keys
    from common.protocol import encode

    with r.pipeline(transaction=True) as tx:
        tx.xadd(stream, {"job": encode(job)})
        tx.xreadgroup(keys.WORKER_GROUP, "ghost", {stream: ">"}, count=1)
        entry = tx.execute()[0]
    if delivered > 1:
        r.xclaim(stream, keys.WORKER_GROUP, "ghost", 0, [entry], retrycount=delivered)
    return entry


def subscribed(r: Any, request_id: str) -> Any:
    """A pub/sub connection on a request's reply channel, subscription confirmed."""
    from common import keys

    pubsub = r.pubsub()
    pubsub.subscribe(keys.reply_channel(request_id))
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    return pubsub


def next_event(pubsub: Any, timeout: float = 15) -> Any:
    """The next event published on `pubsub` (decoded), or None after `timeout` seconds."""
    from common.protocol import decode_event

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if message and message["type"] == "message":
            return decode_event(message["data"])
    return None
