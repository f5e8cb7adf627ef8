"""The one thread of a worker process that loads and runs its models.

torch's OpenMP keeps a thread team per calling thread, and a model loaded or prefilled on one thread decodes
markedly slower on another while both teams live (bench/RESULTS.md). So everything that touches
a model (loading, warm-up, every engine step, embedding calls) goes through `run`, on this one thread, for the
life of the process, hot swaps included; the event loop stays free for Redis while a step runs.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="axion-model")


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on the model thread, awaited from the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_thread, functools.partial(fn, *args, **kwargs))
