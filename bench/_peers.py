"""The servers peer_bench compares, each started as its users start it and stopped before the next one starts:
Axion on its native engine, Axion on vLLM (in the worker's process), bare vLLM's OpenAI server, and
`transformers serve` with continuous batching. The same model folder, dtype and batch size for all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from bench._client import ROOT, _free_port

SYSTEMS = ("axion-native", "axion-vllm", "vllm", "transformers")
START_TIMEOUT_S = 900.0  # vLLM compiles the model at its first start (cached after)


class PeerServer:
    def __init__(self, system: str, model: Path, *, dtype: str, max_batch_size: int, max_seq_len: int,
                 kv_cache_gib: int, enforce_eager: bool) -> None:
        self.system, self.model = system, model
        self.model_id = str(model)
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.dtype, self.max_batch_size, self.max_seq_len = dtype, max_batch_size, max_seq_len
        self.kv_cache_gib, self.enforce_eager = kv_cache_gib, enforce_eager
        self.log = tempfile.NamedTemporaryFile(prefix=f"peer-{system}-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s = 0.0
        # `transformers serve` refuses fields it does not know (422): its requests may end early at EOS, and the
        # report counts them short.
        self.takes_ignore_eos = system != "transformers"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SERVED_MODEL_NAME")}
        env |= {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
        dtype = self._resolved_dtype()
        if self.system.startswith("axion"):
            env |= {"MODEL_NAME": self.model_id, "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(self.port),
                    "MAX_BATCH_SIZE": str(self.max_batch_size), "MAX_SEQ_LEN": str(self.max_seq_len),
                    "CONCURRENT_REQUESTS": "1024", "MAX_CONNECTIONS": "1024", "CACHE_CAPACITY": "0",
                    "SERVE_EMBEDDINGS": "false", "ALLOW_MODEL_PATHS": "true", "DTYPE": dtype,
                    "BACKEND": self.system.removeprefix("axion-"),
                    "VLLM_ENGINE_ARGS": json.dumps({"enforce_eager": True} if self.enforce_eager else {})}
            return [sys.executable, "-m", "axion.cli", "serve"], env
        if self.system == "vllm":
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_id,
                    "--served-model-name", self.model_id, "--host", "127.0.0.1", "--port", str(self.port),
                    "--dtype", dtype, "--max-model-len", str(self.max_seq_len),
                    "--max-num-seqs", str(self.max_batch_size), "--seed", "0", "--disable-uvicorn-access-log"]
            return argv + (["--enforce-eager"] if self.enforce_eager else []), env
        transformers_cli = str(Path(sys.executable).with_name("transformers"))
        return [transformers_cli, "serve", self.model_id, "--continuous-batching", "--attn-implementation", "sdpa",
                "--dtype", dtype, "--host", "127.0.0.1", "--port", str(self.port)], env

    def _resolved_dtype(self) -> str:
        from workers.chat.loader import pick_device

        return str(pick_device("auto", self.dtype)[1]).removeprefix("torch.")

    def __enter__(self) -> PeerServer:
        argv, env = self._command()
        started = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        while time.monotonic() - started < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.system} exited with {self.proc.returncode}:\n{self.tail()}")
            if self._ready():
                self.ready_s = time.monotonic() - started
                return self
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"{self.system} not ready after {START_TIMEOUT_S:.0f}s:\n{self.tail()}")

    def _ready(self) -> bool:
        try:
            if self.system.startswith("axion"):
                return bool(httpx.get(f"{self.base_url}/health", timeout=2).json().get("workers"))
            return httpx.get(f"{self.base_url}/v1/models", timeout=2).status_code == 200
        except (httpx.HTTPError, ValueError):
            return False

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
        if kind is None:
            Path(self.log.name).unlink(missing_ok=True)
        else:
            print(f"{self.system}'s log: {self.log.name}", file=sys.stderr)

    def stop(self) -> None:
        """SIGTERM to the server's whole session (vLLM's engine processes too), SIGKILL after 60 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        time.sleep(2.0)  # engine processes that outlive their parent a moment must not overlap the next server

    def tail(self, lines: int = 40) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time of the server's whole process tree, and of this (driver) process."""
        totals = {"server": 0.0, "driver": time.process_time()}
        if self.proc is None:
            return totals
        root = psutil.Process(self.proc.pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            totals["server"] += times.user + times.system
        return totals
