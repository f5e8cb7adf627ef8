"""The connection a request arrived on, for the one case the app must cut it: a client that stopped reading.

`api/server.py` puts the transport's `abort` into each request's ASGI scope; the guard copies it into `abort`
for the request's task. Under another server (tests' in-process clients) there is none, and a stream whose
client stopped reading ends with an error event instead.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

SCOPE_KEY = "axion.abort"

abort: ContextVar[Callable[[], None] | None] = ContextVar("axion_abort_connection", default=None)


def abort_from_scope(scope: Any) -> Callable[[], None] | None:
    extensions = scope.get("extensions") or {}
    return extensions.get(SCOPE_KEY)
