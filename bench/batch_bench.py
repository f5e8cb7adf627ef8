"""Does a running batch slow online traffic down? Online streaming TTFT with and without a 500-line batch.

    python bench/batch_bench.py --write-model tiny models/bench-tiny   # once (or use models/bench-medium)
    python bench/batch_bench.py models/bench-tiny --json out.json

One `axion serve` (embedded Redis, its rq batch worker, response cache off). Phase 1: one client sends
--requests streamed greedy chat requests back to back, a random pause of up to --pause-ms between them, and the
TTFT of each is taken (send -> first chunk with text). Phase 2: a --lines-line chat batch is submitted through
the official SDK; once it runs, the same online load is sent again. The target (issue 12): the TTFT p50 with
the batch stays within 1.5x of the p50 without it. The batch is then waited for and its throughput reported.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openai import OpenAI

from bench import _client
from bench._measure import PromptFactory, RequestTiming, percentile

TARGET = 1.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path)
    p.add_argument("--write-model", nargs=2, metavar=("SIZE", "DIR"), help="tiny or medium, then exit")
    p.add_argument("--requests", type=int, default=40, help="online requests per phase")
    p.add_argument("--pause-ms", type=float, default=100, help="longest random pause between online requests")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=16, help="tokens of each online request")
    p.add_argument("--lines", type=int, default=500, help="lines of the batch")
    p.add_argument("--batch-tokens", type=int, default=16, help="max_tokens of each batch line")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--json", type=Path, help="write the results here too")
    return p.parse_args(argv)


async def online_phase(server: _client.Server, prompts: PromptFactory, args: argparse.Namespace,
                       tag: str) -> list[RequestTiming]:
    rng = random.Random(7)
    timings = []
    async with _client.RawClient(server.base_url) as client:
        for i in range(args.requests):
            await asyncio.sleep(rng.uniform(0, args.pause_ms / 1000))
            messages = [{"role": "user", "content": prompts.user(f"{tag}-{i}")}]
            timings.append(await _client.stream_request(client, server.model_id, messages, args.output_tokens))
    return timings


def batch_file(prompts: PromptFactory, args: argparse.Namespace, model: str) -> bytes:
    out = io.BytesIO()
    for i in range(args.lines):
        body = {"model": model, "messages": [{"role": "user", "content": prompts.user(f"batch-{i}")}],
                "temperature": 0, "max_tokens": args.batch_tokens, "ignore_eos": True}
        out.write(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
                              "body": body}).encode() + b"\n")
    return out.getvalue()


def stats(timings: list[RequestTiming]) -> dict[str, float | None]:
    ttfts = [t.ttft * 1000 for t in timings if t.ttft is not None]
    itls = [t.itl * 1000 for t in timings if t.itl is not None]
    return {"ttft_p50_ms": percentile(ttfts, 50), "ttft_p90_ms": percentile(ttfts, 90),
            "itl_p50_ms": percentile(itls, 50)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    prompts = PromptFactory(AutoTokenizer.from_pretrained(args.model), args.prompt_tokens)
    os.environ["SERVE_EMBEDDINGS"] = "false"  # chat only: no embedding and rerank workers taking the cores
    with _client.Server(args.model, args.max_batch_size, 2048) as server:
        sdk = OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
        asyncio.run(online_phase(server, prompts, argparse.Namespace(**{**vars(args), "requests": 3}), "warm"))
        alone = asyncio.run(online_phase(server, prompts, args, "alone"))
        upload = sdk.files.create(file=("bench.jsonl", batch_file(prompts, args, server.model_id)), purpose="batch")
        submitted = time.monotonic()
        batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        while (b := sdk.batches.retrieve(batch.id)).request_counts.completed < 10:  # type: ignore[union-attr]
            time.sleep(0.1)
        done_before = b.request_counts.completed  # type: ignore[union-attr]
        beside = asyncio.run(online_phase(server, prompts, args, "beside"))
        done_after = sdk.batches.retrieve(batch.id).request_counts.completed  # type: ignore[union-attr]
        while (b := sdk.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.2)
        batch_s = time.monotonic() - submitted
    result = {"alone": stats(alone), "with_batch": stats(beside), "batch_status": b.status,
              "batch_completed": b.request_counts.completed, "batch_failed": b.request_counts.failed,  # type: ignore[union-attr]
              "batch_lines_during_online_phase": done_after - done_before,
              "batch_seconds": round(batch_s, 1), "batch_lines_per_s": round(args.lines / batch_s, 1)}
    result["ttft_p50_ratio"] = round(result["with_batch"]["ttft_p50_ms"] / result["alone"]["ttft_p50_ms"], 2)
    result["within_target"] = result["ttft_p50_ratio"] <= TARGET
    return result


def header(args: argparse.Namespace) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": str(args.model),
            "settings": {k: v for k, v in vars(args).items() if k not in ("model", "json", "write_model")}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_model:
        from bench.serve_bench import write_model

        write_model(*args.write_model)
        return 0
    if args.model is None:
        print("give a model folder (build one with --write-model tiny DIR)", file=sys.stderr)
        return 2
    result = {"header": header(args), **run(args)}
    a, w = result["alone"], result["with_batch"]
    print(json.dumps(result, indent=2))
    print(f"| {result['header']['date']} | {result['header']['commit']} | {args.model.name} | "
          f"{a['ttft_p50_ms']:.1f} | {w['ttft_p50_ms']:.1f} | {result['ttft_p50_ratio']:.2f} | "
          f"{a['ttft_p90_ms']:.1f} | {w['ttft_p90_ms']:.1f} | {a['itl_p50_ms']:.1f} | {w['itl_p50_ms']:.1f} | "
          f"{result['batch_lines_during_online_phase']} | {result['batch_lines_per_s']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
