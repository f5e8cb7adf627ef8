"""uvicorn's httptools protocol with what an exposed server needs before the app sees a request: a deadline for
the request line and headers (HEADER_TIMEOUT_S: 408, then closed; slowloris), OpenAI error envelopes for the
server's own refusals (malformed HTTP: 400; over the connection limit: 503), and the transport's `abort` in
the scope for the app (`api/connection.py`). Connections still sending headers count toward the limit."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.connection import SCOPE_KEY
from api.errors import APIError
from common.settings import Settings

REASONS = {400: b"Bad Request", 408: b"Request Timeout"}


def raw_response(error: APIError) -> bytes:
    """A whole HTTP/1.1 response carrying `error`'s envelope that closes the connection, written without the app."""
    body = error.to_json()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (error.status, REASONS[error.status], len(body))) + body


async def over_capacity(scope: Any, receive: Any, send: Any) -> None:
    body = APIError(503, "This server has too many open connections; retry shortly.",
                    code="too_many_connections").to_json()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GuardedProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {SCOPE_KEY: self.transport.abort}  # type: ignore[dict-item]
        if self._header_timer is None:  # the next request on a kept-alive connection
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        limit = self.limit_concurrency
        if limit is None or (len(self.connections) < limit and len(self.tasks) < limit):
            super().on_headers_complete()
            return
        app, self.app, self.limit_concurrency = self.app, over_capacity, None  # answered by `over_capacity`
        try:
            super().on_headers_complete()
        finally:
            self.app, self.limit_concurrency = app, limit

    def send_400_response(self, msg: str) -> None:
        self.transport.write(raw_response(APIError(400, f"Malformed HTTP request: {msg}", code="invalid_http")))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no response under way: one can still be sent
            self.transport.write(raw_response(APIError(
                408, f"The request line and headers did not arrive within {self.header_timeout_s:g}s.",
                code="request_timeout")))
            self.transport.close()
        else:
            self.transport.abort()


def protocol_for(settings: Settings) -> type[GuardedProtocol]:
    """The protocol class uvicorn should run, with this server's HEADER_TIMEOUT_S."""
    return type("GuardedProtocol", (GuardedProtocol,), {"header_timeout_s": settings.header_timeout_s})
