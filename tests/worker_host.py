"""Run one real chat worker (`serve_worker`, exactly as `axion worker` runs it) per model folder given, all in this
one process: `python -m tests.worker_host DIR [DIR ...]`, other settings from the environment.

The family test serves ten models; ten `axion worker` processes would each pay torch's and transformers' import
(seconds each on two shared cores). Here they share one import and one event loop; each worker keeps its own
Redis connection, stream, heartbeat and engine thread. Stop it with SIGKILL: each worker's SIGTERM handler
replaces the previous one's, so SIGTERM would stop only the last.
"""

from __future__ import annotations

import asyncio
import sys

import msgspec

from common.cli import setup_logging
from common.settings import load_or_exit
from workers.chat.worker import serve_worker


async def serve_all(folders: list[str]) -> None:
    settings = load_or_exit()
    await asyncio.gather(*(serve_worker(msgspec.structs.replace(settings, model_name=folder))
                           for folder in folders))


if __name__ == "__main__":
    setup_logging("info")
    asyncio.run(serve_all(sys.argv[1:]))
