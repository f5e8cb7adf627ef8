"""Run several real chat workers (`serve_chat_worker`: built as `axion worker` builds them) in this one process:
`python -m tests.worker_host SPEC [SPEC ...]`, where each SPEC is a model folder, or a JSON object of settings
(environment variable names, e.g. {"MODEL_NAME": "/m", "QUANTIZATION": "int8", "SERVED_MODEL_NAME": "m-int8"})
laid over the environment's.

The family test serves a dozen models; as many `axion worker` processes would each pay torch's and transformers'
import (seconds each on two shared cores). Here they share one import and one event loop; each worker keeps its
own settings, Redis connection, stream, heartbeat and engine thread. Stop it with SIGKILL: each worker's SIGTERM
handler replaces the previous one's, so SIGTERM would stop only the last.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from axion.cli import setup_logging
from common.settings import Settings, load_settings
from workers.loading import serve_chat_worker


def settings_for(spec: str) -> Settings:
    overrides = json.loads(spec) if spec.startswith("{") else {"MODEL_NAME": spec}
    return load_settings({**os.environ, **overrides})


async def serve_all(specs: list[str]) -> None:
    await asyncio.gather(*(serve_chat_worker(settings_for(spec)) for spec in specs))


if __name__ == "__main__":
    setup_logging("info")
    asyncio.run(serve_all(sys.argv[1:]))
