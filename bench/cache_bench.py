"""Response-cache benchmark (issue 6): cache hits at concurrency 32 next to a bare Litestar endpoint doing one GET.

    python bench/cache_bench.py --endpoint embeddings   # exports all-MiniLM-L6-v2 to ONNX in a temp dir (~5 s)
    python bench/cache_bench.py --endpoint chat         # the tiny chat model; needs the chat response cache
    python bench/cache_bench.py --endpoint embeddings --repeats 5 --requests 10000 --json out.json

One run starts a private redis-server, `axion serve` on it (REDIS_URL set) and, under uvicorn as `axion api`
runs, a bare Litestar app whose one route does one Redis GET on the same Redis and returns the bytes a cache hit
returns (`bench/_bare_app.py`). The cache is filled with one request (a greedy chat completion, or one
sentence to embed); every timed request then repeats it, and every timed answer must carry `x-axion-cache: hit`
or the run stops. The two systems are driven alternately (`--repeats` pairs, first one then the other, the
order swapped each pair) by the same closed-loop client (`bench/_http.py`: C keep-alive connections); the
medians of the pairs are reported. Each system of a pair is measured at `--concurrency` (32) and then with one
connection (`--latency-requests`), because in a closed loop of C connections the p50 is about C ÷ throughput
(Little's law): at C=32 it says how long a request queues, at C=1 what a hit costs.

Targets: cache-hit p50 <= 2 ms, and >= 50 % of the bare endpoint's requests/s at concurrency 32.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench`, `common` and `workers` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import psutil
import redis

from bench._client import ROOT, Server, _free_port
from bench._http import HTTPFailure, Load, closed_loop
from bench._measure import percentile
from common.redis_server import EmbeddedRedis

BARE_KEY = "axion:bench:bare"
HOST = "127.0.0.1"
P50_TARGET_MS = 2.0
RPS_TARGET = 0.5
EMBED_TEXT = "A man is playing a guitar on a quiet street at night."
CHAT_MESSAGES = [{"role": "user", "content": "Say something about caches."}]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", choices=["embeddings", "chat"], default="chat",
                   help="what the cache hit is: an embedding (default until the chat cache lands) or a chat answer")
    p.add_argument("--concurrency", type=int, default=32, help="keep-alive connections, each closed-loop")
    p.add_argument("--requests", type=int, default=5000, help="timed requests per system per repeat")
    p.add_argument("--warmup", type=int, default=1000, help="untimed requests per system first")
    p.add_argument("--latency-requests", type=int, default=1000, help="timed requests on one connection")
    p.add_argument("--repeats", type=int, default=3, help="alternating pairs (bare, cache) measured")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw", help="raw asyncio HTTP/1.1 or httpx")
    p.add_argument("--chat-model", type=Path, help="chat model folder (default: the tiny Llama, built in a temp dir)")
    p.add_argument("--embedding-model", type=Path, help="an exported all-MiniLM-L6-v2 ONNX folder (default: export)")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    return p.parse_args(argv)


class CacheServer(Server):
    """`axion serve` on the bench's own Redis; ready when /health lists the worker the endpoint needs."""

    def __init__(self, chat_dir: Path, redis_url: str, embed_dirs: tuple[Path, Path] | None) -> None:
        super().__init__(chat_dir, max_batch_size=8, max_seq_len=512)
        self.redis_url, self.embed_dirs = redis_url, embed_dirs

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env.update(REDIS_URL=self.redis_url, LOG_LEVEL="warning", HF_HUB_OFFLINE="1",
                   SERVE_EMBEDDINGS="true" if self.embed_dirs else "false",
                   CACHE_CAPACITY="1000", EMBED_CACHE_CAPACITY="1000")  # the serving benchmark's server has them off
        if self.embed_dirs:
            env.update(EMBEDDING_MODEL=str(self.embed_dirs[0]), RERANK_MODEL=str(self.embed_dirs[1]))
        return env

    def __enter__(self) -> CacheServer:
        super().__enter__()  # returns once any worker is up
        kind = "embed" if self.embed_dirs else "chat"
        deadline = time.monotonic() + self.start_timeout_s
        while not any(w.get("kind") == kind for w in _health(self.base_url).get("workers", [])):
            if time.monotonic() > deadline or self.proc is None or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"/health never listed a {kind} worker\n{self.tail()}")
            time.sleep(0.5)
        return self

    def api_process(self) -> psutil.Process:
        assert self.proc is not None
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if " ".join(child.cmdline()).endswith("axion.cli api"):
                return child
        raise RuntimeError("no `axion.cli api` child of axion serve")


def _health(base_url: str) -> dict[str, Any]:
    try:
        return dict(httpx.get(f"{base_url}/health", timeout=5).json())
    except (httpx.HTTPError, ValueError):
        return {}


class BareServer:
    """`bench._bare_app` under uvicorn (h11 or httptools, whichever uvicorn picks for `axion api` too)."""

    def __init__(self, redis_url: str) -> None:
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="cache_bench-bare-", suffix=".log", delete=False)
        env = {**os.environ, "BARE_REDIS_URL": redis_url, "BARE_KEY": BARE_KEY}
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "bench._bare_app:create_app",
                                      "--host", HOST, "--port", str(self.port), "--log-level", "warning",
                                      "--no-access-log"], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                httpx.post(f"http://{HOST}:{self.port}/bare", content=b"{}", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the bare app did not start:\n{Path(self.log.name).read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def request_of(endpoint: str, model: str) -> tuple[str, bytes]:
    """(path, JSON body) of the request whose answer the cache keeps."""
    if endpoint == "chat":
        body: dict[str, Any] = {"model": model, "messages": CHAT_MESSAGES, "temperature": 0, "max_tokens": 16}
        return "/v1/chat/completions", json.dumps(body).encode()
    # base64: what the official SDK asks for by default
    return "/v1/embeddings", json.dumps({"model": model, "input": EMBED_TEXT, "encoding_format": "base64"}).encode()


def fill(base_url: str, path: str, body: bytes) -> bytes:
    """Send the request twice: the second answer must be a cache hit. Returns its body (what a hit sends)."""
    with httpx.Client(base_url=base_url, timeout=120) as http:
        answers = [http.post(path, content=body, headers={"Content-Type": "application/json"}) for _ in range(2)]
    for resp in answers:
        if resp.status_code != 200:
            raise HTTPFailure(f"HTTP {resp.status_code} from {path}: {resp.text[:300]}")
    cache = [r.headers.get("x-axion-cache") for r in answers]
    if cache[1] != "hit":
        raise HTTPFailure(f"x-axion-cache was {cache} on two identical {path} requests; the second must be a hit "
                          "(is the response cache for this endpoint on this commit, and CACHE_CAPACITY > 0?)")
    return answers[1].content


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {"driver": time.process_time()}
    for role, proc in procs.items():
        times = proc.cpu_times()
        out[role] = times.user + times.system
    return out


def measure(port: int, path: str, body: bytes, args: argparse.Namespace, hit: bool,
            procs: dict[str, psutil.Process]) -> dict[str, Any]:
    """A closed-loop run at `--concurrency` (requests/s, latency, CPU ms per request of each process), then one
    on a single connection (latency alone)."""
    expect = ("x-axion-cache", "hit") if hit else None
    before = cpu_seconds(procs)
    load: Load = asyncio.run(closed_loop(HOST, port, path, body, args.concurrency, args.requests, expect,
                                         args.client))
    after = cpu_seconds(procs)
    alone: Load = asyncio.run(closed_loop(HOST, port, path, body, 1, args.latency_requests, expect, args.client))
    lat, lat1 = load.latencies_s, alone.latencies_s
    return {"requests_per_s": load.requests_per_s, "p50_ms": 1000 * (percentile(lat, 50) or 0.0),
            "p99_ms": 1000 * (percentile(lat, 99) or 0.0), "requests": len(lat), "wall_s": load.wall_s,
            "cpu_ms_per_request": {k: 1000 * (after[k] - before[k]) / len(lat) for k in before},
            "c1_p50_ms": 1000 * (percentile(lat1, 50) or 0.0), "c1_p99_ms": 1000 * (percentile(lat1, 99) or 0.0),
            "c1_requests_per_s": alone.requests_per_s}


NUMBERS = ("requests_per_s", "p50_ms", "p99_ms", "c1_p50_ms", "c1_p99_ms", "c1_requests_per_s")


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in NUMBERS}
    row["cpu_ms_per_request"] = {k: statistics.median(r["cpu_ms_per_request"][k] for r in runs)
                                 for k in runs[0]["cpu_ms_per_request"]}
    return row


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} x {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.system()} " \
           f"{platform.release()}, Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f} at start"


def report(args: argparse.Namespace, model: str, pairs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = {system: median_row([p[system] for p in pairs]) for system in ("bare", "cache")}
    ratios = [p["cache"]["requests_per_s"] / p["bare"]["requests_per_s"] for p in pairs]
    ratio = statistics.median(ratios)
    met = {"p50_c1": rows["cache"]["c1_p50_ms"] <= P50_TARGET_MS, "p50_c32": rows["cache"]["p50_ms"] <= P50_TARGET_MS,
           "rps": ratio >= RPS_TARGET}
    labels = {"bare": "bare Litestar, one Redis GET", "cache": f"{args.endpoint} cache hit"}
    roles = list(rows["cache"]["cpu_ms_per_request"])
    lines = [f"- date: {now}", f"- commit: {commit.stdout.strip() or '?'}{' (dirty tree)' if dirty else ''}",
             f"- machine: {machine()}", f"- model: {model}",
             f"- load: {args.concurrency} keep-alive connections, closed loop, {args.client} client; "
             f"{args.requests} timed requests per system per repeat after {args.warmup} warm-up; "
             f"{args.repeats} alternating pairs, medians shown; then {args.latency_requests} requests on one "
             "connection (C=1)", "",
             f"| system | C=32 requests/s | C=32 p50 ms | C=32 p99 ms | C=1 p50 ms | C=1 p99 ms | "
             f"C=32 CPU ms per request ({' / '.join(roles)}) |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for system, row in rows.items():
        cpu = " / ".join(f"{row['cpu_ms_per_request'][r]:.3f}" for r in roles)
        lines.append(f"| {labels[system]} | {row['requests_per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
                     f"| {row['c1_p50_ms']:.2f} | {row['c1_p99_ms']:.2f} | {cpu} |")
    verdict = {True: "met", False: "NOT met"}
    lines += ["", f"- cache ÷ bare requests/s at C={args.concurrency}, per pair: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}; median **{ratio:.2f}** (target ≥ {RPS_TARGET:.2f}: "
                  f"{verdict[met['rps']]})",
              f"- cache-hit p50 at C=1 **{rows['cache']['c1_p50_ms']:.2f} ms** (target ≤ {P50_TARGET_MS:g} ms: "
              f"{verdict[met['p50_c1']]}); at C={args.concurrency} {rows['cache']['p50_ms']:.2f} ms "
              f"({verdict[met['p50_c32']]}), which is about {args.concurrency} ÷ requests/s of queueing "
              f"(the bare endpoint's is {rows['bare']['p50_ms']:.2f} ms)"]
    print("\n".join(lines))
    return {"endpoint": args.endpoint, "lines": lines, "pairs": pairs, "rows": rows, "ratios": ratios,
            "targets_met": met}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from devtools.chat_models import build_tiny_llama

    with tempfile.TemporaryDirectory(prefix="cache_bench-") as tmp, EmbeddedRedis() as store:
        chat_dir = (args.chat_model or build_tiny_llama(Path(tmp) / "chat")).resolve()
        embed_dirs = None
        if args.endpoint == "embeddings":
            from devtools.embed_models import build_tiny_cross_encoder, export_minilm_onnx

            embed_dirs = ((args.embedding_model or export_minilm_onnx(Path(tmp) / "minilm-onnx")).resolve(),
                          build_tiny_cross_encoder(Path(tmp) / "rerank"))
        model = str(embed_dirs[0] if embed_dirs else chat_dir)
        bare = BareServer(store.url)
        try:
            with CacheServer(chat_dir, store.url, embed_dirs) as server:
                path, body = request_of(args.endpoint, model)
                redis.Redis.from_url(store.url).set(BARE_KEY, fill(server.base_url, path, body))
                procs = {"api": server.api_process(), "bare": psutil.Process(bare.proc.pid),
                         "redis": psutil.Process(store.process.pid)}  # type: ignore[union-attr]
                systems = {"bare": (bare.port, "/bare", False), "cache": (server.port, path, True)}
                for port, route, hit in systems.values():
                    asyncio.run(closed_loop(HOST, port, route, body, args.concurrency, args.warmup,
                                            ("x-axion-cache", "hit") if hit else None, args.client))
                pairs = []
                for r in range(args.repeats):
                    order = ["bare", "cache"] if r % 2 == 0 else ["cache", "bare"]
                    pairs.append({s: measure(systems[s][0], systems[s][1], body, args, systems[s][2], procs)
                                  for s in order})
                    print(f"pair {r + 1}: " + ", ".join(f"{s} {pairs[-1][s]['requests_per_s']:.0f}/s p50 "
                                                        f"{pairs[-1][s]['p50_ms']:.2f} ms, C=1 p50 "
                                                        f"{pairs[-1][s]['c1_p50_ms']:.2f} ms" for s in order),
                          file=sys.stderr)
        finally:
            bare.stop()
        name = "all-MiniLM-L6-v2 (ONNX, fastembed, CPU)" if embed_dirs else "tiny random Llama (devtools/chat_models)"
        result = report(args, name, pairs)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
