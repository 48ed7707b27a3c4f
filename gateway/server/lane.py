"""The registry lane: manifest requests (GET and HEAD /v2/<name>/manifests/<reference>)
served by the pipeline's own stages without aiohttp's router and middleware chain, and a
cached manifest written as one buffer.

Why: a warm manifest GET is what a cluster's nodes send most, and on it the gateway's
own work was under half of the CPU. The rest was aiohttp around it: the router (three
resources tried, four regular expressions), two middleware coroutines and the one that
sets the current app, the `on_response_prepare` signal, and a Response whose headers go
through a multidict, `_prepare_headers` and the serializer. Callgrind counted 542k
instructions per warm GET by tag, 139k of them aiohttp's request side alone.

The same answers as the app's path, byte for byte but the Date and the request id: the
observe stage begins and logs the request (observer), resolve, access and limits admit
it (admit), the cache answers it (`Manifests.held`, else the handler), the common
headers and the pull counter see it (`prepared`, `pulled`). Only the HIT held in memory
is written here; anything else (a miss, a refusal, HTTP/1.0, a body over `RAW_MAX`) is
a Response sent the usual way. Requests the lane does not serve go to the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import hdrs, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11

from .. import api, pipeline
from ..cache import ManifestResult
from ..pipeline.observe import REQUEST_ID
from ..state import RegistryRequest, RequestState

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Prepared = Callable[[web.Request, web.StreamResponse], Awaitable[None]]
LANE_METHODS = ("GET", "HEAD")
# A bigger manifest is sent by aiohttp, which waits for the client to take it.
RAW_MAX = 64 << 10
# The transport's buffer past which the lane waits for the client to read (a client
# that pipelines requests and reads nothing must not grow it).
HIGH_WATER = 64 << 10


class RegistryLane:
    """Built by the composition root (app.py, kept as app[LANE]); the server's request
    handler (runner.py) hands it every request first."""

    def __init__(self, stages: pipeline.Pipeline, services: api.Services, prepared: Prepared,
                 pulled: Callable[[str, str], None],
                 always: tuple[tuple[str, str], ...] = ()) -> None:
        self._observer = stages.observer
        self._admit = stages.admit
        # Plain HTTP redirected to HTTPS: the redirect stage decides; the app runs it.
        self._off = stages.redirects
        self._services = services
        self._prepared = prepared
        self._pulled = pulled
        self._always = "".join(f"{name}: {value}\r\n" for name, value in always)

    def wrap(self, app: Handler) -> Handler:
        """The server's handler: the lane's requests here, every other one to `app`."""

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            if self._off or request.method not in LANE_METHODS or \
                    not request.path.startswith("/v2/") or \
                    "/manifests/" not in request.path or hdrs.EXPECT in request.headers:
                return await app(request)
            return await self._serve(cast(web.Request, request), app)

        return handle

    async def _serve(self, original: web.Request, app: Handler) -> web.StreamResponse:
        observer = self._observer
        request, state, started = observer.begin(original)
        response: web.StreamResponse
        try:
            self._admit.resolve(request, state)
        except Exception:  # the app's path refuses it the same way, and logs it
            return await app(original)
        reg = state.registry
        if reg is None or reg.kind != "manifest":  # "manifests" within a repository name
            return await app(original)  # nothing was counted or taken yet
        try:
            await self._admit.police(request, state)
            held = api.held_manifest(self._services, request, reg)
            if held is not None:
                written = await self._write(request, state, reg, held, started)
                if written is not None:
                    return written
                response = web.Response(body=held.manifest.body,
                                        headers=api.manifest_headers(reg, held))
            else:
                response = await api.dispatch_with(self._services, request)
        except (asyncio.CancelledError, ConnectionError) as exc:
            observer.aborted(request, state, None, started)
            if isinstance(exc, ConnectionError):
                raise asyncio.CancelledError from None
            raise
        except Exception as exc:
            response = observer.failure(exc, state)
        # aiohttp runs the app's on_response_prepare only for a request its router matched.
        await self._prepared(request, response)
        await observer.send(request, state, response, started)
        return response

    async def _write(self, request: web.Request, state: RequestState, reg: RegistryRequest,
                     held: ManifestResult, started: float) -> web.StreamResponse | None:
        """The answer as one buffer on the transport; None when aiohttp must send it
        (HTTP/1.0 or a closing connection: its Connection header; a big body; a value
        aiohttp's serializer would refuse)."""
        body = held.manifest.body
        transport = request.transport
        if request.version != HttpVersion11 or not request.keep_alive or \
                len(body) > RAW_MAX or transport is None:
            return None
        fields = api.manifest_headers(reg, held)
        fields["Content-Length"] = str(len(body))
        fields["Date"] = rfc822_formatted_time()
        fields["Server"] = SERVER_SOFTWARE
        fields["Docker-Distribution-API-Version"] = "registry/2.0"
        fields[REQUEST_ID] = state.id
        values = "".join(fields.values())
        if "\r" in values or "\n" in values:
            return None
        text = "".join([f"{name}: {value}\r\n" for name, value in fields.items()])
        head = f"HTTP/1.1 200 OK\r\n{text}{self._always}\r\n".encode()
        get = request.method == "GET"
        if transport.is_closing():
            self._observer.aborted(request, state, None, started)
            raise asyncio.CancelledError
        transport.write(head + body if get else head)
        if get:
            self._pulled(reg.route.name, reg.repository)
        self._observer.record(request, state, 200, len(body) if get else 0, started,
                              held.cache)
        if transport.get_write_buffer_size() > HIGH_WATER:
            await request.writer.drain()
        return _Sent()


LANE = web.AppKey("lane", RegistryLane)


class _Sent(web.StreamResponse):
    """An answer the lane wrote itself: aiohttp has nothing left to send. It reads only
    `keep_alive` (the lane writes only to a connection that stays open), `prepare` and
    `write_eof`."""

    def __init__(self) -> None:  # no headers, no body: nothing else is read
        pass

    @property
    def keep_alive(self) -> bool:
        return True

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None
