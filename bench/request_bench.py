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
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench`, `common` and `workers` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _client
from bench._measure import LevelStats, PromptFactory
from common import aio


def one_run(server: _client.Server, prompts: PromptFactory, requests: int, concurrency: int,
            run: int) -> dict[str, float]:
    """`requests` (rounded down to a multiple of `concurrency`) through serve_bench's client loop."""
    async def drive() -> LevelStats:
        async with server.client("raw") as client:
            return await _client.run_level(server, client, prompts, concurrency, max(1, requests // concurrency),
                                           out=1, prefix=f"run{run}-")

    stats = aio.run(drive())
    row = {"requests_per_s": stats.requests / stats.wall_s, "ttft_p50_ms": stats.ttft_p50_ms or 0.0,
           "ttft_p99_ms": stats.ttft_p99_ms or 0.0}
    cpu_pct = stats.extra["cpu_pct"]  # of the wall time: x wall / requests = per request
    row |= {f"{role}_cpu_ms": 10 * pct * stats.wall_s / stats.requests for role, pct in cpu_pct.items()}
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
            r = one_run(server, prompts, args.requests, args.concurrency, run)
            print(f"| {run + 1} | {r['requests_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
                  f"{r['api_cpu_ms']:.2f} | {r['worker_cpu_ms']:.2f} | {r['redis_cpu_ms']:.2f} | "
                  f"{r['driver_cpu_ms']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
