"""A lean OpenAI-protocol streaming client: HTTP/1.1 keep-alive connections on raw asyncio streams, chunked
transfer decoding and SSE framing by hand, each `data:` line decoded with msgspec.

On the 2-core benchmark machine the client shares the cores with the server it measures, so every bit of its
CPU comes out of the server's figures. httpx (h11 underneath) costs several times more CPU per streamed chunk than
this; vLLM's benchmark uses aiohttp for the same reason. Nothing here is specific to Axion: any OpenAI-compatible
server that streams with `Transfer-Encoding: chunked` (or a Content-Length) is read the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import msgspec

from bench._http import read_head, request_bytes

_decode = msgspec.json.Decoder().decode


class SSEFailure(RuntimeError):
    """An answer this client cannot read as a streamed chat completion."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class SSEClient:
    """POSTs JSON and yields each SSE `data:` payload decoded; connections are kept alive and reused."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._idle: list[_Connection] = []

    async def __aenter__(self) -> SSEClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def _open(self, head: bytes) -> tuple[_Connection, int, dict[str, str]]:
        """Send the request and read the answer's head. A kept-alive connection the server closed while idle
        (its keep-alive timeout, possibly while this process was busy elsewhere) fails on the first read: the
        request is sent again on a new connection, as httpx and aiohttp do."""
        while self._idle:
            conn = self._idle.pop()
            if conn.reader.at_eof() or conn.writer.is_closing():
                conn.close()
                continue
            conn.writer.write(head)
            try:
                return conn, *await read_head(conn.reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise
                conn.close()
        conn = _Connection(*await asyncio.open_connection(self.host, self.port, limit=1 << 20))
        conn.writer.write(head)
        return conn, *await read_head(conn.reader)

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yields each event's JSON; raises SSEFailure on a non-200 answer (with its body)."""
        request = request_bytes(self.host, self.port, path, msgspec.json.encode(body),
                                {"Accept": "text/event-stream"})
        conn, status, headers = await self._open(request)
        reusable = False
        try:
            if status != 200:
                raise SSEFailure(f"HTTP {status}: {(await _read_body(conn.reader, headers))[:300]!r}")
            pending = b""
            async for piece in _body_pieces(conn.reader, headers):
                pending += piece
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        if line.startswith(b"data: {"):
                            yield _decode(line[6:])
            reusable = headers.get("connection", "").lower() != "close"
        finally:
            if reusable:
                self._idle.append(conn)
            else:
                conn.close()


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # the empty trailer section
                return
            yield (await reader.readexactly(size + 2))[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        raise SSEFailure("the answer has neither chunked encoding nor a Content-Length")


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    return b"".join([piece async for piece in _body_pieces(reader, headers)])
