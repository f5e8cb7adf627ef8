"""What one request costs the server besides its tokens: one-token streamed requests, back to back from C clients.

    python bench/request_bench.py --write-model tiny /tmp/tiny   # (serve_bench.py writes the same models)
    python bench/request_bench.py /tmp/tiny --requests 1200 --concurrency 16 --repeats 3

Each request asks for one token, so the model's work is a short prefill and what is left is the fleet's own per
request: the API's admission, subscription, enqueue and SSE frames; Redis; the worker's read, admission and
publish. Prints requests/s, time to first token and the CPU milliseconds each process role spent per request. On a
GPU the API's share bounds how fast a burst of arrivals gets to the engine (time to first token at high
concurrency); on the CPU it is the idle gap at every round boundary of serve_bench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench`, `common` and `workers` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _client
from bench._measure import PromptFactory, percentile
from common import aio


async def one_run(server: _client.Server, prompts: PromptFactory, requests: int, concurrency: int,
                  run: int) -> dict[str, float]:
    client = server.client("raw")
    chats = [prompts.messages(f"run{run}-request{i}") for i in range(requests + 1)]
    await _client.stream_request(client, server.model_id, chats[-1], 1)  # warm-up
    queue, ttfts = list(range(requests)), []

    async def one_client() -> None:
        while queue:
            timing = await _client.stream_request(client, server.model_id, chats[queue.pop()], 1)
            if timing.first is not None:
                ttfts.append(1000 * (timing.first - timing.sent))

    cpu_before, start = server.cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    wall, cpu_after = time.perf_counter() - start, server.cpu_seconds()
    row = {"requests_per_s": requests / wall, "ttft_p50_ms": percentile(ttfts, 50) or 0.0,
           "ttft_p99_ms": percentile(ttfts, 99) or 0.0}
    row |= {f"{role}_cpu_ms": 1000 * (cpu_after[role] - cpu_before[role]) / requests for role in cpu_before}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, nargs="?", help="model folder")
    p.add_argument("--write-model", nargs=2, metavar=("SIZE", "DIR"), help="as serve_bench.py; then exit")
    p.add_argument("--requests", type=int, default=1200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.write_model:
        from bench.serve_bench import write_model

        write_model(*args.write_model)
        return 0
    if args.model is None:
        p.error("a model folder is required")
    from transformers import AutoTokenizer

    prompts = PromptFactory(AutoTokenizer.from_pretrained(args.model), args.prompt_tokens)
    print(f"{args.requests} one-token streamed requests from {args.concurrency} clients, prompts of "
          f"~{args.prompt_tokens} tokens; CPU ms per request by process\n")
    print("| run | requests/s | TTFT p50 ms | TTFT p99 ms | API | worker | Redis | client |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    with _client.Server(args.model, max_batch_size=64, max_seq_len=4096) as server:
        for run in range(args.repeats):
            r = aio.run(one_run(server, prompts, args.requests, args.concurrency, run))
            print(f"| {run + 1} | {r['requests_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
                  f"{r['api_cpu_ms']:.2f} | {r['worker_cpu_ms']:.2f} | {r['redis_cpu_ms']:.2f} | "
                  f"{r['driver_cpu_ms']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
