"""Clients that follow a transfer while it happens: a streaming GET that reports each chunk
as it arrives, a raw client that hangs up mid-body, and a scope that cancels whatever
client tasks a test leaves running. Loopback only; nothing here measures time.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from gateway.config import CachePolicy

from .net import ensure_loopback

_THRESHOLD = CachePolicy().parallel_fetch_threshold or 0
# The Range of a cold blob's first GET from the gateway (with the default parallel ranged
# fetch): its first part, which is the whole blob for one no larger than that.
FIRST_RANGE = f"bytes=0-{_THRESHOLD - 1}"


class FirstBytes:
    """When each named client got its first bytes, as what `sent()` said then (the
    upstream's bytes so far): `stream_get(..., on_chunk=first.hook("follower"))`."""

    def __init__(self, sent: Callable[[], int]) -> None:
        self.sent = sent
        self.at: dict[str, int] = {}

    def hook(self, name: str) -> Callable[[int, int], None]:
        def note(before: int, length: int) -> None:
            if before == 0:
                self.at[name] = self.sent()
        return note


@dataclass
class Transfer:
    """What one client got from one GET."""

    status: int
    headers: CIMultiDictProxy[str]
    received: int
    digest: str  # sha256 of the bytes received
    body: bytes | None = field(repr=False)  # kept only when asked for
    error: BaseException | None = None  # the read failed (connection cut, short body)

    @property
    def cache(self) -> str:
        return self.headers.get("X-Cache", "<missing>")

    @property
    def clean(self) -> bool:
        """A successful, complete transfer as a client would judge it."""
        return self.status in (200, 206) and self.error is None


async def stream_get(session: aiohttp.ClientSession, url: str, *,
                     headers: dict[str, str] | None = None, keep: bool = False,
                     on_chunk: Callable[[int, int], Any] | None = None,
                     chunk_size: int = 256 * 1024) -> Transfer:
    """GET `url` and read the body as it arrives; `on_chunk(received_before, len)` is
    called for each chunk (awaited if it returns an awaitable). A failed read is
    recorded in `error`, not raised."""
    hasher = hashlib.sha256()
    kept = bytearray()
    received = 0
    async with session.get(url, headers=headers or {}, allow_redirects=False) as response:
        error: BaseException | None = None
        try:
            async for chunk in response.content.iter_chunked(chunk_size):
                if on_chunk is not None:
                    result = on_chunk(received, len(chunk))
                    if asyncio.iscoroutine(result):
                        await result
                hasher.update(chunk)
                if keep:
                    kept += chunk
                received += len(chunk)
        except (aiohttp.ClientError, ConnectionError) as exc:
            error = exc
        if error is None and response.content_length is not None and \
                received != response.content_length:
            error = EOFError(f"short body: {received} of {response.content_length}")
        return Transfer(response.status, response.headers, received,
                        "sha256:" + hasher.hexdigest(), bytes(kept) if keep else None, error)


@dataclass
class HungUp:
    status: int
    headers: dict[str, str]
    received: int


async def read_then_hang_up(host: str, port: int, target: str, stop_after: int,
                            *, before_hang_up: Callable[[], Any] | None = None) -> HungUp:
    """GET `target`, read at least `stop_after` body bytes, call `before_hang_up` (awaited
    if it returns an awaitable), then reset the connection."""
    ensure_loopback(host)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Accept-Encoding: identity\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        received = 0
        while received < stop_after:
            chunk = await reader.read(256 * 1024)
            if not chunk:
                break
            received += len(chunk)
        if before_hang_up is not None:
            result = before_hang_up()
            if asyncio.iscoroutine(result):
                await result
        return HungUp(status, headers, received)
    finally:
        writer.transport.abort()  # RST, not a polite close: the client is gone


Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


@asynccontextmanager
async def client_tasks() -> AsyncIterator[Spawn]:
    """Start client coroutines as tasks; whatever is left is cancelled on the way out, so
    a failing assertion does not leave transfers running into the next test."""
    tasks: list[asyncio.Task[Any]] = []

    def spawn(coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        tasks.append(task)
        return task

    try:
        yield spawn
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
