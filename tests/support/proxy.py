"""A counting reverse proxy in front of one upstream registry (loopback only).

It records every request by (method, path), counts the blob body bytes it sends,
and can throttle (bytes/s), add latency, or answer every request with a fixed
failure. Absolute `Location` headers that point at the upstream are rewritten to
point at the proxy, so uploads and redirects keep working through it.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .net import ensure_loopback
from .threaded import ThreadedServer

_HOP_BY_HOP = frozenset(
    h.lower() for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
                        "TE", "Trailers", "Transfer-Encoding", "Upgrade", "Host",
                        "Content-Length")
)
_BLOB_PATH = re.compile(r"^/v2/(?P<repository>.+)/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")
_MANIFEST_PATH = re.compile(r"^/v2/(?P<repository>.+)/manifests/(?P<reference>[^/]+)$")


@dataclass
class Seen:
    """One request as the proxy saw it. Status and bytes are filled in *before* the
    bytes go out, so a client that has read a body always finds it counted."""

    method: str
    path: str
    query: str
    status: int = 0
    body_bytes: int = 0


class CountingProxy:
    """Reverse proxy to `upstream` (http://127.0.0.1:PORT) with request accounting."""

    def __init__(self, upstream: str, *, throttle_bytes_per_second: int | None = None,
                 latency: float = 0.0) -> None:
        host = upstream.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        ensure_loopback(host)
        self.upstream = upstream.rstrip("/")
        self.throttle_bytes_per_second = throttle_bytes_per_second
        self.latency = latency
        self.fail_status: int | None = None
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._session: aiohttp.ClientSession | None = None
        self.server = ThreadedServer(self._build_app)

    # -- test-side view ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def seen(self) -> list[Seen]:
        with self._lock:
            return [Seen(s.method, s.path, s.query, s.status, s.body_bytes) for s in self._seen]

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()

    def counts(self) -> Counter[tuple[str, str]]:
        return Counter((s.method, s.path) for s in self.seen())

    def blob_requests(self, repository: str | None = None, *,
                      methods: tuple[str, ...] = ("GET",)) -> list[Seen]:
        """Blob requests (GET by default), optionally for one repository only."""
        return self._matching(_BLOB_PATH, repository, methods)

    def manifest_requests(self, repository: str | None = None, *,
                          methods: tuple[str, ...] = ("GET", "HEAD")) -> list[Seen]:
        return self._matching(_MANIFEST_PATH, repository, methods)

    def blob_bytes(self, repository: str | None = None) -> int:
        return sum(s.body_bytes for s in self.blob_requests(repository))

    def requests_for(self, repository: str) -> list[Seen]:
        """Every request whose path names `repository` (manifests, blobs, tags, referrers)."""
        prefix = f"/v2/{repository}/"
        return [s for s in self.seen() if s.path.startswith(prefix)]

    def _matching(self, pattern: re.Pattern[str], repository: str | None,
                  methods: tuple[str, ...]) -> list[Seen]:
        found = []
        for seen in self.seen():
            match = pattern.match(seen.path)
            if match and seen.method in methods and (
                repository is None or match["repository"] == repository
            ):
                found.append(seen)
        return found

    # -- proxying ------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        app.cleanup_ctx.append(self._session_ctx)
        return app

    async def _session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        yield
        await self._session.close()

    def _begin(self, request: web.Request) -> Seen:
        seen = Seen(request.method, request.path, request.query_string)
        with self._lock:
            self._seen.append(seen)
        return seen

    def _update(self, seen: Seen, *, status: int | None = None, sent: int = 0) -> None:
        with self._lock:
            if status is not None:
                seen.status = status
            seen.body_bytes += sent

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        seen = self._begin(request)
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.fail_status is not None:
            self._update(seen, status=self.fail_status)
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "injected by CountingProxy"}]},
                status=self.fail_status,
            )
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read() if request.can_read_body else None
        try:
            upstream = await self._session.request(
                request.method, self.upstream + request.raw_path, headers=headers, data=body,
                allow_redirects=False,
            )
        except aiohttp.ClientError:
            self._update(seen, status=502)
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "upstream unreachable"}]},
                status=502,
            )
        async with upstream:
            self._update(seen, status=upstream.status)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() in _HOP_BY_HOP:
                    continue
                if name.lower() == "location" and value.startswith(self.upstream):
                    value = f"http://{request.host}{value[len(self.upstream):]}"
                response.headers.add(name, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method != "HEAD":
                chunk_size = 64 * 1024
                if self.throttle_bytes_per_second:
                    chunk_size = max(1, min(chunk_size, self.throttle_bytes_per_second // 10))
                async for chunk in upstream.content.iter_chunked(chunk_size):
                    self._update(seen, sent=len(chunk))
                    await response.write(chunk)
                    if self.throttle_bytes_per_second:
                        await asyncio.sleep(len(chunk) / self.throttle_bytes_per_second)
            await response.write_eof()
            return response
