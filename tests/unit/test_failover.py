"""Upstream calls over fallbacks, breakers, retries and time budgets, against in-process
fake registries: what reaches which upstream, what the client gets, what is counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from yarl import URL

from gateway.config import Credentials
from gateway.config.resilience import BreakerSettings, Retries, Timeouts
from gateway.errors import UpstreamError
from gateway.metrics import Metrics
from gateway.upstream import Upstream
from tests.support.clock import Clock
from tests.support.fake_registry import image_manifest
from tests.support.faults import Fault, rate_limited, unavailable
from tests.support.net import free_port

from .conftest import Served, make_route

REPO = "owner/img"
PATH = f"/v2/{REPO}/manifests/v1"
Registry = Callable[..., Awaitable[Served]]
UpstreamFor = Callable[..., Awaitable[Upstream]]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"route": "fake.test", **labels})
    return 0.0 if value is None else value


async def get(upstream: Upstream, path: str = PATH) -> tuple[int, bytes]:
    resp = await upstream.request("GET", path, kind="manifest", repository=REPO)
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


async def failure(upstream: Upstream, path: str = PATH, method: str = "GET") -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        resp = await upstream.request(method, path, kind="manifest", repository=REPO)
        resp.release()
    return caught.value


async def seeded(registry: Registry, **kwargs: Any) -> tuple[Served, bytes]:
    served = await registry(**kwargs)
    body = image_manifest(b"layer")
    served.fake.add_manifest(REPO, body, tag="v1")
    return served, body


FAST = Retries(attempts=3, backoff=0.01, max_backoff=0.05)


async def test_two_503s_then_success_is_one_success_with_two_retries(
        registry: Registry, upstream_for: UpstreamFor) -> None:
    served, body = await seeded(registry)
    served.fake.queue("GET", PATH, unavailable(503), unavailable(503))
    metrics = Metrics()
    upstream = await upstream_for(make_route(served.url, retries=FAST), metrics=metrics)
    assert await get(upstream) == (200, body)
    assert served.fake.count("GET", PATH) == 3
    assert sample(metrics, "gateway_upstream_retries_total", reason="down") == 2
    assert served.fake.pending() == []


@pytest.mark.parametrize("status", [404, 401, 403, 400])
async def test_a_4xx_is_never_retried_nor_sent_to_a_fallback(
        registry: Registry, upstream_for: UpstreamFor, status: int) -> None:
    primary, _ = await seeded(registry)
    mirror, _ = await seeded(registry)
    primary.fake.respond("GET", PATH, status)
    metrics = Metrics()
    upstream = await upstream_for(make_route(primary.url, retries=FAST,
                                             fallbacks=(URL(mirror.url),)), metrics=metrics)
    error = await failure(upstream)
    assert error.upstream_status == status
    assert primary.fake.count("GET", PATH) == 1
    assert mirror.fake.count() == 0
    assert sample(metrics, "gateway_upstream_retries_total", reason="down") == 0


async def test_429_with_rate_limit_headers_is_handed_on_and_without_them_retried(
        registry: Registry, upstream_for: UpstreamFor) -> None:
    served, body = await seeded(registry)
    limited = Fault(status=429, headers={"ratelimit-limit": "100;w=21600",
                                         "ratelimit-remaining": "0;w=21600"})
    served.fake.queue("GET", PATH, limited)
    metrics = Metrics()
    upstream = await upstream_for(make_route(served.url, retries=FAST), metrics=metrics)
    assert (await failure(upstream)).status == 429
    assert served.fake.count("GET", PATH) == 1
    # That account is now out until its window resets (accounts.py): no more tries at all.
    assert (await failure(upstream)).status == 429
    assert served.fake.count("GET", PATH) == 1
    fresh = await upstream_for(make_route(served.url, retries=FAST), metrics=metrics)
    # An abuse limit backs the whole upstream off for its Retry-After (accounts.py); the
    # retry waits that long (failover.py) and then goes through.
    served.fake.queue("GET", PATH, rate_limited("1"))
    assert await get(fresh) == (200, body)
    assert served.fake.count("GET", PATH) == 3
    assert sample(metrics, "gateway_upstream_retries_total", reason="busy") == 1


async def test_the_primary_refusing_connections_falls_back_without_credentials(
        registry: Registry, upstream_for: UpstreamFor) -> None:
    mirror, body = await seeded(registry)
    dead = f"http://127.0.0.1:{free_port()}"
    metrics = Metrics()
    route = make_route(dead, fallbacks=(URL(mirror.url),), retries=FAST,
                       credentials=Credentials("user", "s3cret"))
    upstream = await upstream_for(route, metrics=metrics)
    assert await get(upstream) == (200, body)
    assert sample(metrics, "gateway_upstream_fallbacks_total", upstream=mirror.url) == 1
    assert all("Authorization" not in seen.headers for seen in mirror.fake.seen()), (
        "the route's credentials went to a fallback")


async def test_fallback_on_5xx_and_the_breaker_skips_then_probes_the_primary(
        registry: Registry, upstream_for: UpstreamFor) -> None:
    primary, body = await seeded(registry)
    mirror, _ = await seeded(registry)
    primary.fake.respond("GET", PATH, 503)
    clock = Clock()
    metrics = Metrics()
    route = make_route(primary.url, fallbacks=(URL(mirror.url),), retries=Retries(attempts=1),
                       breaker=BreakerSettings(failures=2, cooldown=30))
    upstream = await upstream_for(route, metrics=metrics, clock=clock)

    def state(url: str) -> float:
        return sample(metrics, "gateway_upstream_breaker_state", upstream=url)

    for _ in range(2):
        assert await get(upstream) == (200, body)
    assert (state(primary.url), state(mirror.url)) == (1, 0)
    assert sample(metrics, "gateway_upstream_breaker_opens_total", upstream=primary.url) == 1
    asked = primary.fake.count("GET", PATH)
    assert await get(upstream) == (200, body)  # the open breaker: straight to the mirror
    assert primary.fake.count("GET", PATH) == asked
    assert mirror.fake.count("GET", PATH) == 3
    assert sample(metrics, "gateway_upstream_fallbacks_total", upstream=mirror.url) == 3

    primary.fake.overrides.clear()  # the primary is back
    clock.advance(31)
    assert await get(upstream) == (200, body)  # the probe goes to the primary and closes it
    assert primary.fake.count("GET", PATH) == asked + 1
    assert mirror.fake.count("GET", PATH) == 3
    assert state(primary.url) == 0


async def test_every_breaker_open_fails_fast(registry: Registry,
                                             upstream_for: UpstreamFor) -> None:
    served, _ = await seeded(registry)
    served.fake.respond("GET", PATH, 500)
    route = make_route(served.url, retries=Retries(attempts=1),
                       breaker=BreakerSettings(failures=1, cooldown=60))
    upstream = await upstream_for(route)
    assert (await failure(upstream)).upstream_status == 500
    started = time.monotonic()
    error = await failure(upstream)
    assert time.monotonic() - started < 0.5
    assert (error.status, error.retryable) == (502, True)
    assert "circuit breaker open" in error.message and error.headers["Retry-After"] == "60"
    assert served.fake.count("GET", PATH) == 1


async def test_a_hung_manifest_request_costs_at_most_the_headers_timeout(
        registry: Registry, upstream_for: UpstreamFor) -> None:
    served, _ = await seeded(registry)
    served.fake.always("GET", PATH, Fault(delay=30))  # accepts, never answers in time
    route = make_route(served.url, timeouts=Timeouts(connect=1, headers=0.5, stall=5),
                       retries=Retries(attempts=3, backoff=0.01))
    upstream = await upstream_for(route, read_timeout=None)
    started = time.monotonic()
    error = await failure(upstream)
    took = time.monotonic() - started
    assert (error.status, error.retryable) == (504, True)
    assert took < 2.0, f"waited {took:.1f}s for a 0.5s headers timeout"
    # The budget is spent: no retry that would make the client wait longer.
    assert served.fake.count("GET", PATH) == 1


async def test_concurrent_callers_during_a_probe_use_the_fallback(
        registry: Registry, upstream_for: UpstreamFor) -> None:
    primary, body = await seeded(registry)
    mirror, _ = await seeded(registry)
    primary.fake.respond("GET", PATH, 503)
    clock = Clock()
    route = make_route(primary.url, fallbacks=(URL(mirror.url),), retries=Retries(attempts=1),
                       breaker=BreakerSettings(failures=1, cooldown=5))
    upstream = await upstream_for(route, clock=clock)
    assert await get(upstream) == (200, body)  # primary 503 -> open; mirror answers
    primary.fake.overrides.clear()
    primary.fake.always("GET", PATH, Fault(delay=0.5))  # the probe takes a while
    clock.advance(6)
    results = await asyncio.gather(*(get(upstream) for _ in range(5)))
    assert results == [(200, body)] * 5
    assert primary.fake.count("GET", PATH) == 2, "one probe, not five"
