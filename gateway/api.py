"""The `/v2/` handlers: parse the request once, ask the cache, write the response.

A request becomes a `RegistryRequest` in one place (`parse`); handlers never
re-parse strings. Handlers raise `RegistryError`; the middleware renders it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Awaitable, Callable
from typing import IO, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict
from yarl import URL

from .cache import BlobFlight, Cache, CachedBlob, FetchAborted
from .cache.flight import read_span
from .errors import RegistryError
from .reference import Digest, Reference, parse_digest
from .routing import Router
from .state import STATE, RegistryRequest
from .upstream import Upstream

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
OCTET = "application/octet-stream"
PASSTHROUGH_MAX = 16 << 20
_PATH_RE = re.compile(r"(?P<name>.+?)/(?P<kind>manifests|blobs|tags|referrers)/(?P<rest>[^/]+)")


class Services:
    """What the handlers need, built once by `create_app`."""

    def __init__(self, router: Router, cache: Cache, upstreams: dict[str, Upstream]) -> None:
        self.router = router
        self.cache = cache
        self.upstreams = upstreams


SERVICES = web.AppKey("services", Services)


def parse(request: web.Request, router: Router) -> RegistryRequest:
    tail = request.match_info.get("tail", "")
    if "/blobs/uploads" in f"/{tail}":
        raise RegistryError("UNSUPPORTED", "this registry mirror is read-only: no uploads", 405,
                            headers={"Allow": "GET, HEAD"})
    # Names may contain "manifests" etc. as components: the lazy name grows until the
    # rest is one endpoint keyword and one segment.
    match = _PATH_RE.fullmatch(tail)
    if match is None:
        # Length first: a huge path is a name problem, not an unknown endpoint.
        if len(tail) > 512:
            raise RegistryError("NAME_INVALID", f"request path of {len(tail)} characters is "
                                "too long for a repository")
        raise RegistryError("NOT_FOUND", "no such registry API endpoint")
    name, kind, rest = match.group("name"), match.group("kind"), match.group("rest")
    resolved = router.resolve(request.host, name, request.query.get("ns"))
    if kind == "manifests":
        reference = str(Reference.parse(rest))
        kind = "manifest"
    elif kind == "blobs":
        reference = str(parse_digest(rest))
        kind = "blob"
    elif kind == "tags":
        if rest != "list":
            raise RegistryError("NOT_FOUND", "no such registry API endpoint")
        reference = "list"
    else:
        reference = str(parse_digest(rest))
    parsed = RegistryRequest(resolved.route, resolved.repository, kind, reference, resolved.via)
    request[STATE].registry = parsed
    return parsed


class BlobFile(web.FileResponse):
    """A FileResponse the access-log middleware may send before returning it."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:  # aiohttp calls prepare again after the handler returns
            return None
        return await super().prepare(request)

    async def _sendfile(self, request: web.BaseRequest, fobj: IO[Any], offset: int,
                        count: int) -> AbstractStreamWriter:
        # Under TLS, Python 3.11's loop.sendfile falls back to 256 KiB reads written one by
        # one (measured 30-44 MB/s on a 1 GiB blob); aiohttp's own fallback with our 1 MiB
        # chunk_size runs at ~280 MB/s. Plain HTTP keeps the kernel's sendfile.
        transport = request.transport
        if transport is not None and transport.get_extra_info("sslcontext") is not None:
            writer = await web.StreamResponse.prepare(self, request)
            assert writer is not None
            return await self._sendfile_fallback(writer, fobj, offset, count)
        return await super()._sendfile(request, fobj, offset, count)


def _headers(reg: RegistryRequest, cache: str, **extra: str) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict(extra)
    headers["X-Cache"] = cache
    headers["X-Registry-Route"] = reg.route.name
    return headers


# ---------------------------------------------------------------- handlers


async def base(request: web.Request) -> web.Response:
    """`/v2/`: the API version check every client starts with (no auth needed here)."""
    return web.json_response({}, headers={"X-Cache": "-"})


async def dispatch(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    reg = parse(request, services.router)
    upstream = services.upstreams[reg.route.name]
    handler = _HANDLERS[(reg.kind, request.method)]
    return await handler(request, reg, services.cache, upstream)


async def manifest(request: web.Request, reg: RegistryRequest, cache: Cache,
                   upstream: Upstream) -> web.StreamResponse:
    # Docker and skopeo send one Accept line per media type: all of them count.
    accept = ", ".join(request.headers.getall("Accept", ())) or None
    result = await cache.manifest(upstream, reg.route, reg.repository, reg.reference, accept)
    m = result.manifest
    return web.Response(body=m.body, headers=_headers(
        reg, result.cache, **{"Content-Type": m.media_type, "Docker-Content-Digest": m.digest,
                              "ETag": f'"{m.digest}"'}))


def _range(request: web.Request, size: int | None) -> tuple[int, int] | None:
    """The one byte range asked for, as [start, end); None for the whole blob."""
    header = request.headers.get("Range")
    if not header or size is None:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or (not match.group(1) and not match.group(2)):
        return None  # multiple or odd ranges: answering 200 with everything is allowed
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    else:
        start, end = max(size - int(last), 0), size
    if start >= size or end <= start:
        raise RegistryError("RANGE_INVALID", f"range {header!r} is outside the blob's "
                            f"{size} bytes", 416, headers={"Content-Range": f"bytes */{size}"})
    return start, end


async def blob_get(request: web.Request, reg: RegistryRequest, cache: Cache,
                   upstream: Upstream) -> web.StreamResponse:
    digest = parse_digest(reg.reference)
    transport = request.transport
    if _plain(transport) and not any(h in request.headers for h in _CONDITIONAL):
        # The common warm GET: one thread hop to open, then the kernel's sendfile.
        opened = await cache.open_cached_blob(reg.route, digest)
        if opened is not None:
            return await _send_cached(request, reg, digest, *opened)
    found = await cache.blob(upstream, reg.route, reg.repository, digest)
    if isinstance(found, CachedBlob):
        # Range and If-* answered by aiohttp from the file; TLS with 1 MiB reads.
        # sendfile on plain HTTP (1 MiB reads under TLS); aiohttp answers Range and
        # If-* itself from the file.
        return BlobFile(found.path, chunk_size=1 << 20, headers=_headers(
            reg, "HIT", **{"Content-Type": OCTET, "Docker-Content-Digest": str(digest)}))
    flight, started = found
    status = "MISS" if started else "COALESCED"
    cache.metrics.cache.labels(reg.route.name, "blob", status.lower()).inc()
    with flight.attached():
        return await _stream_flight(request, reg, flight, digest, status)


_CONDITIONAL = ("Range", "If-Range", "If-Match", "If-None-Match", "If-Modified-Since",
                "If-Unmodified-Since")


def _plain(transport: asyncio.Transport | None) -> bool:
    """A plain-TCP client connection: the kernel can send files to it (no TLS)."""
    return transport is not None and transport.get_extra_info("sslcontext") is None


async def _sendfile(transport: asyncio.Transport, file: IO[bytes], offset: int,
                    count: int) -> None:
    if transport.is_closing():  # loop.sendfile would raise RuntimeError
        raise ConnectionResetError("the client went away")
    await asyncio.get_running_loop().sendfile(transport, file, offset, count)


async def _send_cached(request: web.Request, reg: RegistryRequest, digest: Digest,
                       file: IO[bytes], size: int) -> web.StreamResponse:
    try:
        resp = web.StreamResponse(headers=_headers(reg, "HIT", **{
            "Content-Type": OCTET, "Docker-Content-Digest": str(digest),
            "Accept-Ranges": "bytes"}))
        resp.content_length = size
        await resp.prepare(request)
        if size and request.transport is not None:
            await _sendfile(request.transport, file, 0, size)
        request[STATE].body_bytes = size
        await resp.write_eof()
        return resp
    finally:
        file.close()


async def _stream_flight(request: web.Request, reg: RegistryRequest, flight: BlobFlight,
                         digest: Digest, status: str) -> web.StreamResponse:
    await flight.wait_headers()  # the upstream's error, if any, is the client's answer
    size = flight.size
    span = _range(request, size)
    headers = _headers(reg, status, **{"Content-Type": OCTET, "Docker-Content-Digest": str(digest),
                                       "Accept-Ranges": "bytes"})
    resp = web.StreamResponse(status=206 if span else 200, headers=headers)
    if span is not None:
        resp.headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{size}"
        resp.content_length = span[1] - span[0]
    elif size is not None:
        resp.content_length = size
    await resp.prepare(request)
    start, end = span if span is not None else (0, None)
    state = request[STATE]
    state.body_bytes, state.cache = 0, status
    transport = request.transport
    # Plain HTTP with a known length: the kernel copies each stretch from the spool file
    # (sendfile), so N clients following one fetch cost no Python per byte. TLS, or a
    # chunked body (upstream sent no length), needs aiohttp's framing: 1 MiB reads.
    plain = _plain(transport) and resp.content_length is not None and not resp.chunked
    try:
        # aclosing: a client that goes away must release its reader at once.
        async with contextlib.aclosing(flight.spans(start, end)) as spans:
            async for fd, offset, count in spans:
                if plain and transport is not None:
                    with os.fdopen(fd, "rb", closefd=False) as file:
                        await _sendfile(transport, file, offset, count)
                else:
                    async with contextlib.aclosing(read_span(fd, offset, count)) as chunks:
                        async for chunk in chunks:
                            await resp.write(chunk)
                state.body_bytes += count
    except FetchAborted:
        # Never let a client see a clean end of a body that failed verification.
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError from None
    await resp.write_eof()
    return resp


async def blob_head(request: web.Request, reg: RegistryRequest, cache: Cache,
                    upstream: Upstream) -> web.StreamResponse:
    digest = parse_digest(reg.reference)
    cached = await cache.cached_blob(reg.route, digest, check_disk=False)
    status, size = "HIT", cached.size if cached is not None else None
    if cached is None:
        flight = cache.inflight(reg.route, digest)
        if flight is not None:
            await flight.wait_headers()
            status, size = "COALESCED", flight.size
        else:
            resp = await upstream.request("HEAD", f"/v2/{reg.repository}/blobs/{digest}",
                                          kind="blob", repository=reg.repository)
            resp.release()
            status, size = "MISS", resp.content_length
    headers = _headers(reg, status, **{"Content-Type": OCTET, "Docker-Content-Digest": str(digest),
                                       "Accept-Ranges": "bytes"})
    out = web.StreamResponse(headers=headers)
    if size is not None:
        out.content_length = size
    await out.prepare(request)
    await out.write_eof()
    return out


async def _passthrough(request: web.Request, reg: RegistryRequest, upstream: Upstream,
                       path: str, params: dict[str, str]) -> tuple[bytes, CIMultiDict[str]]:
    resp = await upstream.request("GET", path, kind=reg.kind, repository=reg.repository,
                                  params=params)
    body = await upstream.read_body(resp, PASSTHROUGH_MAX, reg.kind)
    keep: CIMultiDict[str] = CIMultiDict()
    for name in ("Content-Type", "OCI-Filters-Applied", "Link"):
        if name in resp.headers:
            keep[name] = resp.headers[name]
    return body, keep


def _client_link(request: web.Request, link: str) -> str | None:
    """Rewrite an upstream's `Link: </v2/<repo>/tags/list?...>; rel="next"` for this client."""
    match = re.match(r'\s*<([^>]*)>\s*;\s*rel="?next"?', link)
    if match is None:
        return None
    query = URL(match.group(1)).query
    params = {k: v for k, v in query.items() if k in ("n", "last")}
    if "ns" in request.query:
        params["ns"] = request.query["ns"]
    return f'<{request.rel_url.with_query(params)}>; rel="next"'


async def tags(request: web.Request, reg: RegistryRequest, cache: Cache,
               upstream: Upstream) -> web.StreamResponse:
    params: dict[str, str] = {}
    if "n" in request.query:
        n = request.query["n"]
        if not n.isdigit() or int(n) > 100_000:
            raise RegistryError("PAGINATION_NUMBER_INVALID", f"n={n[:20]!r} is not a page size",
                                400)
        params["n"] = n
    if "last" in request.query:
        params["last"] = request.query["last"]
    body, headers = await _passthrough(request, reg, upstream,
                                       f"/v2/{reg.repository}/tags/list", params)
    out = _headers(reg, "-", **{"Content-Type": headers.get("Content-Type", "application/json")})
    if "Link" in headers:
        link = _client_link(request, headers["Link"])
        if link:
            out["Link"] = link
    return web.Response(body=body, headers=out)


async def referrers(request: web.Request, reg: RegistryRequest, cache: Cache,
                    upstream: Upstream) -> web.StreamResponse:
    params = {k: request.query[k] for k in ("artifactType",) if k in request.query}
    body, headers = await _passthrough(request, reg, upstream,
                                       f"/v2/{reg.repository}/referrers/{reg.reference}", params)
    out = _headers(reg, "-", **{"Content-Type": headers.get(
        "Content-Type", "application/vnd.oci.image.index.v1+json")})
    if "OCI-Filters-Applied" in headers:
        out["OCI-Filters-Applied"] = headers["OCI-Filters-Applied"]
    return web.Response(body=body, headers=out)


Handler = Callable[[web.Request, RegistryRequest, Cache, Upstream],
                   Awaitable[web.StreamResponse]]
_HANDLERS: dict[tuple[str, str], Handler] = {
    ("manifest", "GET"): manifest,
    ("manifest", "HEAD"): manifest,  # aiohttp sends headers only for HEAD
    ("blob", "GET"): blob_get,
    ("blob", "HEAD"): blob_head,
    ("tags", "GET"): tags,
    ("tags", "HEAD"): tags,
    ("referrers", "GET"): referrers,
    ("referrers", "HEAD"): referrers,
}
