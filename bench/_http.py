"""Closed-loop HTTP/1.1 load for short requests: C keep-alive connections, each sending the next request as soon as
the last answer is read.

A cache hit costs the server well under a millisecond, so the client's own cost per request matters on a 2-core
machine where the client shares the cores with the server it measures. The default client writes a prebuilt
request on a raw asyncio connection and reads the answer by Content-Length (~0.07 ms of CPU a request on the
2-core bench machine); `httpx` is there to cross-check it, but at C=32 it took ~3 ms of CPU a request there, so
with it the client, not the server, is measured. Both systems of a run use the same client.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal

import httpx


class HTTPFailure(RuntimeError):
    """A response that was not the expected one: the run is void."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class RawConnection:
    """One keep-alive connection that sends one prebuilt request again and again."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self.reader, self.writer, self.request = reader, writer, request

    @classmethod
    async def open(cls, host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> RawConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, request_bytes(host, port, path, body, headers))

    async def send(self, request: bytes | None = None) -> Reply:
        """Send the prebuilt request (or `request`, built by `request_bytes`) and read the answer."""
        self.writer.write(request or self.request)
        status, headers = await read_head(self.reader)
        if "content-length" not in headers:
            raise HTTPFailure(f"no Content-Length in the answer (HTTP {status}); this client reads only that")
        return Reply(status, headers, await self.reader.readexactly(int(headers["content-length"])))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """An HTTP/1.1 answer's status and headers (names lower-cased)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers


def request_bytes(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class HttpxConnection:
    """The same interface over one shared httpx.AsyncClient (its pool keeps the connections alive)."""

    def __init__(self, client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str]) -> None:
        self.client, self.path, self.body = client, path, body
        self.headers = {"Content-Type": "application/json", **headers}

    async def send(self) -> Reply:
        resp = await self.client.post(self.path, content=self.body, headers=self.headers)
        return Reply(resp.status_code, dict(resp.headers), resp.content)

    async def close(self) -> None:
        pass


@dataclass
class Load:
    """What one closed-loop run measured."""

    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s if self.wall_s else 0.0


async def closed_loop(host: str, port: int, path: str, body: bytes, concurrency: int, requests: int,
                      expect_header: tuple[str, str] | None, client: Literal["raw", "httpx"] = "raw",
                      headers: dict[str, str] | None = None) -> Load:
    """`requests` POSTs of `body` from `concurrency` connections. Every answer must be a 200 and, when
    `expect_header` is (name, value), carry that header: one that does not stops the run with HTTPFailure."""
    headers = headers or {}
    pool: httpx.AsyncClient | None = None
    if client == "raw":
        conns: list[RawConnection | HttpxConnection] = list(await asyncio.gather(
            *(RawConnection.open(host, port, path, body, headers) for _ in range(concurrency))))
    else:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        pool = httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=60, limits=limits)
        conns = [HttpxConnection(pool, path, body, headers) for _ in range(concurrency)]
    load, left = Load(), requests

    async def run(conn: RawConnection | HttpxConnection) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            sent = time.perf_counter()
            reply = await conn.send()
            load.latencies_s.append(time.perf_counter() - sent)
            if reply.status != 200:
                raise HTTPFailure(f"HTTP {reply.status} from {path}: {reply.body[:300]!r}")
            if expect_header is not None and reply.headers.get(expect_header[0]) != expect_header[1]:
                raise HTTPFailure(f"{path} answered {expect_header[0]}: {reply.headers.get(expect_header[0])!r}, "
                                  f"not {expect_header[1]!r}: the timed requests must all be cache hits")

    try:
        start = time.perf_counter()
        await asyncio.gather(*(run(c) for c in conns))
        load.wall_s = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        if pool is not None:
            await pool.aclose()
    return load
