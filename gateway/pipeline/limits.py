"""The limits stage: per-client token buckets for requests, body bytes and upstream
misses (429 TOOMANYREQUESTS with Retry-After, or a paced transfer), and the refusal of
request bodies; plus the per-route pacer of upstream reads.

Decides and counts; the buckets' arithmetic is buckets.py, the bucket state outlives a
reload in `ClientLimits` (built once by the composition root). Never reads a body.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from ..buckets import Buckets, retry_after
from ..config import Config, Limits, Route
from ..errors import RegistryError
from ..metrics import Metrics
from ..net import NetworkSet
from ..state import AdmitMiss, Pace, RequestState

Sleep = Callable[[float], Awaitable[None]]
_EXEMPT_MEMO = 4096  # addresses whose exemption is remembered per config


class ClientLimits:
    """The buckets of every client and route, kept across config reloads (rates are read
    from the config of each request). `clock` is monotonic seconds; `sleep` waits."""

    def __init__(self, clock: Callable[[], float] | None = None,
                 sleep: Sleep = asyncio.sleep) -> None:
        now = clock or time.monotonic
        self.requests: Buckets[str] = Buckets(now)
        self.bytes: Buckets[str] = Buckets(now)
        self.misses: Buckets[tuple[str, str]] = Buckets(now)
        self.upstream: Buckets[str] = Buckets(now)
        self.sleep = sleep

    async def _pace(self, buckets: Buckets[str], key: str, rate: float, burst: float,
                    count: int) -> None:
        wait = buckets.borrow(key, rate, burst, count)
        if wait > 0:
            await self.sleep(wait)

    def client_pace(self, address: str, rate: float, burst: float) -> Pace:
        """Paces the bytes sent to one client address (all its transfers share the rate)."""
        return lambda count: self._pace(self.bytes, address, rate, burst, count)

    def upstream_pace(self, route: str, current: Callable[[], Config]) -> Pace:
        """Paces the bytes read from `route`'s upstream, across all its transfers, to the
        route's `limits.upstream_bytes_per_second` (read from `current()` each time)."""
        last: list[Config | None] = [None]
        cap: list[int | None] = [None]

        async def pace(count: int) -> None:
            config = current()
            if config is not last[0]:
                found = [r for r in config.routes if r.name == route]
                last[0] = config
                cap[0] = found[0].limits.upstream_bytes_per_second if found else None
            rate = cap[0]
            if rate is not None:
                # A small burst: the cap holds from the first second of a transfer.
                await self._pace(self.upstream, route, rate, min(rate, 1 << 20), count)

        return pace


@dataclass
class _Rules:
    """What the stage compiles from one config: who is exempt, memoised per address."""

    limits: Limits
    networks: NetworkSet
    idle: bool  # no per-client limit is set: the stage only refuses bodies
    piece: int = 0  # paced_piece of the byte rate, if there is one
    misses: dict[str, tuple[float, float] | None] = field(default_factory=dict)  # by route
    memo: dict[str, str | None] = field(default_factory=dict)
    paces: dict[str, Pace] = field(default_factory=dict)  # per client key, this config's rate

    def pace(self, limits: ClientLimits, key: str, rate: int, burst: int) -> Pace:
        """The client's byte pacer (one per client, not one per request)."""
        found = self.paces.get(key)
        if found is None:
            if len(self.paces) >= _EXEMPT_MEMO:
                self.paces.clear()
            found = self.paces[key] = limits.client_pace(key, rate, burst)
        return found

    def client(self, address: str, user: str | None) -> str | None:
        """The bucket key of a client (its address; an IPv6 client's /64, which one
        host commonly holds whole), or None when no limit applies to it."""
        if user is not None and user in self.limits.exempt.users:
            return None
        try:
            return self.memo[address]
        except KeyError:
            pass
        if len(self.memo) >= _EXEMPT_MEMO:
            self.memo.clear()
        key: str | None = None
        if address not in self.networks:
            key = address
            if ":" in address:
                key = _v6_client(address)
        self.memo[address] = key
        return key


def paced_piece(rate: int) -> int:
    """Bytes per paced send: about 1/32 s of the client's rate (a system call and a
    bucket check each), at least 256 KiB and at most 16 MiB: a high rate paced in small
    pieces cost a fifth of warm throughput."""
    return max(256 << 10, min(rate // 32, 16 << 20))


def _v6_client(address: str) -> str:
    try:
        parsed = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(ipaddress.IPv6Network((parsed, 64), strict=False))


def _refuse(metrics: Metrics, state: RequestState, reason: str, wait: float,
            message: str) -> RegistryError:
    reg = state.registry
    metrics.refusals.labels(reg.route.name if reg is not None else "-", reason).inc()
    state.rule = f"limits.{reason}"
    return RegistryError("TOOMANYREQUESTS", message, 429,
                         headers={"Retry-After": retry_after(wait)})


def _misses(route: Route, config: Limits) -> tuple[float, float] | None:
    """A route's upstream-miss budget: (per minute, burst), or None without one."""
    per_minute = route.limits.misses_per_minute or config.misses_per_minute
    if per_minute is None:
        return None
    return per_minute, route.limits.misses_burst or config.misses_burst


def _miss_gate(limits: ClientLimits, metrics: Metrics, state: RequestState, address: str,
               route: str, budget: tuple[float, float]) -> AdmitMiss:
    per_minute, burst = budget
    key = (address, route)

    def admit() -> None:
        wait = limits.misses.take(key, per_minute / 60.0, burst)
        if wait:
            raise _refuse(metrics, state, "misses", wait,
                          f"too many requests for images not in this mirror's cache from "
                          f"your address ({per_minute:g} a minute); cached images are "
                          "still served")

    return admit


def limits_step(limits: ClientLimits,
                metrics: Metrics) -> Callable[[web.Request, RequestState], None]:
    """The stage (run by `admit` with the request's config): refuses (raises) or sets
    the client's pace and miss budget on the request state."""
    compiled: list[tuple[Config, _Rules]] = []

    def rules(config: Config) -> _Rules:
        if not compiled or compiled[0][0] is not config:
            settings = config.limits
            idle = settings.requests_per_second is None and \
                settings.bytes_per_second is None and settings.misses_per_minute is None \
                and not any(r.limits.misses_per_minute for r in config.routes)
            rate = settings.bytes_per_second
            compiled[:] = [(config, _Rules(
                settings, NetworkSet(settings.exempt.networks), idle,
                paced_piece(rate) if rate is not None else 0,
                {route.name: _misses(route, settings) for route in config.routes}))]
        return compiled[0][1]

    def limit(request: web.Request, state: RequestState) -> None:
        if request.body_exists:
            # A read-only mirror reads no bodies: refused from the headers, unread.
            metrics.refusals.labels("-", "body").inc()
            state.rule = "limits.body"
            raise RegistryError("UNSUPPORTED", "this registry mirror is read-only and "
                                "takes no request bodies", 413)
        found = rules(state.config)
        if found.idle:
            return
        address = found.client(request.remote or "-", state.user)
        if address is None:  # exempt
            return
        settings = found.limits
        if settings.requests_per_second is not None:
            wait = limits.requests.take(address, settings.requests_per_second,
                                        settings.requests_burst)
            if wait:
                raise _refuse(metrics, state, "rate", wait,
                              f"too many requests from your address (more than "
                              f"{settings.requests_per_second:g} a second)")
        if settings.bytes_per_second is not None:
            state.pace = found.pace(limits, address, settings.bytes_per_second,
                                    settings.bytes_burst)
            state.pace_piece = found.piece
        reg = state.registry
        if reg is not None:
            try:
                budget = found.misses[reg.route.name]
            except KeyError:  # a route the config does not list (the forward proxy's)
                budget = _misses(reg.route, settings)
            if budget is not None:
                state.admit_miss = _miss_gate(limits, metrics, state, address,
                                              reg.route.name, budget)

    return limit
