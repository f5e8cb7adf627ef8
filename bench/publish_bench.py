"""What a decoding step's publishing costs the chat worker: per-command pipeline against one Lua EVAL.

    python bench/publish_bench.py [--rows 16,64] [--steps 300] [--redis-server redis-server]

Starts its own redis-server on a free port, then for each batch size queues one step's progress appends and
events (a Delta per row, as the worker does) and executes the pipeline, `--steps` times, alternating the two
ways in pairs: the per-command pipeline (what a Redis Cluster still gets) and the one-script EVAL
(workers/chat/step_publish.py). Prints the wall time per step (client packing + round trip + Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis

from common.protocol import Delta
from workers.chat.step_publish import queue_commands, queue_script


@dataclass
class _Seq:
    request_id: str
    index: int = 0
    output_ids: list[int] = field(default_factory=list)
    recorded: int = 0


async def _time(url: str, rows: int, steps: int, queue: object) -> float:
    client = aioredis.Redis.from_url(url)
    seqs = [_Seq(f"bench-{rows}-{i}") for i in range(rows)]
    start = time.perf_counter()
    for step in range(steps):
        events = []
        for seq in seqs:
            seq.output_ids.append(step)
            events.append((seq, Delta(seq=step, text=" word", completion_tokens=step + 1, index=0)))
        pipe = client.pipeline(transaction=False)
        queue(pipe, events, 300)  # type: ignore[operator]
        await pipe.execute()
    wall = (time.perf_counter() - start) / steps
    await client.flushdb()
    await client.aclose()
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="16,64")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([args.redis_server, "--port", str(port), "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
        print("| rows | per-command pipeline ms/step | one EVAL ms/step | ratio |\n|--:|--:|--:|--:|")
        for rows in (int(r) for r in args.rows.split(",")):
            pairs = [(asyncio.run(_time(url, rows, args.steps, queue_commands)),
                      asyncio.run(_time(url, rows, args.steps, queue_script))) for _ in range(args.pairs)]
            for commands, script in pairs:
                print(f"| {rows} | {commands * 1000:.3f} | {script * 1000:.3f} | {commands / script:.2f}x |")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
