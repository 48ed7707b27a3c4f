"""Blob GET and HEAD: send a committed blob (a small one from memory, sendfile on plain
HTTP, 128 KiB reads under TLS, or the store's stream), follow its in-flight fetch, or (disk
full) relay it from the upstream; one byte range at most.

Never lets a client see a clean end of a body that failed verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import IO, cast

from aiohttp import web
from multidict import CIMultiDict

from ..cache import (
    BlobFlight,
    Cache,
    CachedBlob,
    FetchAborted,
    MemoryBlob,
    NoSpace,
    OpenBlob,
    Relay,
)
from ..cache.blobs import StoredMeanwhile
from ..cache.store import Redirecting, blob_key
from ..cache.transfer import read_span_cached
from ..errors import RegistryError
from ..oci import OCTET_STREAM
from ..state import STATE, Pace, RegistryRequest
from ..upstream import Upstream

Span = tuple[int, int]  # [start, end)
# A paced client gets its bytes in pieces this big: the rate holds to within one piece.
PACED_PIECE = 64 << 10
# A paced client on plain HTTP still gets sendfile, in pieces of `state.pace_piece` (one
# system call and one bucket check each; the rate holds to within one piece).
# Under TLS every byte passes through Python: read, encrypted into the SSL transport's
# buffer, copied into the socket transport's. With Python's default mark (512 KiB on the
# SSL side) and 1 MiB reads in a thread a connection held ~4 MiB (200 MB at C=32). Reads
# this size, from the page cache on the loop (a thread hop per 128 KiB would cost more
# than the copy), with this mark on the SSL transport, hold well under 1 MiB.
TLS_READ = 128 << 10
TLS_HIGH_WATER = 64 << 10


def headers(reg: RegistryRequest, cache: str, **extra: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(extra)
    out["X-Cache"] = cache
    out["X-Registry-Route"] = reg.route.name
    return out


def blob_fields(reg: RegistryRequest, cache: str) -> dict[str, str]:
    return {"Content-Type": OCTET_STREAM, "Accept-Ranges": "bytes",
            "Docker-Content-Digest": str(reg.digest), "X-Cache": cache,
            "X-Registry-Route": reg.route.name}


def _blob_headers(reg: RegistryRequest, cache: str) -> CIMultiDict[str]:
    return CIMultiDict(blob_fields(reg, cache))


def byte_range(request: web.Request, size: int | None) -> Span | None:
    """The one byte range asked for (RFC 9110 14.2), as [start, end); None for the whole blob.

    A header aiohttp cannot parse (several ranges, a last byte before the first, odd
    syntax) is ignored, as the RFC allows: the client gets the whole blob. So is Range
    with If-Range: we keep no validator to compare it with.
    """
    header = request.headers.get("Range")
    if header is None or size is None or "If-Range" in request.headers:
        return None
    try:
        wanted = request.http_range
    except ValueError:
        return None
    start, stop = wanted.start, wanted.stop
    if start is None or start < 0 or header.partition("=")[2].startswith("-"):
        # A suffix: the last N bytes. aiohttp gives -N, and "-0" (no bytes) as 0.
        suffix = -start if start else 0
        start, end = max(size - suffix, 0) if suffix else size, size
    else:
        end = min(stop, size) if stop is not None else size
    if start >= end:
        raise RegistryError("RANGE_INVALID", f"range {header[:100]!r} is outside the blob's "
                            f"{size} bytes", 416, headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _plain(request: web.Request) -> bool:
    """A plain-TCP client connection: the kernel can send files to it (no TLS)."""
    transport = request.transport
    return transport is not None and transport.get_extra_info("sslcontext") is None


def _bound_tls_buffer(request: web.Request) -> None:
    """Pause this TLS connection's writer (aiohttp's drain waits) once TLS_HIGH_WATER
    bytes wait to be encrypted or sent, not Python's 512 KiB."""
    transport = request.transport
    if transport is not None and transport.get_write_buffer_limits()[0] > TLS_HIGH_WATER:
        transport.set_write_buffer_limits(high=TLS_HIGH_WATER)


async def _write(resp: web.StreamResponse, data: bytes | bytearray, pace: Pace | None) -> None:
    """Write `data`; for a client with a byte rate, piece by piece as the rate allows."""
    if pace is None:
        await resp.write(data)
        return
    view = memoryview(data)
    for at in range(0, len(view), PACED_PIECE):
        piece = view[at:at + PACED_PIECE]
        await pace(len(piece))
        await resp.write(piece)


async def _sendfile(request: web.Request, file: IO[bytes], offset: int, count: int) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():  # loop.sendfile would raise RuntimeError
        raise ConnectionResetError("the client went away")
    await asyncio.get_running_loop().sendfile(transport, file, offset, count)


async def _start(request: web.Request, reg: RegistryRequest, status: str, size: int | None,
                 span: Span | None) -> web.StreamResponse:
    resp = web.StreamResponse(status=206 if span else 200, headers=_blob_headers(reg, status))
    if span is not None:
        resp.headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{size}"
        resp.content_length = span[1] - span[0]
    elif size is not None:
        resp.content_length = size
    await resp.prepare(request)
    state = request[STATE]
    state.body_bytes, state.cache = 0, status
    return resp


async def _send_file(request: web.Request, reg: RegistryRequest, file: IO[bytes],
                     size: int) -> web.StreamResponse:
    """A committed local blob: sendfile on plain HTTP (in paced pieces for a client with a
    byte rate), TLS_READ reads under TLS (Python's loop.sendfile falls back to 256 KiB
    writes there, one at a time: 30-44 MB/s on a 1 GiB blob)."""
    state = request[STATE]
    pace, piece = state.pace, state.pace_piece
    with file:
        span = byte_range(request, size)
        start, end = span if span is not None else (0, size)
        resp = await _start(request, reg, "HIT", size, span)
        if end > start:
            if _plain(request) and pace is None:
                await _sendfile(request, file, start, end - start)
            elif _plain(request):  # paced: still sendfile, a piece at a time
                assert pace is not None
                for at in range(start, end, piece):
                    count = min(piece, end - at)
                    await pace(count)
                    await _sendfile(request, file, at, count)
            else:
                _bound_tls_buffer(request)
                async with contextlib.aclosing(read_span_cached(
                        file.fileno(), start, end - start, TLS_READ)) as r:
                    async for chunk in r:
                        await _write(resp, chunk, pace)
        state.body_bytes = end - start
        await resp.write_eof()
        return resp


def _send_memory(request: web.Request, reg: RegistryRequest, found: MemoryBlob) -> web.Response:
    """A small committed blob kept in memory: one answer, as a cached manifest's is (the
    observe stage sends it, and counts its length as the body's bytes)."""
    data = found.data
    span = byte_range(request, len(data))
    out = _blob_headers(reg, "HIT")
    if span is None:
        return web.Response(body=data, headers=out)
    out["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{len(data)}"
    return web.Response(status=206, body=data[span[0]:span[1]], headers=out)


def store_range(request: web.Request) -> str | None:
    """The client's one byte range as a store's GET asks for it, before the size is known
    (the answer tells it); None for the whole blob. `byte_range` judges it once the size
    is known, so what is passed on here needs only to be what aiohttp understood."""
    if "Range" not in request.headers or "If-Range" in request.headers:
        return None
    try:
        wanted = request.http_range
    except ValueError:
        return None
    start, stop = wanted.start, wanted.stop
    if start is None or (start == 0 and stop is None):
        return None
    if start < 0:  # a suffix: the last N bytes
        return f"bytes={start}"
    return f"bytes={start}-{'' if stop is None else stop - 1}"


async def _send_stored(request: web.Request, reg: RegistryRequest, cache: Cache,
                       found: CachedBlob) -> web.StreamResponse:
    """A committed blob in a store without local files: its byte range, streamed (by the
    read begun for it, if the store began one: a warm GET is then one store request)."""
    try:
        span = byte_range(request, found.size)
    except RegistryError:
        found.close()
        raise
    start, end = span if span is not None else (0, found.size)
    resp = await _start(request, reg, "HIT", found.size, span)
    body = found.body
    if body is not None and (body.start, body.end) == (start, end):
        chunks: AsyncIterator[bytes] = body.chunks()
    else:  # nothing begun, or not the bytes to send: read them now
        found.close()
        chunks = cache.store.read(found.key, start, end)
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        async for chunk in chunks:
            await _write(resp, chunk, request[STATE].pace)
            request[STATE].body_bytes = (request[STATE].body_bytes or 0) + len(chunk)
    await resp.write_eof()
    return resp


def _abort(request: web.Request) -> BaseException:
    """Cut the client's connection: a body that failed must never end cleanly."""
    if request.transport is not None:
        request.transport.abort()
    return asyncio.CancelledError()


async def _follow(request: web.Request, reg: RegistryRequest, flight: BlobFlight,
                  status: str) -> web.StreamResponse:
    try:
        await flight.wait_headers()  # the upstream's error, if any, is the client's answer
    except NoSpace:  # the spool could not even be created: nothing to follow
        return await _relay(request, reg, flight.relay(), status)
    span = byte_range(request, flight.size)
    resp = await _start(request, reg, status, flight.size, span)
    start, end = span if span is not None else (0, None)
    state = request[STATE]
    # Plain HTTP with a known length: the kernel copies each stretch from the spool file
    # (sendfile), so N clients following one fetch cost no Python per byte. TLS, or a
    # chunked body (upstream sent no length), needs aiohttp's framing: TLS_READ reads.
    plain = _plain(request) and resp.content_length is not None and not resp.chunked \
        and state.pace is None
    try:
        # aclosing: a client that goes away must release its reader at once.
        async with contextlib.aclosing(flight.spans(start, end)) as spans:
            async for stretch in spans:
                if isinstance(stretch, bytes):  # the disk filled up: relayed from upstream
                    await _write(resp, stretch, state.pace)
                    state.body_bytes = (state.body_bytes or 0) + len(stretch)
                    continue
                fd, offset, count = stretch
                if plain:
                    with os.fdopen(fd, "rb", closefd=False) as file:
                        await _sendfile(request, file, offset, count)
                else:
                    _bound_tls_buffer(request)
                    async with contextlib.aclosing(read_span_cached(
                            fd, offset, count, TLS_READ)) as chunks:
                        async for chunk in chunks:
                            await _write(resp, chunk, state.pace)
                state.body_bytes = (state.body_bytes or 0) + count
    except FetchAborted:
        raise _abort(request) from None
    await resp.write_eof()
    return resp


async def _relay(request: web.Request, reg: RegistryRequest, relay: Relay,
                 status: str) -> web.StreamResponse:
    """A blob straight from the upstream (the disk is full): verified, kept nowhere."""
    try:
        await relay.open()  # the upstream's error, if any, is the client's answer
        span = byte_range(request, relay.size)
        resp = await _start(request, reg, status, relay.size, span)
        start, end = span if span is not None else (0, None)
        state = request[STATE]
        try:
            async with contextlib.aclosing(relay.stream(start, end)) as chunks:
                async for chunk in chunks:
                    await _write(resp, chunk, state.pace)
                    state.body_bytes = (state.body_bytes or 0) + len(chunk)
        except FetchAborted:
            raise _abort(request) from None
        await resp.write_eof()
        return resp
    finally:
        relay.close()


async def _redirect(request: web.Request, reg: RegistryRequest, cache: Cache,
                    size: int | None) -> web.Response | None:
    """A 307 to the store's presigned URL for a committed blob of `size` bytes, if the
    store redirects blobs that large; None: serve it here."""
    if size is None or not cache.blobs.redirecting:
        return None
    store = cast(Redirecting, cache.store)
    url = await store.redirect_url(blob_key(reg.route.namespace, reg.digest), size)
    if url is None:
        return None
    request[STATE].cache = "HIT"
    # Clients follow a 307 on a blob GET (the distribution spec allows redirects there;
    # Docker Hub's own blobs are redirects to its CDN).
    out = headers(reg, "HIT", **{"Docker-Content-Digest": str(reg.digest)})
    out["Location"] = url
    return web.Response(status=307, headers=out)


async def blob_get(request: web.Request, reg: RegistryRequest, cache: Cache,
                   upstream: Upstream) -> web.StreamResponse:
    blobs, digest, state = cache.blobs, reg.digest, request[STATE]
    redirecting = blobs.redirecting
    if redirecting:  # if the index knows the size, no store request at all
        size = await blobs.known_size(reg.route, digest)
        resp = await _redirect(request, reg, cache, size)
        if resp is not None:
            assert size is not None
            await blobs.served(reg.route, digest, size)
            return resp
    found = await blobs.get(upstream, reg.route, reg.repository, digest,
                            admit=state.admit_miss,
                            byte_range=store_range(request) if blobs.sized_reads else None)
    if isinstance(found, MemoryBlob) and not redirecting:  # the common warm config GET
        return _send_memory(request, reg, found)
    if isinstance(found, Relay):
        return await _relay(request, reg, found, "MISS")
    if redirecting and isinstance(found, (CachedBlob, MemoryBlob)):  # a hit, by get()
        resp = await _redirect(request, reg, cache, found.size)
        if resp is not None:
            if isinstance(found, CachedBlob):
                found.close()  # the GET's body, unread
            return resp
    if isinstance(found, MemoryBlob):  # the bytes are here: nothing a deletion could cut
        return _send_memory(request, reg, found)
    if not isinstance(found, tuple):
        return await _send_committed(request, reg, cache, found)
    flight, started = found
    try:
        with flight.attached():
            return await _follow(request, reg, flight, "MISS" if started else "COALESCED")
    except StoredMeanwhile:  # another replica committed it as this one was to fetch it
        again = await cache.blobs.committed(reg.route, reg.digest, store_range(request)
                                            if cache.blobs.sized_reads else None)
        if again is None:
            raise RegistryError("UNAVAILABLE", "the blob is being stored: try again",
                                503) from None
        if isinstance(again, MemoryBlob):
            return _send_memory(request, reg, again)
        return await _send_committed(request, reg, cache, again)


async def _send_committed(request: web.Request, reg: RegistryRequest, cache: Cache,
                          found: OpenBlob | CachedBlob) -> web.StreamResponse:
    # Being read: eviction leaves it alone until the client has it.
    with cache.readers.reading(reg.route.namespace, str(reg.digest)):
        if isinstance(found, OpenBlob):  # the common warm GET: one thread hop
            return await _send_file(request, reg, found.file, found.size)
        return await _send_stored(request, reg, cache, found)


async def blob_head(request: web.Request, reg: RegistryRequest, cache: Cache,
                    upstream: Upstream) -> web.StreamResponse:
    digest = reg.digest
    size = await cache.blobs.cached_size(reg.route, digest)
    status = "HIT"
    if size is None:
        flight = cache.blobs.inflight(reg.route, digest)
        if flight is not None:
            try:
                await flight.wait_headers()
                status, size = "COALESCED", flight.size
            except StoredMeanwhile:  # committed by another replica: the store knows
                size = await cache.blobs.cached_size(reg.route, digest)
        else:
            admit = request[STATE].admit_miss
            if admit is not None:
                admit()
            resp = await upstream.request("HEAD", f"/v2/{reg.repository}/blobs/{digest}",
                                          kind="blob", repository=reg.repository)
            resp.release()
            status, size = "MISS", resp.content_length
    out = web.StreamResponse(headers=_blob_headers(reg, status))
    if size is not None:
        out.content_length = size
    await out.prepare(request)
    await out.write_eof()
    return out
