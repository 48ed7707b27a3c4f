"""The client listeners' defences: connection caps (per address and in all, the total
derived from the descriptor limit) enforced at accept time, the HTTP parser's limits and
idle timeout, and a log that stays bounded when connections are refused or descriptors
run out.

Owns sockets and counts, not requests: what a request may do is the pipeline's business.
A refused connection is closed at once and counted; it never writes a log line of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .config import Config, ServerLimits
from .metrics import Metrics
from .net import NetworkSet, parse_address

log = logging.getLogger("gateway.listen")

BACKLOG = 1024
SUMMARY_SECONDS = 10.0
# Refusals handled per wake-up of the listener before other work gets the loop again.
_REFUSE_BATCH = 256
# Descriptors kept for everything that is not a client connection: upstream sockets,
# cache files, the sqlite index, logs. Each busy connection may hold a second one (the
# blob file or spool it is sent from), hence half of the rest.
_RESERVED = 128
_MAX_CONNECTIONS = 16384  # what one process on a small machine can usefully hold
_OUT_OF_RESOURCE = "socket.accept() out of system resource"
_LINGER_RESET = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT for a refusal
# The send buffer of a peer on this host (a TLS-terminating nginx or haproxy in front, a
# node-local client). The kernel sizes a loopback connection's at tcp_wmem's max (4 MiB
# here, from the first byte: autotuning follows a congestion window that loopback never
# limits), so each sendfile queues megabytes that the reader on the other core drains long
# after, at a third more CPU per byte than this (bench/ANALYSIS.md, "a small send buffer
# for local peers"). A path without a bandwidth-delay product needs no more; the kernel
# doubles it. Remote peers keep autotuning: a fixed buffer would cap each at buffer / RTT.
LOCAL_SEND_BUFFER = 128 << 10


def raise_descriptor_limit(wanted: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard one (as Go programs do at start),
    up to `wanted`; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else wanted


def max_connections(server: ServerLimits, descriptors: int) -> int:
    """The total cap: as configured, or derived from the descriptor limit."""
    if server.max_connections is not None:
        return server.max_connections
    return max(16, min(_MAX_CONNECTIONS, (descriptors - _RESERVED) // 2))


class _Summarised(logging.Filter):
    """Lets one record through per `seconds`, as one line saying how many it stands for
    (the traceback dropped): aiohttp logs each malformed request with a traceback, which
    a stranger could otherwise turn into a flood."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._seconds = seconds
        self._clock = clock
        self._last = -seconds
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self._held += 1
        now = self._clock()
        if now - self._last < self._seconds:
            return False
        reason = record.exc_info[1] if record.exc_info else None
        message = record.msg if isinstance(record.msg, str) else "error"
        if record.args:
            with contextlib.suppress(TypeError, ValueError):
                message = message % record.args
        record.msg = "%s (%d malformed or refused requests since the last report): %s"
        record.args = (message, self._held, " ".join(str(reason).split()))
        record.exc_info, record.exc_text, record.levelno = None, None, logging.WARNING
        record.levelname = "WARNING"
        self._last, self._held = now, 0
        return True


def handler_options(server: ServerLimits) -> dict[str, Any]:
    """aiohttp's request-handler options (AppRunner keywords) for `limits.server`.

    aiohttp 3.14 arms `keepalive_timeout` when a connection opens and after each answer,
    and closes the connection if no whole request head has arrived by then: one timer
    covers idle keep-alives and a slowloris dribbling its headers.
    """
    # A logger of the runner's own (not in logging's registry, so nothing is shared
    # between runners), under "gateway" for its handlers.
    quiet = logging.Logger("gateway.http")
    quiet.parent = logging.getLogger("gateway")
    quiet.addFilter(_Summarised(SUMMARY_SECONDS))
    return {"keepalive_timeout": server.idle_timeout, "max_line_size": server.max_request_line,
            "max_field_size": server.max_header_size, "max_headers": server.max_headers,
            "lingering_time": 2.0, "logger": quiet}


class ConnectionGuard:
    """Counts open client connections per address and in all; says which to refuse.

    The per-address cap (`limits.connections_per_ip`, exempt networks excepted) is read
    from `current()` on each accept, so a reload changes it; the total is fixed at start.
    """

    def __init__(self, current: Callable[[], Config], total: int, metrics: Metrics, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._current = current
        self.total = total
        self._metrics = metrics
        self._clock = clock
        self.open = 0
        self._per_address: dict[str, int] = {}
        self._exempt: tuple[Config | None, NetworkSet] = (None, NetworkSet())
        self._refused: Counter[str] = Counter()
        self._children: dict[str, Any] = {}
        self._summary: asyncio.TimerHandle | None = None
        self._reserve = _open_reserve()
        cap = current().limits.connections_per_ip
        log.info("accepting at most %d client connections, %s per address", total,
                 cap if cap is not None else "any number")

    def connections(self, address: str) -> int:
        return self._per_address.get(address, 0)

    def admit(self, address: str) -> bool:
        """Count a new connection from `address`, or refuse it (False, counted)."""
        if self.open >= self.total:
            self.refuse("connections_total")
            return False
        config = self._current()
        cap = config.limits.connections_per_ip
        held = self._per_address.get(address, 0)
        if cap is not None and held >= cap and not self._is_exempt(config, address):
            self.refuse("connections")
            return False
        self.open += 1
        self._per_address[address] = held + 1
        return True

    def release(self, address: str) -> None:
        self.open -= 1
        left = self._per_address.get(address, 1) - 1
        if left > 0:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)

    def _is_exempt(self, config: Config, address: str) -> bool:
        seen, networks = self._exempt
        if seen is not config:
            networks = NetworkSet(config.limits.exempt.networks)
            self._exempt = (config, networks)
        return address in networks

    def refuse(self, reason: str) -> None:
        """Count a refused connection; one summary line per SUMMARY_SECONDS at most."""
        child = self._children.get(reason)
        if child is None:
            child = self._children[reason] = self._metrics.refusals.labels("-", reason)
        child.inc()
        self._refused[reason] += 1
        if self._summary is None:
            self._summary = asyncio.get_running_loop().call_later(SUMMARY_SECONDS,
                                                                  self._log_summary)

    def _log_summary(self) -> None:
        self._summary = None
        refused, self._refused = self._refused, Counter()
        cap = self._current().limits.connections_per_ip
        log.warning("refused %d client connections in the last %g s (%s); open now: %d of "
                    "%d, per-address cap %s", sum(refused.values()), SUMMARY_SECONDS,
                    ", ".join(f"{reason}: {n}" for reason, n in sorted(refused.items())),
                    self.open, self.total, cap if cap is not None else "off")

    def shed_one(self, listener: socket.socket) -> bool:
        """Out of descriptors: give up the reserve to accept one waiting connection and
        reset it, so the backlog drains instead of the loop spinning on EMFILE. False if
        there is no reserve to give."""
        if self._reserve < 0:
            self._reserve = _open_reserve()
            return False
        os.close(self._reserve)
        self._reserve = -1
        try:
            fd, _address = listener._accept()  # type: ignore[attr-defined]
        except OSError:
            return False
        finally:
            self._reserve = _open_reserve()
        _reset(fd)
        self.refuse("descriptors")
        return True

    def close(self) -> None:
        if self._summary is not None:
            self._summary.cancel()
            self._log_summary()
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1


def is_loopback(host: str) -> bool:
    """`host` (as accept() gives it: IPv4, IPv6 or IPv4-mapped) is this host's loopback:
    127.0.0.0/8 or ::1."""
    address = parse_address(host)
    return address is not None and address.is_loopback


def _open_reserve() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _reset(fd: int) -> None:
    conn = socket.socket(fileno=fd)
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    conn.close()


class _Connection(socket.socket):
    """An accepted client socket that gives its place back when the transport closes it."""

    _guard: ConnectionGuard | None = None
    _address = ""

    def close(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.release(self._address)
        super().close()


class _Listener(socket.socket):
    """A listening socket whose accept() (called by asyncio's accept loop) refuses
    connections over a cap before any protocol, TLS handshake or log line exists."""

    guard: ConnectionGuard

    def accept(self) -> tuple[socket.socket, Any]:
        for _ in range(_REFUSE_BATCH):
            try:
                fd, address = self._accept()  # type: ignore[attr-defined]
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self.guard.shed_one(self):
                    continue
                raise  # BlockingIOError ends asyncio's batch; EMFILE pauses it for 1 s
            host = address[0] if isinstance(address, tuple) else str(address)
            if not self.guard.admit(host):
                _reset(fd)
                continue
            conn = _Connection(self.family, self.type, self.proto, fileno=fd)
            conn._guard, conn._address = self.guard, host
            if is_loopback(host):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_SEND_BUFFER)
            return conn, address
        raise BlockingIOError  # a flood: let other work run, the rest on the next wake-up


def listening_sockets(host: str | None, port: int, guard: ConnectionGuard, *,
                      backlog: int = BACKLOG) -> list[socket.socket]:
    """Bound, listening, guarded sockets for every address `host` resolves to."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[Any] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if address in seen:
                continue
            seen.add(address)
            sock = _Listener(family, kind, proto)
            sockets.append(sock)
            sock.guard = guard
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for made in sockets:
            made.close()
        raise
    return sockets


def guarded_sites(runner: web.BaseRunner, host: str | None, port: int,
                  guard: ConnectionGuard, **kwargs: Any) -> list[web.SockSite]:
    """aiohttp sites on guarded sockets (kwargs: ssl_context)."""
    return [web.SockSite(runner, sock, backlog=BACKLOG, **kwargs)
            for sock in listening_sockets(host, port, guard)]


def adopted_sites(runner: web.BaseRunner, sockets: tuple[socket.socket, ...],
                  guard: ConnectionGuard, **kwargs: Any) -> list[web.SockSite]:
    """aiohttp sites on listening sockets bound by another process (the supervisor of
    `serve --workers`), guarded like our own (kwargs: ssl_context)."""
    return [web.SockSite(runner, listener, backlog=BACKLOG, **kwargs)
            for listener in adopted_sockets(sockets, guard)]


def adopted_sockets(sockets: tuple[socket.socket, ...],
                    guard: ConnectionGuard) -> list[socket.socket]:
    """Listening sockets bound by another process, guarded like our own."""
    adopted: list[socket.socket] = []
    for sock in sockets:
        listener = _Listener(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.guard = guard
        listener.setblocking(False)
        adopted.append(listener)
    return adopted


def quiet_accept_errors(loop: asyncio.AbstractEventLoop,
                        clock: Callable[[], float] = time.monotonic) -> None:
    """asyncio logs "socket.accept() out of system resource" (with a traceback) each
    time accept fails with EMFILE: aggregate those into one line per SUMMARY_SECONDS.
    Every other loop error is handled as before."""
    previous = loop.get_exception_handler()
    state: dict[str, float] = {"count": 0, "last": -SUMMARY_SECONDS}

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != _OUT_OF_RESOURCE:
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        state["count"] += 1
        now = clock()
        if now - state["last"] >= SUMMARY_SECONDS:
            exc = context.get("exception")
            log.error("%s (%d times since the last report): %s; connections wait in the "
                      "backlog", _OUT_OF_RESOURCE, int(state["count"]), exc)
            state["count"], state["last"] = 0, now

    loop.set_exception_handler(handler)
