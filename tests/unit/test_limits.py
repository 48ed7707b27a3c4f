"""Limits without sockets where possible: the token buckets on an injected clock, the
`limits:` keys and their errors (file, line, key), the per-route upstream bandwidth cap
(bytes over fake time, through a real blob fetch), the 429s of the stage, and the
aggregation of asyncio's accept errors.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.buckets import Buckets, retry_after
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.listen import (
    LOCAL_SEND_BUFFER,
    ConnectionGuard,
    handler_options,
    is_loopback,
    listening_sockets,
    max_connections,
    quiet_accept_errors,
)
from gateway.metrics import Metrics
from gateway.pipeline import ClientLimits
from gateway.server import MAX_LINE, METRICS, create_app
from tests.support.fake_registry import FakeRegistry, fake_routes
from tests.support.served import GatewayTestServer

from .conftest import config_text


class FakeTime:
    """A clock and a sleep that moves it: pacing costs no real time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        await asyncio.sleep(0)


# ---------------------------------------------------------------- buckets


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = FakeTime()
    buckets: Buckets[str] = Buckets(clock)
    assert [buckets.take("a", 2.0, 5) for _ in range(5)] == [0.0] * 5
    wait = buckets.take("a", 2.0, 5)
    assert wait == pytest.approx(0.5)
    assert retry_after(wait) == "1"
    clock.now += 0.5
    assert buckets.take("a", 2.0, 5) == 0.0
    assert buckets.take("a", 2.0, 5) > 0
    # Over 10 s of asking every 10 ms, the rate holds: 2 a second.
    allowed = 0
    for _ in range(1000):
        clock.now += 0.01
        allowed += buckets.take("a", 2.0, 5) == 0.0
    assert allowed == pytest.approx(20, abs=1)
    # Another key has its own bucket.
    assert buckets.take("b", 2.0, 5) == 0.0


def test_retry_after_is_whole_seconds_from_the_bucket() -> None:
    clock = FakeTime()
    buckets: Buckets[str] = Buckets(clock)
    assert buckets.take("a", 0.1, 1) == 0.0
    wait = buckets.take("a", 0.1, 1)  # one token a 10 s
    assert wait == pytest.approx(10.0)
    assert retry_after(wait) == "10"
    assert retry_after(0.01) == "1"
    assert retry_after(float("inf")) == "3600"


def test_borrowing_paces_shared_transfers_to_the_rate() -> None:
    clock = FakeTime()
    buckets: Buckets[str] = Buckets(clock)
    assert buckets.borrow("ip", 1000.0, 500, 500) == 0.0  # the burst
    # Two transfers take turns: each waits for its own debt, together they get the rate.
    first = buckets.borrow("ip", 1000.0, 500, 1000)
    second = buckets.borrow("ip", 1000.0, 500, 1000)
    assert (first, second) == (pytest.approx(1.0), pytest.approx(2.0))


def test_buckets_stay_bounded_and_forget_only_what_refilled() -> None:
    clock = FakeTime()
    buckets: Buckets[int] = Buckets(clock, max_entries=100)
    for key in range(99):
        buckets.take(key, 1.0, 1)
    buckets.borrow(-1, 1.0, 1, 1000)  # deep in debt: must be remembered
    assert len(buckets) == 100
    clock.now += 0.5  # nothing refilled: a flood of new keys drops the oldest half
    buckets.take(1000, 1.0, 1)
    assert len(buckets) <= 76
    clock.now += 10  # all but the debtor refilled: the next sweep forgets all of them
    for key in range(2000, 2060):
        buckets.take(key, 1.0, 1)
    assert len(buckets) == 61  # the 60 new ones and the debtor
    assert buckets.take(-1, 1.0, 1) > 900  # the debtor's debt survived the sweeps
    for key in range(10_000):
        buckets.take(key, 1.0, 1)
        assert len(buckets) <= 100


# ---------------------------------------------------------------- config


def load(text: str) -> Any:
    return load_config(text, "routes.yaml", env={})


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return caught.value


def test_limits_defaults_are_generous_and_exempt_loopback() -> None:
    limits = load("routes: {ghcr.io: {}}").limits
    assert limits.requests_per_second == 100 and limits.requests_burst == 500
    assert limits.bytes_per_second is None  # serving bytes is the job: off unless set
    assert limits.misses_per_minute == 120 and limits.connections_per_ip == 128
    assert [str(n) for n in limits.exempt.networks] == ["127.0.0.0/8", "::1/128"]
    assert limits.server.idle_timeout == 30 and limits.server.max_request_line == MAX_LINE


def test_limits_keys_parse() -> None:
    config = load("""
routes:
  docker.io:
    upstream: http://127.0.0.1:1
    limits: {upstream_bytes_per_second: 20MB/s, misses_per_minute: 10}
limits:
  requests_per_second: 5
  bytes_per_second: 1MiB
  misses_per_minute: off
  connections_per_ip: off
  exempt: [10.0.0.0/8, 192.0.2.1, ci-bot]
  server: {idle_timeout: 5s, max_connections: 100, max_headers: 32}
""")
    limits = config.limits
    assert (limits.requests_per_second, limits.bytes_per_second) == (5.0, 1 << 20)
    assert limits.misses_per_minute is None and limits.connections_per_ip is None
    assert limits.exempt.users == {"ci-bot"} and len(limits.exempt.networks) == 2
    assert (limits.server.idle_timeout, limits.server.max_connections) == (5.0, 100)
    route = config.route("docker.io").limits
    assert (route.upstream_bytes_per_second, route.misses_per_minute) == (20_000_000, 10.0)
    assert load("routes: {ghcr.io: {}}\nlimits: {exempt: null}").limits.exempt.networks == ()


@pytest.mark.parametrize(("text", "line", "key", "says"), [
    ("limits:\n  requests_per_second: fast\n", 3, "limits.requests_per_second", "rate"),
    ("limits:\n  requests_burst: 0\n", 3, "limits.requests_burst", "count"),
    ("limits:\n  bytes_per_second: 10 parsecs\n", 3, "limits.bytes_per_second", "bandwidth"),
    ("limits:\n  bytes_per_second: 10\n", 3, "limits.bytes_per_second", "too little"),
    ("limits:\n  exempt:\n    - 10.0.0.0/8\n    - 10.0.0.0/33\n", 5, "limits.exempt[1]",
     "neither a network"),
    ("limits:\n  bogus: 1\n", 3, "limits.bogus", "valid keys"),
    ("limits:\n  server:\n    idle_timeout: soon\n", 4, "limits.server.idle_timeout",
     "duration"),
    ("limits:\n  server:\n    bogus: 1\n", 4, "limits.server.bogus", "valid keys"),
    ("limits: 5\n", 2, "limits", "mapping"),
])
def test_limits_errors_name_file_line_and_key(text: str, line: int, key: str,
                                              says: str) -> None:
    error = error_of("routes: {ghcr.io: {}}\n" + text)
    assert (error.file, error.line, error.key) == ("routes.yaml", line, key), str(error)
    assert says in str(error)


def test_route_limits_errors_name_the_route_key() -> None:
    error = error_of("routes:\n  ghcr.io:\n    limits:\n      upstream_bytes_per_second: x\n")
    assert (error.line, error.key) == (4, "routes.ghcr.io.limits.upstream_bytes_per_second")
    error = error_of("routes:\n  ghcr.io:\n    limits:\n      requests_per_second: 1\n")
    assert error.key == "routes.ghcr.io.limits.requests_per_second"
    assert "upstream_bytes_per_second" in str(error)


def test_listener_options_and_the_derived_connection_cap() -> None:
    server = load("routes: {ghcr.io: {}}\nlimits: {server: {max_headers: 10}}").limits.server
    options = handler_options(server)
    assert options["keepalive_timeout"] == 30 and options["max_headers"] == 10
    assert options["max_line_size"] == MAX_LINE
    assert max_connections(server, 1024) == 448  # room left for files, upstreams, sqlite
    assert max_connections(server, 1 << 20) == 16384
    fixed = load("routes: {ghcr.io: {}}\nlimits: {server: {max_connections: 7}}")
    assert max_connections(fixed.limits.server, 1024) == 7


# ---------------------------------------------------------------- connection guard


async def test_the_guard_caps_per_address_and_in_all(caplog: pytest.LogCaptureFixture) -> None:
    config = load("routes: {ghcr.io: {}}\nlimits: {connections_per_ip: 2, exempt: [10.0.0.9]}")
    metrics = Metrics()
    guard = ConnectionGuard(lambda: config, 5, metrics)
    assert [guard.admit("10.0.0.1") for _ in range(3)] == [True, True, False]
    assert [guard.admit("10.0.0.9") for _ in range(3)] == [True] * 3  # exempt address
    assert not guard.admit("10.0.0.2")  # the total cap: 5 open
    guard.release("10.0.0.1")
    assert guard.admit("10.0.0.2") and guard.open == 5
    caplog.set_level(logging.WARNING, "gateway.listen")
    guard.close()  # flushes the summary
    assert metrics.registry.get_sample_value(
        "gateway_refusals_total", {"route": "-", "reason": "connections"}) == 1
    assert metrics.registry.get_sample_value(
        "gateway_refusals_total", {"route": "-", "reason": "connections_total"}) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "refused 2 client connections" in lines[0]


@pytest.mark.parametrize(("host", "local"), [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("2001:db8::1", False),
    ("::2", False), ("1.127.0.0", False)])
def test_loopback_peers_are_told_apart(host: str, local: bool) -> None:
    assert is_loopback(host) is local


def test_a_local_peer_gets_a_small_send_buffer() -> None:
    config = load("routes: {ghcr.io: {}}")
    listener = listening_sockets("127.0.0.1", 0, ConnectionGuard(lambda: config, 5, Metrics()))[0]
    with listener, socket.create_connection(listener.getsockname()[:2]):
        listener.setblocking(True)
        accepted, _ = listener.accept()
        with accepted:
            got = accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert got == 2 * LOCAL_SEND_BUFFER  # Linux doubles what is set (bookkeeping)


async def test_accept_errors_are_logged_once_per_window(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    clock = FakeTime()
    old = loop.get_exception_handler()
    seen: list[str] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context["message"]))
    try:
        quiet_accept_errors(loop, clock)
        caplog.set_level(logging.ERROR, "gateway.listen")
        for _ in range(5000):
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(24, "Too many open files")})
        clock.now += 11
        loop.call_exception_handler({"message": "socket.accept() out of system resource"})
        loop.call_exception_handler({"message": "something else"})
    finally:
        loop.set_exception_handler(old)
    assert len(caplog.records) == 2
    assert "(4999 times" in caplog.records[1].getMessage() or \
        "(5000 times" in caplog.records[1].getMessage()
    assert seen == ["something else"]  # other errors reach the handler as before


# ---------------------------------------------------------------- through the app


async def _serve(app: Any) -> TestClient[Any, Any]:
    server = GatewayTestServer(app)
    await server.start_server(max_line_size=MAX_LINE, max_field_size=MAX_LINE)
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    return client


async def test_the_route_upstream_bandwidth_cap_paces_fetches(tmp_path: Path) -> None:
    """Three cold blobs fetched at once through a route capped at 1 MB/s: the bytes the
    upstream sent over (fake) time hold the cap, all fetches together."""
    fake = FakeRegistry()
    blobs = [bytes([i]) * (3 << 20) for i in range(3)]
    digests = [fake.add_blob(blob) for blob in blobs]
    upstream = await _serve(fake.make_app())
    routes = fake_routes(str(upstream.make_url("")).rstrip("/"),
                         limits={"upstream_bytes_per_second": "1MB/s"})
    config = load(config_text(routes["routes"], default_route=routes["default_route"]))
    time = FakeTime()
    app = create_app(config, tmp_path / "data", limits=ClientLimits(time, time.sleep))
    gateway = await _serve(app)
    try:
        started = time.now
        answers = await asyncio.gather(*(gateway.get(f"/v2/some/app/blobs/{d}")
                                         for d in digests))
        bodies = [await answer.read() for answer in answers]
        assert bodies == blobs
        elapsed = time.now - started
        total = sum(map(len, blobs))
        # 9.4 MB at 1 MB/s, less the first second's burst: within 10%.
        assert elapsed == pytest.approx((total - 1e6) / 1e6, rel=0.1)
        # A cached blob is served without touching the upstream (or its cap).
        before = time.now
        again = await gateway.get(f"/v2/some/app/blobs/{digests[0]}")
        assert await again.read() == blobs[0] and time.now == before
    finally:
        await gateway.close()
        await upstream.close()


async def test_over_the_request_rate_is_429_with_retry_after(tmp_path: Path) -> None:
    fake = FakeRegistry()
    upstream = await _serve(fake.make_app())
    routes = fake_routes(str(upstream.make_url("")).rstrip("/"))
    config = load(config_text(routes["routes"], default_route=routes["default_route"],
                              limits={"requests_per_second": 1, "requests_burst": 3,
                                      "exempt": ["ci-bot"]}))
    time = FakeTime()
    app = create_app(config, tmp_path / "data", limits=ClientLimits(time, time.sleep))
    gateway = await _serve(app)
    try:
        statuses = [(await gateway.get("/v2/")).status for _ in range(3)]
        refused = await gateway.get("/v2/")
        assert statuses == [200] * 3 and refused.status == 429
        assert refused.headers["Retry-After"] == "1"
        body = await refused.json()
        assert body["errors"][0]["code"] == "TOOMANYREQUESTS"
        time.now += 1
        assert (await gateway.get("/v2/")).status == 200
        metrics = app[METRICS]
        assert metrics.registry.get_sample_value(
            "gateway_refusals_total", {"route": "-", "reason": "rate"}) == 1
        # A body is refused before anything reads it, with an OCI error.
        posted = await gateway.request("GET", "/v2/", data=b"x" * 100)
        assert posted.status == 413
        assert (await posted.json())["errors"][0]["code"] == "UNSUPPORTED"
    finally:
        await gateway.close()
        await upstream.close()
