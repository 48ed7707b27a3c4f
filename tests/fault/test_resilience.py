"""A failing upstream (issue #11, points 3, 5, 6): fallbacks and the circuit breaker,
stale-while-revalidate, and a hung upstream (SIGSTOP of a real docker-registry, a fake
that stops sending mid-blob) costing cached pulls nothing and uncached ones a bound.

Time is the gateway's injected clock (TTLs, breaker cool-downs); where a test measures a
wait, it counts the answers that arrived before a generous deadline.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.client import Response, raw_request
from tests.support.fake_registry import RunningFake, fake_routes
from tests.support.faults import Fault
from tests.support.images import ACCEPT_ALL_MANIFESTS, Image, make_image, sha256_digest
from tests.support.inprocess import InProcessGateway
from tests.support.net import free_port
from tests.support.proxy import CountingProxy
from tests.support.transfers import FIRST_RANGE, stream_get
from tests.support.upstreams import Upstream, unique_repository
from tests.support.wait import wait_for

pytestmark = pytest.mark.fault

StartGateway = Callable[..., InProcessGateway]
StartUpstream = Callable[..., Upstream]


def get(gateway: InProcessGateway, target: str, method: str = "GET") -> Response:
    return raw_request(gateway.host, gateway.port, method, target,
                       headers={"Accept": ACCEPT_ALL_MANIFESTS}, timeout=30)


def metric(gateway: InProcessGateway, name: str, **labels: str) -> float:
    """One sample from the gateway's /metrics (0 if absent)."""
    text = get(gateway, "/metrics").body.decode()
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)\{(.*)\} (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0


def pull(gateway: InProcessGateway, repository: str, tag: str, image: Image) -> str:
    """Tag, manifest by digest and every blob through the gateway; the tag's X-Cache."""
    by_tag = get(gateway, f"/v2/{repository}/manifests/{tag}")
    assert by_tag.status == 200, by_tag.body[:300]
    assert by_tag.header("Docker-Content-Digest") == image.digest
    by_digest = get(gateway, f"/v2/{repository}/manifests/{image.digest}")
    assert by_digest.status == 200 and by_digest.body == image.manifest.data
    for blob in image.blobs:
        got = get(gateway, f"/v2/{repository}/blobs/{blob.digest}")
        assert got.status == 200 and sha256_digest(got.body) == blob.digest
    return by_tag.header("X-Cache") or ""


# -- fallbacks and the breaker -----------------------------------------------------------


def test_primary_down_then_failing_pulls_go_to_the_secondary_and_it_is_probed_back(
        start_upstream: StartUpstream, start_inprocess_gateway: StartGateway) -> None:
    secondary = start_upstream("docker.io")  # a real docker-registry behind a counting proxy
    repository = unique_repository("fallback")
    tags = ("down", "failing", "back", "after")
    image = secondary.push(repository, make_image(layer_sizes=(4096,)), tags=tags)
    # The primary: a second counting proxy in front of the same registry, on a port that
    # is closed at first.
    primary = CountingProxy(secondary.registry.url)
    primary.server.port = free_port()
    primary_url = f"http://127.0.0.1:{primary.server.port}"
    try:
        gateway = start_inprocess_gateway({"default_route": "docker.io", "routes": {
            "docker.io": {"upstream": primary_url, "fallbacks": [secondary.url],
                          "breaker": {"failures": 2, "cooldown": "30s"}}}})

        def state() -> float:
            return metric(gateway, "gateway_upstream_breaker_state", route="docker.io",
                          upstream=primary_url)

        def opens() -> float:
            return metric(gateway, "gateway_upstream_breaker_opens_total", route="docker.io",
                          upstream=primary_url)

        # 1. Connection refused: everything comes from the secondary; the breaker opens.
        assert pull(gateway, repository, "down", image) == "MISS"
        assert (state(), opens()) == (1, 1)
        used = metric(gateway, "gateway_upstream_fallbacks_total", route="docker.io",
                      upstream=secondary.url)
        assert used == 1 + len(image.blobs)  # the tag and each blob (by digest: a hit)
        assert secondary.proxy.requests_for(repository)

        # 2. The primary answers 503: after the cool-down one probe, which fails; the pull
        # is still served by the secondary and the breaker opens again.
        primary.fail_status = 503
        primary.start()
        gateway.clock.advance(31)
        assert get(gateway, f"/v2/{repository}/manifests/failing").status == 200
        assert [s.status for s in primary.requests_for(repository)] == [503]
        assert (state(), opens()) == (1, 2)
        assert get(gateway, f"/v2/{repository}/manifests/failing").status == 200  # cached

        # 3. The primary is back: the next probe succeeds and closes the breaker; then the
        # secondary is asked no more.
        primary.fail_status = None
        gateway.clock.advance(31)
        assert get(gateway, f"/v2/{repository}/manifests/back").status == 200
        assert state() == 0
        asked = len(secondary.proxy.requests_for(repository))
        assert get(gateway, f"/v2/{repository}/manifests/after").status == 200
        assert len(secondary.proxy.requests_for(repository)) == asked
        assert [s.status for s in primary.requests_for(repository)] == [503, 200, 200]
    finally:
        primary.stop()


# -- stale-while-revalidate --------------------------------------------------------------


def test_stale_while_revalidate_answers_without_a_round_trip_before_the_response(
        start_upstream: StartUpstream, start_inprocess_gateway: StartGateway) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("swr")
    old = upstream.push(repository, make_image(layer_sizes=(4096,)), tags=("v1",))
    gateway = start_inprocess_gateway({"default_route": "docker.io", "routes": {
        "docker.io": {"upstream": upstream.url, "tag_ttl": "60s",
                      "stale_while_revalidate": "1h"}}})
    assert pull(gateway, repository, "v1", old) == "MISS"
    new = upstream.push(repository, make_image(layer_sizes=(4096,)), tags=("v1",))
    path = f"/v2/{repository}/manifests/v1"
    released = threading.Event()

    async def held_head(request: web.Request) -> web.StreamResponse:
        # The HEAD waits here, at the proxy, until the test has its answer.
        while not released.is_set():  # noqa: ASYNC110 - a threading.Event
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as session, session.head(
                upstream.registry.url + path, headers={"Accept": ACCEPT_ALL_MANIFESTS}) as resp:
            keep = ("Docker-Content-Digest", "Content-Type", "Content-Length")
            return web.Response(status=resp.status,
                                headers={k: resp.headers[k] for k in keep if k in resp.headers})

    upstream.proxy.queue("HEAD", path, held_head)
    asked = len(upstream.proxy.manifest_requests(repository))
    gateway.clock.advance(61)
    try:
        answer = get(gateway, path)
        assert answer.status == 200 and answer.body == old.manifest.data
        assert answer.header("X-Cache") == "STALE"
        # Answered while its revalidation is held before reaching the registry.
        wait_for(lambda: len(upstream.proxy.manifest_requests(repository)) == asked + 1,
                 what="the background HEAD at the proxy")
        # ... which the proxy holds, unanswered (status 0), away from the registry.
        assert [s.status for s in upstream.proxy.manifest_requests(repository)[asked:]] == [0]
        again = get(gateway, path)  # a second client: still at once, no second HEAD
        assert again.header("X-Cache") == "STALE"
        assert len(upstream.proxy.manifest_requests(repository)) == asked + 1
    finally:
        released.set()
    wait_for(lambda: metric(gateway, "gateway_tag_revalidations_total", route="docker.io",
                            result="changed") == 1, what="the revalidation to learn the change")
    now = get(gateway, path)
    assert (now.header("X-Cache"), now.body) == ("HIT", new.manifest.data)
    assert metric(gateway, "gateway_cache_requests_total", route="docker.io", kind="tag",
                  result="stale") == 2


# -- a hung upstream ---------------------------------------------------------------------


@contextmanager
def frozen(upstream: Upstream) -> Iterator[None]:
    """SIGSTOP the registry process: it keeps accepting connections, never answers."""
    process = upstream.registry.process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


async def answered_within(gateway: InProcessGateway, paths: list[str], seconds: float
                          ) -> list[tuple[int, str]]:
    """(status, X-Cache) of each request that was answered within `seconds`."""
    async with aiohttp.ClientSession() as session:

        async def one(path: str) -> tuple[int, str]:
            async with session.get(gateway.url() + path,
                                   headers={"Accept": ACCEPT_ALL_MANIFESTS}) as resp:
                await resp.read()
                return resp.status, resp.headers.get("X-Cache", "")

        tasks = [asyncio.ensure_future(one(path)) for path in paths]
        done, pending = await asyncio.wait(tasks, timeout=seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return [task.result() for task in done if task.exception() is None]


@pytest.mark.parametrize("swr", ["off", "1h"])
async def test_a_frozen_upstream_costs_cached_tags_nothing(
        start_upstream: StartUpstream, start_inprocess_gateway: StartGateway, swr: str) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("frozen")
    tags = tuple(f"t{i}" for i in range(20))
    upstream.push(repository, make_image(layer_sizes=(4096,)), tags=(*tags, "uncached"))
    headers_timeout = 2.0
    gateway = start_inprocess_gateway({"default_route": "docker.io", "routes": {
        "docker.io": {"upstream": upstream.url, "tag_ttl": "60s", "stale_while_revalidate": swr,
                      "timeouts": {"connect": "1s", "headers": f"{headers_timeout:g}s"},
                      "breaker": {"failures": 3, "cooldown": "5m"}}}})
    paths = [f"/v2/{repository}/manifests/{tag}" for tag in tags]
    for path in paths:
        assert get(gateway, path).header("X-Cache") == "MISS"
    gateway.clock.advance(61)
    with frozen(upstream):
        # Without stale-while-revalidate the first look at each tag pays at most the
        # headers timeout, all at once (not one after the other); with it, nothing.
        first_bound = 1.5 + (headers_timeout if swr == "off" else 0.0)
        first = await answered_within(gateway, paths, first_bound)
        assert len(first) == 20, f"{len(first)} of 20 tags answered within {first_bound}s"
        assert set(first) == {(200, "STALE")}
        # The breaker is open now (or SWR answers): cached tags answer at once.
        if swr == "off":
            assert metric(gateway, "gateway_upstream_breaker_state", route="docker.io",
                          upstream=upstream.url) == 1
        second = await answered_within(gateway, paths, 1.5)
        assert len(second) == 20 and set(second) == {(200, "STALE")}
        # An uncached tag cannot be served: a clear error, fast once the breaker is open.
        missing = await answered_within(
            gateway, [f"/v2/{repository}/manifests/uncached"], headers_timeout + 1.5)
        assert len(missing) == 1 and missing[0][0] in (502, 504)


BLOB = 4 << 20


@pytest.mark.parametrize("case", ["resumed", "504-after-resumes", "504-before-headers"])
async def test_a_blob_whose_upstream_stops_sending_resumes_or_fails_within_the_bound(
        fake_upstream: RunningFake, start_inprocess_gateway: StartGateway, case: str) -> None:
    fake = fake_upstream.fake
    data = os.urandom(BLOB)
    digest = fake.add_blob(data)
    path = f"/v2/fault/blob/blobs/{digest}"
    stall = 1.0
    if case == "resumed":
        fake.queue("GET", path, Fault(stall_at=BLOB // 2))  # then answers normally
    elif case == "504-after-resumes":
        fake.always("GET", path, Fault(stall_at=BLOB // 2))  # resumes stall at once too
    else:
        fake.always("GET", path, Fault(delay=60))
    gateway = start_inprocess_gateway(fake_routes(
        fake_upstream.url, timeouts={"stall": f"{stall:g}s", "connect": "1s"}))
    resumes = 3  # transfer.MAX_RESUMES
    bound = stall * (resumes + 1) + 3.0  # + slack for a loaded machine
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        got: Any = await asyncio.wait_for(stream_get(session, gateway.url() + path), bound)
    took = time.monotonic() - started
    if case == "resumed":
        assert got.clean and got.digest == digest, got
        assert took < stall + 3.0, f"a resume after a {stall}s stall took {took:.1f}s"
        # The first asks for the first part (parallel fetch), the resume for the rest.
        assert [s.range for s in fake.blob_requests(digest=digest)] == [
            FIRST_RANGE, f"bytes={BLOB // 2}-"]
    elif case == "504-after-resumes":
        assert got.status == 200 and not got.clean and got.received < BLOB, got
        assert len(fake.blob_requests(digest=digest)) == 1 + resumes
    else:
        assert got.status == 504, got
        assert took < stall + 3.0
