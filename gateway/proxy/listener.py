"""The forward proxy's listener protocol: reads one request head, refuses what is not a
CONNECT to an allowed destination (403, before any connection is made), applies the
gateway's access rules to the client (address allow/deny; a login by Proxy-Authorization
Basic against the same htpasswd file), then intercepts or tunnels.

Never connects anywhere the destination rules refuse, never logs a credential.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config
from ..metrics import Metrics
from ..net import NetworkSet, parse_address, split_hostport
from ..pipeline.access import BadLogin, basic_credentials
from ..pipeline.rules import Policy
from ..pipeline.users import Logins
from ..state import ProxiedConnection
from .authority import Authority, Minter, NotPermitted
from .destinations import Decision, Destinations
from .intercept import ProxiedConnections, terminate
from .tunnel import Pipe, splice

log = logging.getLogger("gateway.proxy")

MAX_HEAD = 16384  # a CONNECT head is a line and a few headers
CONNECT_TIMEOUT = 10.0
CHALLENGE = 'Basic realm="registry-gateway proxy", charset="UTF-8"'
_REASONS = {200: "Connection established", 400: "Bad Request", 403: "Forbidden",
            405: "Method Not Allowed", 407: "Proxy Authentication Required",
            502: "Bad Gateway"}


class Refused(Exception):
    def __init__(self, status: int, reason: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.headers = headers or {}


@dataclass(frozen=True)
class Head:
    method: str
    target: str
    headers: dict[str, str]  # lower-cased names


def parse_head(raw: bytes) -> Head:
    try:
        text = raw.decode("latin-1")
        line, *fields = text.split("\r\n")
        method, target, version = line.split(" ")
    except ValueError:
        raise Refused(400, "proxy_bad_request", "not an HTTP request") from None
    if not version.startswith("HTTP/1."):
        raise Refused(400, "proxy_bad_request", "want HTTP/1.1")
    headers = {}
    for field in fields:
        name, colon, value = field.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return Head(method, target, headers)


class _Rules:
    """What one Config says about proxy clients (memoised against its identity)."""

    def __init__(self, config: Config, intercepting: bool) -> None:
        self.config = config
        self.destinations = Destinations(config, intercepting=intercepting)
        self.policy = Policy(config)
        self.everyone = NetworkSet(config.access.anonymous)
        self.anonymous = {route.name: NetworkSet(route.anonymous) for route in config.routes
                          if route.anonymous is not None}


class ForwardProxy:
    """`serve --proxy-listen`: built once by the composition root. `server`: the app's
    protocol factory (the runner's `web.Server`), set once the runner is up."""

    def __init__(self, current: Callable[[], Config], metrics: Metrics, *,
                 logins: Logins) -> None:
        self._current = current
        self._metrics = metrics
        self._logins = logins
        self.connections = ProxiedConnections()
        self.authority: Authority | None = None
        self.minter: Minter | None = None
        self.server: Callable[[], asyncio.Protocol] | None = None
        self._rules: _Rules | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tunnels: set[Pipe] = set()  # closed at shutdown (intercepted ones: by aiohttp)

    def use_authority(self, authority: Authority) -> None:
        self.authority = authority
        self._rules = None  # compiled without interception: compile again
        self.minter = Minter(authority, lambda host: self.rules().destinations.may_mint(host),
                             on_mint=self._metrics.proxy_leaves.inc)

    def rules(self) -> _Rules:
        config = self._current()
        if self._rules is None or self._rules.config is not config:
            self._rules = _Rules(config, intercepting=self.minter is not None)
        return self._rules

    def protocol(self) -> asyncio.Protocol:
        return _HeadReader(self)

    def start(self, transport: asyncio.Transport, head: bytes, leftover: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(transport, head, leftover))
        self._tasks.add(task)  # owned: a strong reference until it ends
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pipe in list(self._tunnels):
            pipe.close()
        if self.minter is not None:
            await self.minter.close()

    async def _handle(self, transport: asyncio.Transport, raw: bytes, leftover: bytes) -> None:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) else "-"
        target = "-"
        try:
            head = parse_head(raw)
            target = head.target[:300]
            rules = self.rules()
            decision = self._admit(head, client, rules)
            user = await self._login(head, client, decision, rules)
            if decision.mode == "intercept":
                await self._intercept(transport, decision, user, leftover, client)
            else:
                await self._tunnel(transport, decision, leftover, client, rules)
        except Refused as refusal:
            self._refuse(transport, refusal, client, target)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log.info("proxy CONNECT %s from %s: connection ended: %s", target, client,
                     type(exc).__name__)
            transport.close()

    def _admit(self, head: Head, client: str, rules: _Rules) -> Decision:
        if head.method != "CONNECT":
            raise Refused(405, "proxy_method", "this proxy only takes CONNECT (https://) to "
                          "registry hosts", {"Allow": "CONNECT"})
        try:
            host, port = split_hostport(head.target)
        except ValueError:
            host, port = "", None
        if not host or port is None:
            raise Refused(400, "proxy_bad_request", "CONNECT wants host:port")
        verdict = rules.policy.screen(parse_address(client), "/v2/")
        if verdict is not None and not verdict.allowed:
            raise Refused(403, verdict.reason or "denied_address", verdict.message)
        decision = rules.destinations.decide(host, port)
        if decision.mode == "refuse":
            raise Refused(403, decision.reason, decision.message)
        return decision

    async def _login(self, head: Head, client: str, decision: Decision,
                     rules: _Rules) -> str | None:
        """The user of a valid Proxy-Authorization; None for an anonymous client that
        may pull anonymously. Otherwise 407 (a Basic challenge: Go clients send the
        user:password of their HTTPS_PROXY URL)."""
        path = rules.config.access.users
        if path is None:
            return None
        challenge = {"Proxy-Authenticate": CHALLENGE}
        try:
            offered = basic_credentials(head.headers.get("proxy-authorization"))
        except BadLogin:
            offered, bad = None, True
        else:
            bad = False
        if offered is not None:
            user, password = offered
            if await self._logins.verify(path, user, password):
                return user
            bad = True
        if bad:
            raise Refused(407, "bad_login", "wrong user name or password", challenge)
        route = decision.route
        anonymous = (rules.anonymous.get(route.name, rules.everyone) if route is not None
                     else rules.everyone)
        if parse_address(client) in anonymous:
            return None
        raise Refused(407, "login_required", "log in to this proxy (HTTPS_PROXY=http://"
                      "USER:PASSWORD@HOST:PORT)", challenge)

    async def _intercept(self, transport: asyncio.Transport, decision: Decision,
                         user: str | None, leftover: bytes, client: str) -> None:
        assert self.minter is not None and self.server is not None
        if leftover:
            raise Refused(400, "proxy_bad_request", "wait for the CONNECT answer before TLS")
        try:
            context = await self.minter.context(decision.host)
        except NotPermitted:
            raise Refused(403, "proxy_host", f"no certificate for {decision.host}") from None
        self._metrics.proxy_connects.labels("intercepted").inc()
        log.info("proxy CONNECT %s:%d from %s user=%s: intercepted, served by route %s",
                 decision.host, decision.port, client, user or "-",
                 decision.route.name if decision.route else "-")
        _answer(transport, 200)
        await terminate(transport, context, self.server, self.connections,
                        ProxiedConnection(decision.host, user))

    async def _tunnel(self, transport: asyncio.Transport, decision: Decision, leftover: bytes,
                      client: str, rules: _Rules) -> None:
        loop = asyncio.get_running_loop()
        address = rules.destinations.address(decision.host, decision.port)
        down = self._metrics.proxy_tunnelled_bytes.labels("down").inc
        up = self._metrics.proxy_tunnelled_bytes.labels("up").inc
        try:
            _, far = await asyncio.wait_for(
                loop.create_connection(lambda: Pipe(down), *address), CONNECT_TIMEOUT)
        except (TimeoutError, OSError):
            raise Refused(502, "proxy_unreachable", f"cannot reach {decision.host}") from None
        why = ("no forward_proxy.ca: registry traffic is not intercepted"
               if decision.route is not None else "not a registry route")
        self._metrics.proxy_connects.labels("tunnelled").inc()
        log.info("proxy CONNECT %s:%d from %s: tunnelled byte for byte, NOT CACHED (%s)",
                 decision.host, decision.port, client, why)
        _answer(transport, 200)
        self._tunnels.add(far)
        far.closed.add_done_callback(lambda _: self._tunnels.discard(far))
        splice(transport, leftover, far, up)

    def _refuse(self, transport: asyncio.Transport, refusal: Refused, client: str,
                target: str) -> None:
        self._metrics.proxy_connects.labels("refused").inc()
        self._metrics.refusals.labels("-", refusal.reason).inc()
        log.info("proxy %s from %s: refused %d (%s)", target, client, refusal.status,
                 refusal.reason)
        _answer(transport, refusal.status, refusal.message, refusal.headers)
        transport.close()


def _answer(transport: asyncio.Transport, status: int, message: str = "",
            headers: dict[str, str] | None = None) -> None:
    if transport.is_closing():
        return
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    body = (message + "\n").encode() if message else b""
    if status != 200:
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}",
                  "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


class _HeadReader(asyncio.Protocol):
    """Reads one request head (at most MAX_HEAD bytes, within the idle timeout), then
    stops reading and hands the connection to the proxy."""

    def __init__(self, proxy: ForwardProxy) -> None:
        self._proxy = proxy
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        timeout = self._proxy._current().limits.server.idle_timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._done()
                _answer(self._transport, 400, "request head too large")
                self._transport.close()
            return
        self._done()
        self._transport.pause_reading()
        head, leftover = bytes(self._buffer[:end]), bytes(self._buffer[end + 4:])
        self._buffer.clear()
        self._proxy.start(self._transport, head, leftover)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done()

    def _done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
