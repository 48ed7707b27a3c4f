"""The registry lane: manifest requests (GET and HEAD /v2/<name>/manifests/<reference>)
and GETs of small blobs held in memory (an image's config) served by the pipeline's own
stages without aiohttp's router and middleware chain, and a cached answer written as one
buffer.

Why: a warm manifest GET is what a cluster's nodes send most, and on it the gateway's
own work was under half of the CPU. The rest was aiohttp around it: the router (three
resources tried, four regular expressions), two middleware coroutines and the one that
sets the current app, the `on_response_prepare` signal, and a Response whose headers go
through a multidict, `_prepare_headers` and the serializer. Callgrind counted 542k
instructions per warm GET by tag; 375k through the lane. (aiohttp's request side alone,
parser to handler call, is 139k.)

The same answers as the app's path, byte for byte but the Date and the request id: the
observe stage begins and logs the request (observer), resolve, access and limits admit
it (admit), the cache answers it (`Manifests.held`, `Blobs.small`, else the handler),
the common headers and the pull counter see it (`prepared`, `pulled`). Only what is held
in memory is written here; anything else (a miss, a refusal, HTTP/1.0, a body over
`RAW_MAX`) is a Response sent the usual way. A request the lane does not serve (a blob
not held, a Range, a HEAD of a blob, every other path) goes to the app untouched:
nothing is counted before resolve tells which it is, and resolve has no side effects.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import hdrs, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11

from .. import api, pipeline
from ..api.blobs import blob_fields
from ..cache import MemoryBlob
from ..pipeline.observe import API_VERSION, REQUEST_ID
from ..state import RegistryRequest, RequestState

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Prepared = Callable[[web.Request, web.StreamResponse], Awaitable[None]]
LANE_METHODS = ("GET", "HEAD")
# A bigger manifest is sent by aiohttp, which waits for the client to take it.
RAW_MAX = 64 << 10
# The transport's buffer past which the lane waits for the client to read (a client
# that pipelines requests and reads nothing must not grow it). Under TLS the SSL
# transport's own mark applies first, as on the app's path.
HIGH_WATER = 64 << 10
# What aiohttp's serializer refuses in a header value (http_writer._safe_header): the
# lane sends such an answer through it, so it is refused the same way.
UNSAFE_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class RegistryLane:
    """Built by the composition root (app.py, kept as app[LANE]); the server's request
    handler (runner.py) hands it every request first."""

    def __init__(self, stages: pipeline.Pipeline, services: api.Services, prepared: Prepared,
                 pulled: Callable[[str, str], None],
                 always: tuple[tuple[str, str], ...] = ()) -> None:
        self._observer = stages.observer
        self._admit = stages.admit
        # Plain HTTP redirected to HTTPS (--redirect-http): the app's redirect stage
        # answers a request that is not HTTPS (after the edge: a trusted proxy's word).
        self._redirects = stages.redirects
        self._services = services
        self._prepared = prepared
        self._pulled = pulled
        self._always = "".join(f"{name}: {value}\r\n" for name, value in always)

    def wrap(self, app: Handler) -> Handler:
        """The server's handler: the lane's requests here, every other one to `app`."""

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            path, method = request.path, request.method
            if not path.startswith("/v2/") or hdrs.EXPECT in request.headers \
                    or not (("/manifests/" in path and method in LANE_METHODS)
                            or ("/blobs/" in path and method == "GET")):
                return await app(request)
            return await self._serve(cast(web.Request, request), app)

        return handle

    async def _serve(self, original: web.Request, app: Handler) -> web.StreamResponse:
        """Resolve (no side effects: what the lane does not serve goes to the app
        untouched), then the rest of the stages and the answer."""
        observer = self._observer
        request, state, started = observer.begin(original)
        if self._redirects and request.scheme != "https":
            return await app(original)
        try:
            self._admit.resolve(request, state)
        except Exception:  # the app's path refuses it the same way, and logs it
            return await app(original)
        reg = state.registry
        small = None
        if reg is not None and reg.kind == "blob" and request.method == "GET":
            small = api.held_blob(self._services, request, reg)
        if reg is None or (reg.kind != "manifest" and small is None):
            return await app(original)  # nothing was counted or taken yet
        response = await observer.answer(request, state, started,
                                         self._answer(request, state, reg, small, started))
        if isinstance(response, _Sent):
            await self._drained(request)  # outside the try: logged once, whatever happens
            return response
        # aiohttp runs the app's on_response_prepare only for a request its router matched.
        await self._prepared(request, response)
        await observer.send(request, state, response, started)
        return response

    async def _answer(self, request: web.Request, state: RequestState, reg: RegistryRequest,
                      small: MemoryBlob | None, started: float) -> web.StreamResponse:
        """Past access and limits: a manifest or small blob held in memory, written
        here; anything else as the handler answers it."""
        await self._admit.police(request, state)
        if small is not None:
            # Held before the access rules (which may wait for a login check): a blob
            # evicted meanwhile still goes out whole, as one evicted while the app's path
            # sends it does; its bytes are its digest's.
            self._services.cache.blobs.hit(reg.route, reg.digest)
            fields, body, pull = blob_fields(reg, "HIT"), small.data, False
        else:
            held = api.held_manifest(self._services, request, reg)
            if held is None:
                return await api.dispatch_with(self._services, request)
            fields, body = api.manifest_headers(reg, held), held.manifest.body
            pull = request.method == "GET"
        if self._write(request, state, fields, body, started):
            if pull:
                self._pulled(reg.route.name, reg.repository)
            return _Sent()
        return web.Response(body=body, headers=fields)

    def _write(self, request: web.Request, state: RequestState, fields: dict[str, str],
               body: bytes, started: float) -> bool:
        """The 200 answer as one buffer on the transport; False when aiohttp must send
        it (HTTP/1.0 or a closing connection: its Connection header; a big body; a value
        aiohttp's serializer would refuse)."""
        transport = request.transport
        if request.version != HttpVersion11 or not request.keep_alive or \
                len(body) > RAW_MAX or transport is None:
            return False
        if UNSAFE_HEADER.search("".join(fields.values()) + state.id) is not None:
            return False
        text = "".join([f"{name}: {value}\r\n" for name, value in fields.items()])
        head = (f"HTTP/1.1 200 OK\r\n{text}Content-Length: {len(body)}\r\n"
                f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n"
                f"{API_VERSION[0]}: {API_VERSION[1]}\r\n"
                f"{REQUEST_ID}: {state.id}\r\n{self._always}\r\n").encode()
        get = request.method == "GET"
        if transport.is_closing():
            raise ConnectionResetError("the client went away")
        transport.write(head + body if get else head)
        self._observer.record(request, state, 200, len(body) if get else 0, started,
                              fields["X-Cache"])
        return True

    @staticmethod
    async def _drained(request: web.Request) -> None:
        """Wait while the client has HIGH_WATER bytes unread. Sent and logged already:
        a client gone meanwhile leaves nothing to do (and a cancel nothing to log)."""
        transport = request.transport
        if transport is not None and transport.get_write_buffer_size() > HIGH_WATER:
            with contextlib.suppress(ConnectionError):
                await request.writer.drain()


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
