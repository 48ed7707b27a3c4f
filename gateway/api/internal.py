"""`/_gateway/internal/flight/<digest>?ns=<namespace>&fence=<token>`: the bytes of a blob
this replica fetches, for a follower on another replica (`redis:`): from the follower's
Range offset, growing with the spool, the last byte only once verified; then, once
committed, from the store.

Answers only requests a replica signed (the access stage checks the HMAC) and only for
the lease named by its fencing token; a blob neither in flight here nor stored is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from aiohttp import web

from ..cache import FetchAborted
from ..cache.store import blob_key
from ..errors import RegistryError
from ..reference import parse_digest
from . import SERVICES


class Leases(Protocol):
    held: dict[str, int]  # key -> fencing token of the leases this process holds


def _offset(request: web.Request) -> int:
    header = request.headers.get("Range", "")
    if not header:
        return 0
    first = header.removeprefix("bytes=").partition("-")[0]
    if not first.isdigit():
        raise RegistryError("RANGE_INVALID", "want bytes=N-", 416)
    return int(first)


async def flight(request: web.Request) -> web.StreamResponse:
    cache = request.app[SERVICES].cache
    try:
        digest = parse_digest(request.match_info["digest"])
    except ValueError:
        raise RegistryError("DIGEST_INVALID", "not a digest", 400) from None
    namespace = request.query.get("ns", "")
    fence = request.query.get("fence", "")
    start = _offset(request)
    leases: Leases = cache.coordinator  # type: ignore[assignment]
    key = f"blob {namespace} {digest}"
    running = cache.blobs.flights.get((namespace, str(digest)))
    if running is not None and str(leases.held.get(key, "")) == fence:
        with running.attached():
            await running.wait_headers()  # the upstream's error is the follower's too
            chunks = running.stream(start)
            try:  # opens the spool: gone if the blob was committed (S3) just now
                first = await anext(chunks, b"")
            except FetchAborted:
                await chunks.aclose()
            else:
                return await _send(request, start, running.size, _after(first, chunks))
    stored = await cache.store.stat(blob_key(namespace, digest))
    if stored is None:
        raise RegistryError("BLOB_UNKNOWN", "not in flight here, not stored", 404)
    return await _send(request, start, stored,
                       cache.store.read(blob_key(namespace, digest), start, stored))


async def _after(first: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """`first`, then the rest of the stream it came from."""
    try:
        if first:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


async def _send(request: web.Request, start: int, size: int | None,
                chunks: AsyncIterator[bytes]) -> web.StreamResponse:
    if size is not None and start >= max(size, 1):
        raise RegistryError("RANGE_INVALID", "past the end", 416)
    if start and size is None:
        raise RegistryError("RANGE_INVALID", "size not known yet", 416)
    resp = web.StreamResponse(status=206 if start else 200)
    resp.content_type = "application/octet-stream"
    if size is not None:
        resp.content_length = size - start
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
    await resp.prepare(request)
    try:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                await resp.write(chunk)
    except Exception:
        # The transfer failed here: the follower must see a broken body, never an end.
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError() from None
    await resp.write_eof()
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_get("/_gateway/internal/flight/{digest}", flight, allow_head=False)
