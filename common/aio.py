"""One way to run a process's event loop: uvloop where it is installed, else asyncio's own.

uvloop (libuv) and, for redis-py, hiredis cut the CPU each Redis round trip and pub/sub message costs. That CPU
comes out of the same cores as the model's forward passes: measured on the serving benchmark (2 vCPUs, 16
streams), server ÷ engine-alone throughput went from 0.76 to 0.86 with uvloop, httptools and hiredis installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # Windows has no uvloop
        return asyncio.run(main)
    return uvloop.run(main)
