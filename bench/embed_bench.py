"""Embedding benchmark (issue 5): 32 one-sentence clients through the server vs one in-process fastembed batch.

    python bench/embed_bench.py                      # exports all-MiniLM-L6-v2 to ONNX in a temp dir (~5 s)
    python bench/embed_bench.py --model DIR --json out.json

Targets: server (cross-request batching on) >= 0.8x the in-process throughput on the same sentences as one
batch, and >= 3x the same server with EMBED_CROSS_REQUEST_BATCHING=false. The in-process batch is measured
first, with no server running, so the two never compete for the cores; then the server runs twice, batching
on and off, in the same script run, so the three rows share one machine state.
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
import msgspec

from bench._client import ROOT, Server
from bench._http import RawConnection, request_bytes
from bench._measure import WORDS, percentile
from common import aio

HEARTBEAT_WAIT_S = 4.0  # workers refresh /health every HEARTBEAT_TTL_S / 3 (10 s by default)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported all-MiniLM-L6-v2 ONNX folder (default: export one)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients, one sentence per request")
    p.add_argument("--rounds", type=int, default=10, help="requests each client sends back to back")
    p.add_argument("--repeats", type=int, default=20, help="in-process: timed batch calls (median taken)")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    return p.parse_args(argv)


def sentences(n: int, prefix: str = "") -> list[str]:
    """Distinct ~12-word sentences, deterministic: the same texts for every system in one run."""
    return [f"{prefix}Sentence {i}: " + " ".join(WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(11)) + "."
            for i in range(n)]


def in_process(model_dir: Path, texts: list[str], repeats: int) -> dict[str, Any]:
    """fastembed in this process, the texts as one `embed` call: the best case the server is held to."""
    from workers.embed.backends import load_embedding

    backend = load_embedding(str(model_dir))
    backend.embed(texts)  # warm-up: onnxruntime's first run allocates and plans
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.embed(texts)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    passes = []  # one call per sentence: what batching can gain over, on this machine
    for _ in range(3):
        start = time.perf_counter()
        for text in texts:
            backend.embed([text])
        passes.append(time.perf_counter() - start)
    return {"one_per_call_sentences_per_s": len(texts) / statistics.median(passes),
            "system": "in-process fastembed, one batch", "sentences_per_s": len(texts) / median,
            "p50_ms": 1000 * median, "p99_ms": 1000 * (percentile(times, 99) or 0.0), "requests": repeats}


class EmbedServer(Server):
    """`axion serve` with the chat, embed and rerank workers; ready when /health lists all three."""

    def __init__(self, model_dir: Path, chat_dir: Path, rerank_dir: Path, batching: bool) -> None:
        super().__init__(model_dir, max_batch_size=8, max_seq_len=512)
        self.chat_dir, self.rerank_dir, self.batching = chat_dir, rerank_dir, batching

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SERVED_MODEL_NAME", "RUST_LOG")}
        env.update(MODEL_NAME=str(self.chat_dir), EMBEDDING_MODEL=self.model_id, SERVE_EMBEDDINGS="true",
                   RERANK_MODEL=str(self.rerank_dir), SERVER_HOST="127.0.0.1", SERVER_PORT=str(self.port),
                   CONCURRENT_REQUESTS="1024", MAX_CONNECTIONS="1024", LOG_LEVEL="warning", HF_HUB_OFFLINE="1",
                   ALLOW_MODEL_PATHS="true", EMBED_CACHE_CAPACITY="0",  # measure the model, not the cache
                   BACKEND="native",  # the idle chat worker must not start (and compile on) an external engine
                   EMBED_CROSS_REQUEST_BATCHING="true" if self.batching else "false")
        return env

    def __enter__(self) -> EmbedServer:
        super().__enter__()  # returns once any worker is up; the embed worker may load later
        deadline = time.monotonic() + self.start_timeout_s
        while len(self.health().get("workers", [])) < 3:
            if time.monotonic() > deadline or self.proc is None or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"/health never listed 3 workers\n{self.tail()}")
            time.sleep(0.5)
        return self

    def health(self) -> dict[str, Any]:
        try:
            return dict(httpx.get(f"{self.base_url}/health", timeout=5).json())
        except (httpx.HTTPError, ValueError):
            return {}

    def mean_batch(self) -> float | None:
        """The embed worker's inputs per model call since it started (a heartbeat behind)."""
        time.sleep(HEARTBEAT_WAIT_S)
        embed = [w for w in self.health().get("workers", []) if w.get("kind") == "embed"]
        return embed[0].get("mean_decode_batch") if embed else None


async def drive(server: EmbedServer, texts: list[str], clients: int, rounds: int) -> tuple[float, list[float]]:
    """C clients, each on its own keep-alive connection sending R one-sentence requests back to back; wall time
    and per-request latencies. The requests are built before the clock starts and written on raw asyncio sockets
    (`bench/_http.py`): the 32-client httpx driver took 25-50% of a core here, out of the cores the server uses."""
    host, port = "127.0.0.1", server.port
    requests = [request_bytes(host, port, "/v1/embeddings", msgspec.json.encode(
        {"model": server.model_id, "input": text, "encoding_format": "base64"})) for text in texts]
    conns = [await RawConnection.open(host, port, "/v1/embeddings", b"", {}) for _ in range(clients)]
    latencies: list[float] = []

    async def client(c: int) -> None:
        for r in range(rounds):
            sent = time.perf_counter()
            reply = await conns[c].send(requests[c * rounds + r])
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {reply.body[:300]!r}")
            if not msgspec.json.decode(reply.body)["data"][0]["embedding"]:
                raise RuntimeError("empty embedding")
            latencies.append(time.perf_counter() - sent)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return time.perf_counter() - start, latencies
    finally:
        await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)


def run_server(server: EmbedServer, texts: list[str], warmup: list[str], clients: int,
               rounds: int) -> dict[str, Any]:
    """Warm up (one request per client, concurrently), then the timed run; the run's own batch size is
    recovered from the cumulative mean before and after, since /health gives only the mean."""
    aio.run(drive(server, warmup, clients, 1))
    mean_warm = server.mean_batch()
    cpu_before = server.cpu_seconds()
    wall, lat = aio.run(drive(server, texts, clients, rounds))
    cpu_after = server.cpu_seconds()
    mean_all = server.mean_batch()
    run_mean = None
    if mean_warm and mean_all:
        calls = round((len(warmup) + len(texts)) / mean_all) - round(len(warmup) / mean_warm)
        run_mean = len(texts) / calls if calls > 0 else None
    label = "server, batching " + ("on" if server.batching else "off (EMBED_CROSS_REQUEST_BATCHING=false)")
    return {"system": label, "sentences_per_s": len(texts) / wall, "p50_ms": 1000 * (percentile(lat, 50) or 0),
            "p99_ms": 1000 * (percentile(lat, 99) or 0), "requests": len(texts), "wall_s": wall,
            "mean_decode_batch_cumulative": mean_all, "mean_decode_batch_run": run_mean,
            "cpu_pct": {role: 100 * (cpu_after[role] - cpu_before[role]) / wall for role in cpu_before}}


def header(args: argparse.Namespace, model_dir: Path) -> list[str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [f"- date: {now}", f"- commit: {commit.stdout.strip() or '?'}{' (dirty tree)' if dirty else ''}",
            f"- machine: {cpu} x {os.cpu_count()} CPUs, no GPU",
            f"- model: all-MiniLM-L6-v2 exported to ONNX ({model_dir}), fastembed, CPU",
            f"- load: {args.clients} clients x {args.rounds} rounds, one sentence per request, base64; "
            f"in-process: the same first {args.clients} sentences as one batch, median of {args.repeats}"]


def report(args: argparse.Namespace, model_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    base, on, off = rows
    ratios = {"server_vs_in_process": on["sentences_per_s"] / base["sentences_per_s"],
              "batching_on_vs_off": on["sentences_per_s"] / off["sentences_per_s"]}
    lines = ["## Embeddings: 32 one-sentence clients vs in-process fastembed", "", *header(args, model_dir), "",
             "| system | sentences/s | p50 ms | p99 ms | mean inputs per model call | CPU % workers / api / redis / "
             "driver |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        mean = row.get("mean_decode_batch_run")
        lines.append(f"| {row['system']} | {row['sentences_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
                     f"| {'-' if mean is None else f'{mean:.2f}'} | "
                     f"{' / '.join(f'{v:.0f}' for v in row.get('cpu_pct', {}).values()) or '-'} |")
    verdict = {k: v >= t for (k, v), t in zip(ratios.items(), (0.8, 3.0), strict=True)}
    lines += ["", f"- server ÷ in-process: {ratios['server_vs_in_process']:.2f} (target ≥ 0.8: "
                  f"{'met' if verdict['server_vs_in_process'] else 'NOT met'})",
              f"- batching on ÷ off: {ratios['batching_on_vs_off']:.2f} (target ≥ 3: "
              f"{'met' if verdict['batching_on_vs_off'] else 'NOT met'})",
              f"- in-process, one sentence per call: {base['one_per_call_sentences_per_s']:.1f} sentences/s "
              f"(batching's ceiling here: {base['sentences_per_s'] / base['one_per_call_sentences_per_s']:.2f}x)",
              "- in-process latency columns are the whole batch call; mean inputs per model call is the embed "
              "worker's /health mean_decode_batch over the timed requests only (warm-up taken out)",
              "- CPU % = CPU time per process over the run's wall time (100 = one core); workers = the chat, embed "
              "and rerank workers together (only the embed worker is busy); driver = this script's 32 clients"]
    print("\n".join(lines))
    return {"header": header(args, model_dir), "rows": rows, "ratios": ratios, "targets_met": verdict}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="embed_bench-") as tmp:
        from devtools.chat_models import build_tiny_llama
        from devtools.embed_models import build_tiny_cross_encoder, export_minilm_onnx

        model_dir = args.model or export_minilm_onnx(Path(tmp) / "minilm-onnx")
        model_dir = Path(model_dir).resolve()
        chat_dir = build_tiny_llama(Path(tmp) / "chat")
        rerank_dir = build_tiny_cross_encoder(Path(tmp) / "rerank")
        texts = sentences(args.clients * args.rounds)
        warmup = sentences(args.clients, prefix="Warm-up. ")
        rows = [in_process(model_dir, texts[: args.clients], args.repeats)]
        print(f"{rows[0]['system']}: {rows[0]['sentences_per_s']:.1f} sentences/s", file=sys.stderr)
        for batching in (True, False):
            with EmbedServer(model_dir, Path(chat_dir), Path(rerank_dir), batching) as server:
                rows.append(run_server(server, texts, warmup, args.clients, args.rounds))
            print(f"{rows[-1]['system']}: {rows[-1]['sentences_per_s']:.1f} sentences/s", file=sys.stderr)
        result = report(args, model_dir, rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
