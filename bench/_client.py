"""The server side: start `axion serve` on a model folder and drive it through the official `openai` SDK.

Every request streams with `ignore_eos`, so each one produces exactly the asked number of tokens and the
server's throughput is comparable with the engine-alone runs on the same prompts.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import msgspec
import psutil
from openai import AsyncOpenAI

from bench._measure import LevelStats, PromptFactory, RequestTiming, level_key, summarize, warmup_key
from bench._sse import SSEClient

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`python -m axion.cli serve` (API + one worker + embedded Redis) as a child process, up until `stop`."""

    def __init__(self, model_dir: Path, max_batch_size: int, max_seq_len: int, start_timeout_s: float = 300.0,
                 device: str = "cpu") -> None:
        self.model_id = str(model_dir)
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.device = device
        self.start_timeout_s = start_timeout_s
        self.log = tempfile.NamedTemporaryFile(prefix="serve_bench-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.dtype = ""  # as the worker reports it in /health

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SERVED_MODEL_NAME", "RUST_LOG")}
        env.update(MODEL_NAME=self.model_id, SERVER_HOST="127.0.0.1", SERVER_PORT=str(self.port),
                   MAX_BATCH_SIZE=str(self.max_batch_size), CONCURRENT_REQUESTS="1024", MAX_CONNECTIONS="1024",
                   MAX_SEQ_LEN=str(self.max_seq_len), LOG_LEVEL="info", DEVICE=self.device, ALLOW_MODEL_PATHS="true",
                   CACHE_CAPACITY="0",  # generation is measured: repeated prompts must not be cache hits
                   SERVE_EMBEDDINGS="false")  # chat only: no embedding and rerank workers on the cores
        env["BACKEND"] = os.environ.get("BACKEND", "native")  # the native engine unless BACKEND=max is asked for
        return env

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen([sys.executable, "-m", "axion.cli", "serve"], cwd=ROOT, env=self._env(),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                status = self.proc.returncode
                raise RuntimeError(f"the server exited with status {status} while starting\n{self.tail()}")
            try:
                health = httpx.get(f"{self.base_url}/health", timeout=2).json()
                if health.get("workers"):
                    self.dtype = health["workers"][0]["dtype"]
                    self._print_plan()
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"no worker in /health after {self.start_timeout_s:.0f}s\n{self.tail()}")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        status = self.stop()
        if status:
            print(f"warning: the server exited with status {status}; log {self.log.name}:\n{self.tail()}",
                  file=sys.stderr)
        elif kind is None:
            Path(self.log.name).unlink(missing_ok=True)  # kept when something went wrong

    def stop(self) -> int | None:
        """SIGTERM (the server drains and stops its children and Redis); SIGKILL after 60 s."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def _print_plan(self) -> None:
        """The worker's CPU_LINEAR row plan, from its log (deleted after a clean run): a row count padded by a
        busy moment at its start slows every step of that size (bench/RESULTS.md, session 11)."""
        log = Path(self.log.name).read_text(errors="replace")
        plans = [line.split("CPU_LINEAR: ", 1)[1] for line in log.splitlines() if "CPU_LINEAR: " in line]
        if plans:
            print(f"- server worker, CPU_LINEAR: {plans[-1]}", flush=True)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time so far of the server's processes by role, and of this (driver) process.

        On a 2-core box the client, API and Redis take cores the worker would use; this says how much.
        """
        totals = {"worker": 0.0, "api": 0.0, "redis": 0.0, "driver": time.process_time()}
        if self.proc is None:
            return totals
        root = psutil.Process(self.proc.pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                cmd, times = " ".join(proc.cmdline()), proc.cpu_times()
            except psutil.Error:
                continue
            role = next((r for r in ("worker", "api") if cmd.endswith(f"axion.cli {r}")), None)
            role = role or ("redis" if "redis" in cmd else "api")  # `serve` itself (the supervisor): count as api
            totals[role] += times.user + times.system
        return totals

    def client(self, kind: str = "raw") -> AnyClient:
        if kind == "raw":
            return RawClient(self.base_url)
        if kind == "httpx":
            return HttpxClient(self.base_url)
        return AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="x", max_retries=0)


class RawClient(SSEClient):
    """OpenAI-protocol streaming on raw asyncio sockets (`bench/_sse.py`), as vLLM's serving benchmark does with
    aiohttp. The official SDK builds a pydantic object per chunk, and httpx parses each chunk through h11; on a
    2-core box that CPU comes out of the server being measured (the SDK: 8-11% of a core at 16-64 streams)."""


class HttpxClient:
    """The same protocol over httpx, to cross-check the raw client (`--client httpx`)."""

    def __init__(self, base_url: str) -> None:
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits)

    async def __aenter__(self) -> HttpxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()


AnyClient = AsyncOpenAI | RawClient | HttpxClient


async def stream_request(client: AnyClient, model: str, messages: list[dict[str, str]],
                         out: int, ignore_eos: bool = True) -> RequestTiming:
    """One streamed chat completion; TTFT is send → first chunk with text (the role-only first chunk is skipped).
    `ignore_eos=False` leaves the field out, for servers that refuse it (`transformers serve`)."""
    if isinstance(client, RawClient | HttpxClient):
        return await _stream_raw(client, model, messages, out, ignore_eos)
    timing = RequestTiming(sent=time.perf_counter())
    stream = await client.chat.completions.create(
        model=model, messages=messages, stream=True, temperature=0, max_tokens=out,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            timing.completion_tokens = chunk.usage.completion_tokens
            timing.prompt_tokens = chunk.usage.prompt_tokens
            details = getattr(chunk.usage, "prompt_tokens_details", None)
            timing.cached_tokens = getattr(details, "cached_tokens", None) if details is not None else None
        for choice in chunk.choices:
            if choice.delta.content and timing.first is None:
                timing.first = now
            if timing.first is not None and (choice.delta.content or choice.finish_reason):
                timing.chunks.append(now)
                timing.last = now
    if timing.completion_tokens == 0:
        raise RuntimeError("the stream ended without a usage chunk")
    return timing


async def _stream_raw(client: RawClient | HttpxClient, model: str, messages: list[dict[str, str]],
                      out: int, ignore_eos: bool = True) -> RequestTiming:
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True, "temperature": 0,
                            "max_tokens": out, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    timing = RequestTiming(sent=time.perf_counter())
    async for chunk in _chunks(client, body):
        now = time.perf_counter()
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        usage = chunk.get("usage")
        if usage:
            timing.completion_tokens, timing.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
            timing.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        for choice in chunk["choices"]:
            content = choice["delta"].get("content")
            if content and timing.first is None:
                timing.first = now
            if timing.first is not None and (content or choice.get("finish_reason")):
                timing.chunks.append(now)
                timing.last = now
    if timing.completion_tokens == 0:
        raise RuntimeError("the stream ended without a usage chunk")
    return timing


async def _chunks(client: RawClient | HttpxClient, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    if isinstance(client, RawClient):
        async for chunk in client.stream("/v1/chat/completions", body):
            yield chunk
        return
    async with client.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                yield msgspec.json.decode(line[6:])


async def run_level(server: Server, client: AnyClient, prompts: PromptFactory, concurrency: int, rounds: int,
                    out: int, system: str = "server", prefix: str = "", ignore_eos: bool = True) -> LevelStats:
    """C clients, each sending R requests back to back, after a warm-up round of C requests at once.

    The warm-up is as wide as the level (the engine-alone runs warm up the same way): a server's first burst of
    C requests ran ~5% slower than the next ones at C=16 (first batch shapes, new connections), which made the
    first of a few repeats an outlier. `prefix` keeps the prompts of a repeated level apart (each repeat of the
    concurrency mode, the Poisson mode's lone and capacity runs): the server's prefix cache keeps what an earlier
    repeat computed, while each engine-alone run starts with an empty one.
    """
    await asyncio.gather(*(stream_request(client, server.model_id,
                                          prompts.messages(prefix + warmup_key(concurrency, i)), out, ignore_eos)
                           for i in range(concurrency)))
    chats = [prompts.messages(prefix + level_key(concurrency, i)) for i in range(concurrency * rounds)]
    timings: list[RequestTiming] = []

    async def one_client(c: int) -> None:  # prompts are built above: tokenizing must not run inside the timing
        for r in range(rounds):
            timings.append(await stream_request(client, server.model_id, chats[c * rounds + r], out, ignore_eos))

    cpu_before, start = server.cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(concurrency)))
    wall, cpu_after = time.perf_counter() - start, server.cpu_seconds()
    stats = summarize(system, concurrency, timings, wall, out)
    stats.extra["cpu_pct"] = {role: 100 * (cpu_after[role] - cpu_before[role]) / wall for role in cpu_before}
    return stats


def poisson_arrivals(rate: float, requests: int | None, duration_s: float, seed: int = 0) -> list[float]:
    """Send offsets (s) of a Poisson process: `requests` of them, or as many as fall within `duration_s`."""
    rng, t, times = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if (requests is not None and len(times) >= requests) or (requests is None and t > duration_s):
            return times
        times.append(t)


async def run_poisson(server: Server, client: AnyClient, prompts: PromptFactory, arrivals: list[float],
                      out: int) -> LevelStats:
    """Open-loop load: each request is sent at its arrival time whether or not earlier ones have finished."""
    await stream_request(client, server.model_id, prompts.messages("warmup-poisson"), out)
    chats = [prompts.messages(f"poisson-{i}") for i in range(len(arrivals))]
    tasks: list[asyncio.Task[RequestTiming]] = []
    start = time.perf_counter()
    for chat, offset in zip(chats, arrivals, strict=True):
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(stream_request(client, server.model_id, chat, out)))
    timings = list(await asyncio.gather(*tasks))
    stats = summarize("server, Poisson", 0, timings, time.perf_counter() - start, out)
    stats.extra["offered_rate_rps"] = len(arrivals) / arrivals[-1] if arrivals and arrivals[-1] > 0 else None
    return stats


async def run_shared_prefix(server: Server, client: AnyClient, prompts: PromptFactory, system_tokens: int,
                            followers: int, out: int, burst: int = 0) -> dict[str, Any]:
    """One shared system prompt: the first request alone, then `followers` more one after another; then `burst`
    requests at once with a system prompt nobody sent before, and `burst` at once with the shared (cached) one.

    A warm-up with a *different* system prompt of the same length comes first, so the server's one-time costs
    do not land on the first measured request.
    """
    def chat(system: str, i: int) -> list[dict[str, str]]:
        return [{"role": "system", "content": prompts.system(system, system_tokens)},
                {"role": "user", "content": f"Question {i}: what does item number {i} say?"}]

    await stream_request(client, server.model_id, chat("warmup", 0), out)
    first = await stream_request(client, server.model_id, chat("shared", 1), out)
    later = [await stream_request(client, server.model_id, chat("shared", 2 + i), out) for i in range(followers)]

    async def at_once(system: str) -> list[RequestTiming]:
        return list(await asyncio.gather(*(stream_request(client, server.model_id, chat(system, 1000 + i), out)
                                           for i in range(burst))))

    return {"first": first, "later": later, "burst_new": await at_once("burst"),
            "burst_cached": await at_once("shared")}
