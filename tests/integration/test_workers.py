"""`serve --workers 2` (issue #12): two worker processes on the same listeners and one data
directory, in front of a real docker-registry behind the counting (throttling) proxy.

Which worker answered is read from `X-Gateway-Worker` (its pid); "before" is judged by
the bytes the proxy has sent, never by a clock. Every client checks every digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import secrets
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.faults import Fault
from tests.support.gateway import Gateway
from tests.support.images import make_image, sha256_digest
from tests.support.pulls import fetch
from tests.support.transfers import FirstBytes, Transfer, client_tasks, stream_get
from tests.support.upstreams import Upstream, route_entry, unique_repository
from tests.support.wait import wait_until

CLIENTS = 16
WORKER = "X-Gateway-Worker"


def routes_for(upstream: Upstream, **route: Any) -> dict[str, Any]:
    return {"default_route": "docker.io", "routes": {"docker.io": route_entry(upstream, **route)}}


def start_workers(start_gateway: Callable[..., Gateway], routes: dict[str, Any]) -> Gateway:
    return start_gateway(routes, extra_args=("--workers", "2"))


def push_random_blob(upstream: Upstream, repository: str, size: int) -> str:
    data = random.Random(secrets.randbits(64)).randbytes(size)
    digest = sha256_digest(data)
    upstream.registry.client().push_blob(repository, data, digest)  # not through the proxy
    return digest


async def metric_samples(http: aiohttp.ClientSession, gateway: Gateway) -> list[Any]:
    async with http.get(f"{gateway.url()}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples]


@asynccontextmanager
async def session_on(gateway: Gateway, *, worker: str | None = None,
                     not_worker: str | None = None) -> AsyncIterator[tuple[aiohttp.ClientSession,
                                                                             str]]:
    """A client with one connection, served by `worker` (or by any but `not_worker`):
    new connections until the kernel hands one to it (SO_REUSEPORT spreads them)."""
    for _ in range(200):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        try:
            async with session.get(f"{gateway.url()}/v2/") as resp:
                await resp.read()
                pid = resp.headers[WORKER]
            if (worker is None or pid == worker) and pid != not_worker:
                yield session, pid
                return
        finally:
            await session.close()
    pytest.fail(f"no connection reached the worker wanted ({worker or 'not ' + str(not_worker)})")


def stored_blobs_are_intact(data_dir: Path) -> int:
    """Every file under blobs/ holds the bytes its name says; how many there are."""
    count = 0
    for path in data_dir.glob("*/blobs/sha256/*/*"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"corrupt: {path}"
        count += 1
    return count


async def test_sixteen_clients_over_two_workers_pull_a_cold_image_from_the_upstream_once(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("workers")
    image = upstream.push(repository, make_image(layer_sizes=(6 << 20,) * 5), tags=("v1",))
    upstream.proxy.throttle_bytes_per_second = 24_000_000  # transfers overlap the clients
    gateway = start_workers(start_gateway, routes_for(upstream))
    base = f"{gateway.url()}/v2/{repository}"
    blobs = list(image.blobs)
    caches: dict[str, list[str]] = defaultdict(list)
    workers: Counter[str] = Counter()
    made = 0

    async def client(number: int) -> None:
        nonlocal made
        async with aiohttp.ClientSession() as session:
            manifest = await fetch(session, f"{base}/manifests/v1")
            by_digest = await fetch(session, f"{base}/manifests/{image.digest}")
            made += 2
            for got in (manifest, by_digest):
                assert got.status == 200, got.describe()
                assert got.body == image.manifest.data
                workers[got.headers[WORKER]] += 1
            caches["manifest:v1"].append(manifest.headers["X-Cache"])
            order = blobs[number % len(blobs):] + blobs[:number % len(blobs)]
            for blob in order:
                got = await stream_get(session, f"{base}/blobs/{blob.digest}")
                made += 1
                assert got.clean, f"client {number}, blob {blob.digest}: {got}"
                assert got.received == blob.size and got.digest == blob.digest
                caches[blob.digest].append(got.cache)
                workers[got.headers[WORKER]] += 1

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))

    assert len(workers) == 2, f"every request landed on one worker: {workers}"
    for blob in blobs:
        fetches = upstream.proxy.blob_fetches(repository, digest=blob.digest)
        assert fetches == 1, f"blob {blob.digest}"
        assert upstream.proxy.blob_bytes(repository, digest=blob.digest) == blob.size
        seen = Counter(caches[blob.digest])
        assert seen["MISS"] == 1, f"blob {blob.digest}: X-Cache {dict(seen)}"
    manifest_gets = upstream.proxy.manifest_requests(repository, methods=("GET",))
    assert len(manifest_gets) == 1, f"the manifest left the upstream more than once: " \
        f"{[s.path for s in manifest_gets]}"
    assert Counter(caches["manifest:v1"])["MISS"] == 1, caches["manifest:v1"]

    # /metrics, whichever worker answers it, counts the requests of both.
    async with aiohttp.ClientSession() as http:
        samples = await metric_samples(http, gateway)
    served = sum(s.value for s in samples if s.name == "gateway_requests_total"
                 and s.labels["kind"] in ("manifest", "tag", "blob"))
    assert served == made == CLIENTS * (2 + len(blobs))
    misses = sum(s.value for s in samples if s.name == "gateway_cache_requests_total"
                 and s.labels["kind"] == "blob" and s.labels["result"] == "miss")
    assert misses == len(blobs)
    # Blobs and the manifest, once each, whichever worker fetched them.
    assert sum(s.value for s in samples if s.name == "gateway_upstream_bytes_total") == \
        sum(blob.size for blob in blobs) + len(image.manifest.data)
    # Every gauge says how it adds up over workers: none is left per process (a pid label).
    assert not [s for s in samples if "pid" in s.labels], "a metric is reported per worker"
    assert stored_blobs_are_intact(gateway.data_dir) >= len(blobs)


async def test_a_follower_in_the_other_worker_streams_the_leaders_spool_as_it_grows(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("workers")
    size = 48 << 20
    digest = push_random_blob(upstream, repository, size)
    upstream.proxy.throttle_bytes_per_second = 12_000_000  # about 4 s
    gateway = start_workers(start_gateway, routes_for(upstream))
    url = f"{gateway.url()}/v2/{repository}/blobs/{digest}"

    def sent() -> int:
        return upstream.proxy.blob_bytes(repository, digest=digest)

    first_bytes = FirstBytes(sent)
    at_first_bytes = first_bytes.at

    async with session_on(gateway) as (one, leader), \
            session_on(gateway, not_worker=leader) as (two, follower), client_tasks() as spawn:
        first = spawn(stream_get(one, url, on_chunk=first_bytes.hook("leader")))
        await wait_until(lambda: sent() >= size // 4 or first.done(),
                         what="the upstream to send a quarter of the blob", timeout=60)
        second = spawn(stream_get(two, url, on_chunk=first_bytes.hook("follower")))
        await wait_until(lambda: "follower" in at_first_bytes or second.done(),
                         what="the follower's first bytes", timeout=60)
        assert at_first_bytes["follower"] < size, (
            "the client on the other worker got its first bytes only after the upstream "
            "had sent the whole blob")
        results: list[Transfer] = [await first, await second]
    for got in results:
        assert got.clean, got
        assert got.received == size and got.digest == digest
    assert [got.headers[WORKER] for got in results] == [leader, follower]
    assert [got.cache for got in results] == ["MISS", "COALESCED"]
    assert upstream.proxy.blob_fetches(repository, digest=digest) == 1
    assert sent() == size


async def test_a_worker_killed_mid_transfer_is_started_again_and_a_retry_succeeds(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("workers")
    size = 48 << 20
    digest = push_random_blob(upstream, repository, size)
    upstream.proxy.throttle_bytes_per_second = 12_000_000
    gateway = start_workers(start_gateway, routes_for(upstream))
    url = f"{gateway.url()}/v2/{repository}/blobs/{digest}"

    def sent() -> int:
        return upstream.proxy.blob_bytes(repository, digest=digest)

    async with session_on(gateway) as (one, leader), \
            session_on(gateway, not_worker=leader) as (two, other), client_tasks() as spawn:
        first = spawn(stream_get(one, url))
        await wait_until(lambda: sent() >= size // 4, what="a quarter of the blob", timeout=60)
        second = spawn(stream_get(two, url))
        await wait_until(lambda: sent() >= size // 2, what="half of the blob", timeout=60)
        os.kill(int(leader), signal.SIGKILL)
        results = [await first, await second]
    assert not results[0].clean, "the killed worker's client got a whole body"
    for got in results:  # whole and right, or visibly broken: never wrong bytes
        assert not got.clean or got.digest == digest, got

    async def serving_again() -> bool:
        async with session_on(gateway, not_worker=other) as (_session, pid):
            return pid != leader

    await wait_until(serving_again, what="the supervisor to start the worker again",
                     timeout=60)
    upstream.proxy.throttle_bytes_per_second = None
    for _ in range(3):  # a client retries: on either worker
        async with aiohttp.ClientSession() as session:
            got = await stream_get(session, url)
        assert got.clean and got.digest == digest, got
    assert sent() <= 2 * size + (size // 4), f"the upstream sent {sent()} bytes"
    await wait_until(lambda: stored_blobs_are_intact(gateway.data_dir) == 1,
                     what="the blob to be committed", timeout=60)
    assert gateway.process is not None and gateway.process.poll() is None
    gateway.logged(f"(pid {leader}) ended (killed by SIGKILL); starting it again")


async def test_sighup_reloads_every_worker(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    # SIGHUP only: a reload of the changed file counts once per worker.
    gateway = start_gateway(routes_for(upstream), extra_args=("--workers", "2",
                                                              "--config-poll", "0"))
    assert gateway.process is not None
    gateway.routes["routes"]["quay.io"] = route_entry(upstream)
    gateway.write_routes()
    gateway.process.send_signal(signal.SIGHUP)
    seen: dict[str, list[str]] = {}

    async def both_reloaded() -> bool:
        async with aiohttp.ClientSession() as session, \
                session.get(f"{gateway.url()}/_gateway/routes") as resp:
            listing = await resp.json()
            seen[resp.headers[WORKER]] = [r["name"] for r in listing["routes"]]
        return len(seen) == 2 and all("quay.io" in names for names in seen.values())

    await wait_until(both_reloaded, what=f"both workers to serve the new route: {seen}",
                     timeout=30)
    async with aiohttp.ClientSession() as http:
        samples = await metric_samples(http, gateway)
    reloads = sum(s.value for s in samples if s.name == "gateway_config_reloads_total"
                  and s.labels["result"] == "ok")
    assert reloads == 2, f"{reloads} reloads counted for two workers"


async def test_a_corrupt_upstream_blob_reaches_no_client_on_any_worker_whole(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("workers")
    size = 12 << 20
    digest = push_random_blob(upstream, repository, size)
    upstream.proxy.queue("GET", f"/v2/{repository}/blobs/{digest}",
                         Fault(corrupt_at=(size - 10,), throttle=4_000_000))
    # One stream, the one the fault corrupts (a corrupt part: tests/unit/test_ranged.py).
    gateway = start_workers(start_gateway, routes_for(upstream, parallel_fetch_threshold="off"))
    url = f"{gateway.url()}/v2/{repository}/blobs/{digest}"

    async with session_on(gateway) as (one, leader), \
            session_on(gateway, not_worker=leader) as (two, follower), client_tasks() as spawn:
        first = spawn(stream_get(one, url))
        await wait_until(lambda: upstream.proxy.blob_bytes(repository) >= size // 4,
                         what="a quarter of the blob", timeout=60)
        second = spawn(stream_get(two, url))
        results = [await first, await second]
    assert [got.headers[WORKER] for got in results] == [leader, follower]
    for got in results:
        assert not got.clean, f"a client got the corrupt blob as a whole, clean body: {got}"
        assert got.received < size
    assert stored_blobs_are_intact(gateway.data_dir) == 0
    async with aiohttp.ClientSession() as session:  # the client's retry: the right bytes
        again = await stream_get(session, url)
    assert again.clean and again.digest == digest, again
    async with aiohttp.ClientSession() as http:
        samples = await metric_samples(http, gateway)
    assert sum(s.value for s in samples if s.name == "gateway_integrity_failures_total") == 1
