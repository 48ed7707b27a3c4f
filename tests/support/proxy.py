"""The one counting proxy: a reverse proxy in front of one real upstream registry
(loopback only) that records every request (request_log.py) with the status and body
bytes it sent, and applies the same scripted faults as the fake registry (faults.py).

Absolute `Location` headers that point at the upstream are rewritten to point at the
proxy, so uploads and redirects keep working through it. A client may also use it as its
HTTP forward proxy (absolute-form request targets): whatever host the target names, the
request goes to the one upstream. It never alters bytes unless a fault says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .faults import NO_FAULT, Fault, Scripted, fault_answer, pieces, send_body
from .net import ensure_loopback
from .request_log import RequestLog, Seen
from .threaded import ThreadedServer

_HOP_BY_HOP = frozenset(
    h.lower() for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
                        "TE", "Trailers", "Transfer-Encoding", "Upgrade", "Host",
                        "Content-Length")
)
_CONTENT_RANGE_START = re.compile(r"bytes (\d+)-")


class CountingProxy(RequestLog, Scripted):
    """Reverse proxy to `upstream` (http://127.0.0.1:PORT) with request accounting.

    `throttle_bytes_per_second` (per response, so per connection), `latency` and
    `fail_status` apply to every request (a fault of the script's takes precedence for the
    request it matches); `total_bytes_per_second` caps all responses' bodies together, as
    a CDN that paces each connection and the link behind it do.
    """

    def __init__(self, upstream: str, *, throttle_bytes_per_second: int | None = None,
                 total_bytes_per_second: int | None = None, latency: float = 0.0) -> None:
        RequestLog.__init__(self)
        Scripted.__init__(self)
        host = upstream.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        ensure_loopback(host)
        self.upstream = upstream.rstrip("/")
        self.throttle_bytes_per_second = throttle_bytes_per_second
        self.total_bytes_per_second = total_bytes_per_second
        self._shared_next = 0.0  # when the shared cap lets the next byte go (server loop time)
        self.latency = latency
        self.fail_status: int | None = None
        # As a forward proxy: (user, password) it wants in Proxy-Authorization, else 407.
        self.proxy_login: tuple[str, str] | None = None
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
        self.release()  # a response parked at the gate must not hold the shutdown
        self.server.stop()

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

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        seen = self.record(Seen(request.method, request.path, dict(request.query),
                                CIMultiDict(request.headers), peer=request.remote))
        if self.proxy_login is not None and request.headers.get("Proxy-Authorization") != \
                aiohttp.encode_basic_auth(*self.proxy_login):
            self.update(seen, status=407)
            return web.Response(status=407, headers={"Proxy-Authenticate": 'Basic realm="p"'})
        if self.latency:
            await asyncio.sleep(self.latency)
        step = self.script.take(request.method, request.path)
        if step is not None and not isinstance(step, Fault):
            response = await step(request)
            self.update(seen, status=response.status)
            return response
        fault = step or NO_FAULT
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status is not None:
            self.update(seen, status=fault.status)
            return fault_answer(fault)
        if self.fail_status is not None:
            self.update(seen, status=self.fail_status)
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "injected by CountingProxy"}]},
                status=self.fail_status,
            )
        if fault.throttle is None and self.throttle_bytes_per_second:
            fault = dataclasses.replace(fault, throttle=self.throttle_bytes_per_second)
        return await self._relay(request, seen, fault)

    async def _relay(self, request: web.Request, seen: Seen, fault: Fault) -> web.StreamResponse:
        assert self._session is not None
        skip = _HOP_BY_HOP | ({"range"} if fault.ignore_range else set())
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        body = await request.read() if request.can_read_body else None
        try:
            upstream = await self._session.request(
                request.method, self.upstream + request.rel_url.raw_path_qs, headers=headers,
                data=body,
                allow_redirects=False,
            )
        except aiohttp.ClientError:
            self.update(seen, status=502)
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "upstream unreachable"}]},
                status=502,
            )
        async with upstream:
            self.update(seen, status=upstream.status)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() in _HOP_BY_HOP:
                    continue
                if name.lower() == "location" and value.startswith(self.upstream):
                    value = f"http://{request.host}{value[len(self.upstream):]}"
                response.headers.add(name, value)
            response.headers.update(fault.headers)
            if fault.content_range is not None:
                response.headers["Content-Range"] = fault.content_range
            started = _CONTENT_RANGE_START.match(upstream.headers.get("Content-Range", ""))
            start = int(started.group(1)) if started else 0
            replaced = fault.body
            if fault.chunked and request.method != "HEAD":
                response.enable_chunked_encoding()
            elif replaced is not None:
                response.content_length = max(0, len(replaced) - start)
            elif upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method != "HEAD":
                chunks = (pieces(replaced, start, len(replaced)) if replaced is not None
                          else upstream.content.iter_chunked(64 * 1024))
                await send_body(request, response, chunks, start=start, fault=fault,
                                gate=self.gate, on_sent=lambda n: self.update(seen, sent=n),
                                pace=self._pace)
            await response.write_eof()
            self.update(seen, ended=True)
            return response

    async def _pace(self, sent: int) -> None:
        """Hold this response back until the shared cap allows `sent` more bytes."""
        rate = self.total_bytes_per_second
        if not rate:
            return
        now = asyncio.get_running_loop().time()
        self._shared_next = max(self._shared_next, now) + sent / rate
        await asyncio.sleep(self._shared_next - now)
