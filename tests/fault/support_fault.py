"""Helpers of the fault tests: a scriptable fake upstream that breaks blob transfers on
purpose, a streaming reader that reports each chunk as it arrives, a raw client that
hangs up mid-body, and checks on what a gateway's data directory holds.

Everything listens on and connects to loopback only. Nothing here measures time: the
tests judge "before" by byte counts seen at the upstream side.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from support.images import sha256_digest
from support.net import ensure_loopback
from support.threaded import ThreadedServer

FAKE_ROUTE = "fake.registry.test"
OCTET = "application/octet-stream"
_RANGE = re.compile(r"bytes=(\d+)-$")
_WRITE = 256 * 1024


# -- a fake upstream that misbehaves on cue ------------------------------------------------


@dataclass
class BlobPlan:
    """How the fake serves one blob (named by the digest of `data`)."""

    data: bytes = field(repr=False)
    served: bytes | None = field(default=None, repr=False)  # sent instead of `data`
    cuts: tuple[int, ...] = ()  # the k-th GET breaks the connection at this absolute offset
    honour_range: bool = True  # False: answer a Range request with 200 and everything
    chunked: bool = False  # send no Content-Length
    gate_at: int | None = None  # stop after this offset until `FakeUpstream.release()`

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def body(self) -> bytes:
        return self.data if self.served is None else self.served


@dataclass
class FakeRequest:
    method: str
    path: str
    range: str | None


@dataclass
class FakeUpstream:
    """A registry that serves only blobs, each by its `BlobPlan`; records every request."""

    plans: dict[str, BlobPlan] = field(default_factory=dict)
    requests: list[FakeRequest] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    reached_gate: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, plan: BlobPlan) -> BlobPlan:
        self.plans[plan.digest] = plan
        return plan

    def release(self) -> None:
        """Let gated transfers go on."""
        self.gate.set()

    def blob_gets(self, digest: str) -> list[FakeRequest]:
        with self._lock:
            return [r for r in self.requests
                    if r.method == "GET" and r.path.endswith(f"/blobs/{digest}")]

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        return app

    async def _base(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _unknown(self, request: web.Request) -> web.Response:
        with self._lock:
            self.requests.append(FakeRequest(request.method, request.path, None))
        return web.json_response({"errors": [{"code": "NOT_FOUND", "message": "fake"}]},
                                 status=404)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        with self._lock:
            earlier = sum(1 for r in self.requests
                          if r.method == "GET" and r.path.endswith(f"/blobs/{digest}"))
            self.requests.append(FakeRequest(request.method, request.path,
                                             request.headers.get("Range")))
        plan = self.plans.get(digest)
        if plan is None:
            return web.json_response(
                {"errors": [{"code": "BLOB_UNKNOWN", "message": "fake: no such blob"}]},
                status=404)
        body = plan.body
        size = len(body)
        start, status = 0, 200
        match = _RANGE.fullmatch(request.headers.get("Range", ""))
        if match is not None and plan.honour_range:
            start, status = int(match.group(1)), 206
        response = web.StreamResponse(status=status, headers={
            "Content-Type": OCTET, "Docker-Content-Digest": plan.digest,
            "Accept-Ranges": "bytes"})
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        if plan.chunked and request.method == "GET":
            response.enable_chunked_encoding()
        else:
            response.content_length = size - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        end = plan.cuts[earlier] if earlier < len(plan.cuts) else size
        position = start
        while position < end:
            stop = min(position + _WRITE, end)
            if plan.gate_at is not None and position < plan.gate_at <= stop:
                stop = plan.gate_at
            await response.write(body[position:stop])
            position = stop
            if position == plan.gate_at and not self.gate.is_set():
                self.reached_gate.set()
                # release() is also called at teardown, so this thread always returns.
                await asyncio.to_thread(self.gate.wait)
        if end < size:
            # Break the connection mid-body: what was written is flushed, then FIN.
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # nothing more may be written on this connection
        await response.write_eof()
        return response


@dataclass
class RunningFake:
    fake: FakeUpstream
    server: ThreadedServer

    @property
    def url(self) -> str:
        return self.server.url


def run_fake(fake: FakeUpstream) -> Iterator[RunningFake]:
    """Serve `fake` from a thread until the generator is closed (use in a yield fixture)."""
    server = ThreadedServer(fake.build_app)
    server.start()
    try:
        yield RunningFake(fake, server)
    finally:
        fake.release()  # a handler parked at a gate must not hold the shutdown
        server.stop()


def fake_routes(url: str, **extra: Any) -> dict[str, Any]:
    """routes.yaml for a gateway whose default route is the fake upstream."""
    return {"default_route": FAKE_ROUTE, "routes": {FAKE_ROUTE: {"upstream": url, **extra}}}


def corrupt(data: bytes, at: int) -> bytes:
    """`data` with one byte flipped at offset `at`: same length, another digest."""
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


# -- clients --------------------------------------------------------------------------------


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


# -- the data directory ---------------------------------------------------------------------


def files_at_least(root: Path, size: int) -> list[tuple[Path, int]]:
    """Regular files under `root` of `size` bytes or more (spool files included)."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            try:
                length = path.stat().st_size
            except FileNotFoundError:
                continue
            if length >= size:
                found.append((path, length))
    return found


def files_holding(root: Path, digest: str) -> list[Path]:
    """Files under `root` whose whole content has `digest` (sha256)."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            try:
                if sha256_digest(path.read_bytes()) == digest:
                    found.append(path)
            except FileNotFoundError:
                continue
    return found


def blob_path(data_dir: Path, route: str, digest: str) -> Path:
    """Where the contract says a cached blob lives: DIR/<ns>/blobs/sha256/<2 hex>/<hex>."""
    namespace = re.sub(r"[^a-z0-9.-]", "_", route)
    algorithm, _, hex_digest = digest.partition(":")
    return data_dir / namespace / "blobs" / algorithm / hex_digest[:2] / hex_digest


async def poll(predicate: Callable[[], bool], *, what: str, attempts: int = 600,
               interval: float = 0.05) -> None:
    """Wait for a state (not a time): fail with `what` if it never comes."""
    for _ in range(attempts):
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"never happened: {what}")
