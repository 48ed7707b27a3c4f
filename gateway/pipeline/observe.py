"""Observe: error rendering, the access log, request metrics and request ids.

The one place where any exception becomes an OCI error body: a client never sees a
traceback. The access log is one JSON line per request, holds no secrets, and is
written by the logging thread (see logs.py), never on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..config import Config
from ..errors import RegistryError
from ..metrics import Metrics
from ..state import STATE, RegistryRequest, RequestState

REQUEST_ID = "X-Request-Id"
# Every answer carries it (add_common_headers; the registry lane writes it too).
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
access_log = logging.getLogger("gateway.access")
error_log = logging.getLogger("gateway.error")

_HTTP_CODES = {404: "NOT_FOUND", 405: "UNSUPPORTED", 401: "UNAUTHORIZED", 403: "DENIED",
               416: "RANGE_INVALID", 429: "TOOMANYREQUESTS"}


def render(error: RegistryError) -> web.Response:
    return web.Response(status=error.status, body=error.body(), headers={
        "Content-Type": "application/json", **error.headers})


def _kind(request: web.Request, reg: RegistryRequest | None) -> str:
    if reg is not None:
        return reg.kind
    if request.path in ("/v2", "/v2/"):
        return "base"
    return "metrics" if request.path == "/metrics" else "other"


class Observer:
    """What the outer stage does around every request, for both drivers of the pipeline:
    `observe_middleware` (aiohttp's router and middleware) and the server's registry lane
    (server/lane.py), which runs the same steps without them. `current()` (the running
    config) is read once per request and kept as `RequestState.config` for every later
    stage; `edge` (edge.py) then sees the request first, so the log and the rules see the
    client a trusted proxy names. `access_log`: where the access log's lines go (the log
    writer, logs.py); without it they are records of the "gateway.access" logger.
    Request ids are unique per process start, cheaper than a uuid4 per request."""

    def __init__(self, metrics: Metrics, current: Callable[[], Config],
                 edge: Callable[[web.Request, Config], web.Request] | None = None, *,
                 access_log: Callable[[str], None] | None = None) -> None:
        self.metrics = metrics
        self._current = current
        self._edge = edge
        self._id_prefix = f"{secrets.token_hex(4)}-"
        self._ids = itertools.count(1)
        self._records = _AccessLog(access_log)

    def begin(self, request: web.Request) -> tuple[web.Request, RequestState, float]:
        """The request as the rules see it, its state (kept on it), its start."""
        started = time.monotonic()
        config = self._current()
        if self._edge is not None:
            request = self._edge(request, config)
        state = RequestState(request.headers.get(REQUEST_ID, "")[:64]
                             or f"{self._id_prefix}{next(self._ids):x}", config)
        request[STATE] = state
        return request, state, started

    def failure(self, exc: Exception, state: RequestState) -> web.Response:
        """The OCI error answer to what a handler or step raised (re-raised: a redirect)."""
        if isinstance(exc, RegistryError):
            state.error = f"{exc.code}: {exc.message}"
            return render(exc)
        if isinstance(exc, web.HTTPException):
            if exc.status < 400:
                raise exc
            return render(_as_registry_error(exc))
        error_log.error("unhandled error (request id %s)", state.id, exc_info=exc)
        state.error = "UNKNOWN: internal error"
        return render(RegistryError("UNKNOWN", f"internal error; request id {state.id}", 500))

    async def answer(self, request: web.Request, state: RequestState, started: float,
                     work: Awaitable[web.StreamResponse]) -> web.StreamResponse:
        """`work`'s response, or the OCI error answer to what it raised. A client gone
        meanwhile is logged as aborted, and its ConnectionError becomes a cancel:
        nothing for aiohttp to log as an error."""
        try:
            return await work
        except (asyncio.CancelledError, ConnectionError) as exc:
            self.aborted(request, state, None, started)
            if isinstance(exc, ConnectionError):
                raise asyncio.CancelledError from None
            raise
        except Exception as exc:
            return self.failure(exc, state)

    async def send(self, request: web.Request, state: RequestState,
                   response: web.StreamResponse, started: float) -> None:
        """Send `response` and log it; a client gone meanwhile is logged as aborted."""
        try:
            # Send here rather than after return, so the log line has the bytes and time.
            if not response.prepared:
                await response.prepare(request)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError) as exc:
            self.aborted(request, state, response, started)
            if isinstance(exc, ConnectionError):
                raise asyncio.CancelledError from None
            raise
        self.log(request, state, response, started)

    def aborted(self, request: web.Request, state: RequestState,
                response: web.StreamResponse | None, started: float) -> None:
        """The client went away (or a failed transfer was cut on purpose): nothing to
        answer, and nothing for aiohttp to log as an error."""
        self.log(request, state, response, started, aborted=True)

    def log(self, request: web.Request, state: RequestState,
            response: web.StreamResponse | None, started: float, *,
            aborted: bool = False) -> None:
        status = response.status if response is not None else 499
        cache = response.headers.get("X-Cache", "-") if response is not None \
            else state.cache or "-"
        self.record(request, state, status, _body_bytes(request, state, response, aborted),
                    started, cache, aborted=aborted)

    def record(self, request: web.Request, state: RequestState, status: int, sent: int,
               started: float, cache: str, *, aborted: bool = False) -> None:
        """The request's metrics and its access log line."""
        duration = time.monotonic() - started
        reg = state.registry
        route = reg.route.name if reg is not None else "-"
        self.metrics.observe_request(route, _kind(request, reg), request.method, status,
                                     duration, sent)
        if not access_log.isEnabledFor(logging.INFO):
            return
        now = time.time()
        upstream = reg.route.upstream.url if reg is not None else None
        self._records.write(access_line(
            now, state.id, request.remote, request.host[:255], request.method,
            request.rel_url.raw_path[:512], route,
            str(upstream) if upstream is not None else None,
            reg.repository if reg is not None else None,
            reg.describe() if reg is not None else None, status, sent, duration, cache,
            state.user, state.rule, state.error, aborted), now)


def observe_middleware(observer: Observer) -> Middleware:
    """The outer stage as aiohttp middleware: render every error as OCI JSON; log and
    count every request once."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        request, state, started = observer.begin(request)
        response = await observer.answer(request, state, started, handler(request))
        await observer.send(request, state, response, started)
        return response

    return observe


def _as_registry_error(exc: web.HTTPException) -> RegistryError:
    """aiohttp's own errors (a 404 of the router, a 405) as OCI errors."""
    return RegistryError(_HTTP_CODES.get(exc.status, "UNKNOWN"), exc.reason or "error",
                         exc.status, headers={k: v for k, v in exc.headers.items()
                                              if k in ("Allow", "Retry-After")})


def access_line(now: float, request_id: str, remote: str | None, host: str, method: str,
                path: str, route: str, upstream: str | None, repository: str | None,
                reference: str | None, status: int, sent: int, duration: float,
                cache: str, user: str | None, rule: str | None, error: str | None,
                aborted: bool) -> str:
    """The access log's JSON line, written out directly. json.dumps of the same fields (a
    dict built per request, two floats in their shortest form, each string escaped char
    by char) cost a sixth of a cached manifest's CPU. Here the strings are checked once,
    together, for anything JSON must escape; nearly never, and then each is escaped.
    Times in ms, durations in 10 us steps; `user` is a login name, never a secret."""
    joined = "".join((request_id, remote or "", host, method, path, route, upstream or "",
                      repository or "", reference or "", cache, user or "", rule or "",
                      error or ""))
    if not joined.isascii() or b"\0" in joined.encode().translate(_PLAIN):
        request_id, host, method, path, route, cache = map(
            _inner, (request_id, host, method, path, route, cache))
        remote, upstream, repository, reference, user, rule, error = (
            None if v is None else _inner(v)
            for v in (remote, upstream, repository, reference, user, rule, error))
    ms, centi = int(now * 1000), round(duration * 100_000)
    # str(n + 1000)[1:]: n (0-999) with its leading zeros, cheaper than a format spec.
    line = (f'{{"ts": {ms // 1000}.{str(ms % 1000 + 1000)[1:]}, "id": "{request_id}", '
            f'"remote": {_opt(remote)}, "host": "{host}", "method": "{method}", '
            f'"path": "{path}", "route": "{route}", "upstream": {_opt(upstream)}, '
            f'"repository": {_opt(repository)}, "reference": {_opt(reference)}, '
            f'"status": {status}, "bytes": {sent}, '
            f'"duration_ms": {centi // 100}.{str(centi % 100 + 100)[1:]}, '
            f'"cache": "{cache}", "user": {_opt(user)}, "rule": {_opt(rule)}')
    if error is not None:
        line += f', "error": "{error}"'
    return line + (', "aborted": true}' if aborted else "}")


# Bytes that may stand in a JSON string as they are (printable ASCII but the quote and
# the backslash) map to themselves, every other to 0: one C pass finds any of them.
_PLAIN = bytes(b if 0x20 <= b < 0x7F and b not in b'"\\' else 0 for b in range(256))


def _opt(value: str | None) -> str:
    """A JSON string of text that needs no escaping, or null."""
    return "null" if value is None else f'"{value}"'


def _inner(value: str) -> str:
    """`value` escaped for a JSON string, without the quotes."""
    return json.dumps(value)[1:-1]


class _AccessLog:
    """Writes the access log's lines: to `sink` (the log writer's queue: the line is
    data, not a log record), or as records of the "gateway.access" logger (an app
    without the server's logging, e.g. under test). For those, `LogRecord()` (what
    Logger.info() builds, after walking the stack for the caller) looks up the thread,
    the process, the time and more, a tenth of a cached manifest's CPU: here each record
    is a copy of one made at the first request, with the line and the time set. Records
    are made on the event loop's thread, in the process that serves (a worker of `serve
    --workers` builds its app after the fork), so the thread and process stay right."""

    def __init__(self, sink: Callable[[str], None] | None) -> None:
        self._sink = sink
        self._template: dict[str, object] | None = None

    def write(self, line: str, created: float) -> None:
        if self._sink is not None:
            self._sink(line)
        else:
            access_log.handle(self._record(line, created))

    def _record(self, line: str, created: float) -> logging.LogRecord:
        template = self._template
        if template is None:
            template = self._template = logging.LogRecord(
                access_log.name, logging.INFO, __file__, 0, "", None, None).__dict__
        record = logging.LogRecord.__new__(logging.LogRecord)
        fields = template.copy()  # a dict's copy is one allocation, not a walk
        fields["msg"], fields["created"], fields["msecs"] = line, created, (created % 1) * 1000
        record.__dict__ = fields
        return record


def _body_bytes(request: web.Request, state: RequestState,
                response: web.StreamResponse | None, aborted: bool) -> int:
    """Body bytes sent: what metrics and the log call "bytes" (headers are not counted)."""
    if request.method == "HEAD":
        return 0
    counted = state.body_bytes
    if counted is not None:
        return counted
    if response is None:
        return 0
    if not aborted and response.content_length is not None:
        return response.content_length
    return response.body_length  # an aborted file transfer: headers included, roughly


# Sees each answer as its headers go out (with the request's state: None before observe).
Prepared = Callable[[web.Request, web.StreamResponse, RequestState | None], None]


def on_prepare(*also: Prepared) -> Callable[[web.Request, web.StreamResponse],
                                            Awaitable[None]]:
    """The app's one `on_response_prepare` receiver: the common headers, then `also`
    (plain functions: a receiver each would be another coroutine per answer)."""

    async def prepared(request: web.Request, response: web.StreamResponse) -> None:
        state = request.get(STATE)
        add_common_headers(request, response, state)
        for hook in also:
            hook(request, response, state)

    return prepared


def add_common_headers(request: web.Request, response: web.StreamResponse,
                       state: RequestState | None) -> None:
    """Headers every answer carries, errors included."""
    response.headers.setdefault(*API_VERSION)
    response.headers.setdefault("X-Cache", "-")
    if state is not None:
        response.headers.setdefault(REQUEST_ID, state.id)
    reg = state.registry if state is not None else None
    response.headers.setdefault("X-Registry-Route", reg.route.name if reg is not None else "-")
