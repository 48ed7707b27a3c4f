"""Three replicas (issue #12): gateway processes on one SeaweedFS bucket and one Redis
(`storage:` + `redis:`), in front of a real docker-registry behind the counting
(throttling) proxy. A blob leaves the upstream once however the clients are spread;
followers on other replicas stream the leader's bytes before its transfer ends (judged by
the proxy's byte count, never a clock); a leader killed with SIGKILL is taken over; with
Redis gone the replicas still serve correct bytes, and coordinate again once it is back.
Every client checks every digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import Gateway
from tests.support.images import make_image, sha256_digest
from tests.support.pulls import fetch, pull_image
from tests.support.redis import RedisServer, run_redis
from tests.support.seaweed import SeaweedFS, run_seaweed
from tests.support.transfers import FirstBytes, Transfer, client_tasks, stream_get
from tests.support.upstreams import Upstream, route_entry, unique_repository
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

CLIENTS = 16
REPLICAS = 3


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with run_seaweed(tmp_path_factory.mktemp("seaweed")) as running:
        yield running


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with run_redis(tmp_path / "redis") as running:
        yield running


def replica_routes(upstream: Upstream, seaweed: SeaweedFS, redis: RedisServer) -> dict[str, Any]:
    tag = secrets.token_hex(4)
    return {"default_route": "docker.io",
            # One stream per blob: one upstream GET each to count.
            "routes": {"docker.io": route_entry(upstream, parallel_fetch_threshold="off")},
            "storage": seaweed.storage(prefix=f"gw-{tag}", part_size="5MiB"),
            "redis": {"url": redis.url, "prefix": f"rg-{tag}:", "lease_ttl": "3s",
                      "heartbeat": "1s"}}


def start_replicas(start_gateway: Callable[..., Gateway], routes: dict[str, Any]
                   ) -> list[Gateway]:
    return [start_gateway(routes) for _ in range(REPLICAS)]


def push_random_blob(upstream: Upstream, repository: str, size: int) -> str:
    data = random.Random(secrets.randbits(64)).randbytes(size)
    digest = sha256_digest(data)
    upstream.registry.client().push_blob(repository, data, digest)  # not through the proxy
    return digest


async def claims(session: aiohttp.ClientSession, replicas: list[Gateway]) -> Counter[str]:
    """gateway_replica_claims_total by outcome, summed over `replicas`."""
    found: Counter[str] = Counter()
    for replica in replicas:
        async with session.get(f"{replica.url()}/metrics") as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "gateway_replica_claims_total":
                    found[sample.labels["outcome"]] += int(sample.value)
    return found


def stored_blobs_are_intact(seaweed: SeaweedFS, routes: dict[str, Any]) -> int:
    """Every blob object in the bucket holds the bytes its key names; how many (one
    evicted between the listing and its read is not counted)."""
    count = 0
    for key in seaweed.keys(routes["storage"]["prefix"] + "/"):
        if "/blobs/sha256/" in key:
            try:
                data = seaweed.object(key)
            except seaweed.client.exceptions.NoSuchKey:
                continue
            assert hashlib.sha256(data).hexdigest() == key.rsplit("/", 1)[1], f"corrupt: {key}"
            count += 1
    return count


async def test_sixteen_clients_over_three_replicas_pull_a_cold_image_from_the_upstream_once(
        seaweed: SeaweedFS, redis_server: RedisServer,
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("replicas")
    image = upstream.push(repository, make_image(layer_sizes=(6 << 20,) * 4), tags=("v1",))
    upstream.proxy.throttle_bytes_per_second = 24_000_000  # transfers overlap the clients
    routes = replica_routes(upstream, seaweed, redis_server)
    replicas = start_replicas(start_gateway, routes)
    blobs = list(image.blobs)
    caches: dict[str, list[str]] = {blob.digest: [] for blob in blobs}

    async def client(number: int) -> None:
        base = f"{replicas[number % REPLICAS].url()}/v2/{repository}"
        async with aiohttp.ClientSession() as session:
            manifest = await fetch(session, f"{base}/manifests/v1")
            assert manifest.status == 200, manifest.describe()
            assert manifest.body == image.manifest.data
            order = blobs[number % len(blobs):] + blobs[:number % len(blobs)]
            for blob in order:
                got = await stream_get(session, f"{base}/blobs/{blob.digest}")
                assert got.clean, f"client {number}, blob {blob.digest}: {got}"
                assert got.received == blob.size and got.digest == blob.digest
                caches[blob.digest].append(got.cache)

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))

    for blob in blobs:
        fetches = upstream.proxy.blob_fetches(repository, digest=blob.digest)
        assert fetches == 1, f"blob {blob.digest}"
        assert upstream.proxy.blob_bytes(repository, digest=blob.digest) == blob.size
        assert Counter(caches[blob.digest])["MISS"] == 1, caches[blob.digest]
    await wait_until(lambda: stored_blobs_are_intact(seaweed, routes) == len(blobs),
                     what="every blob committed to the bucket once", timeout=30)

    # The replicas' endpoint answers replicas only: a client without the HMAC is refused.
    async with aiohttp.ClientSession() as session:
        url = f"{replicas[0].url()}/_gateway/internal/flight/{blobs[0].digest}?ns=docker.io"
        for headers in ({}, {"X-Gateway-Replica": "9999999999.00"}):
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 403, resp.status
                assert (await resp.json())["errors"][0]["code"] == "DENIED"


async def test_a_follower_on_another_replica_streams_before_the_leader_ends(
        seaweed: SeaweedFS, redis_server: RedisServer,
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("replicas")
    size = 48 << 20
    digest = push_random_blob(upstream, repository, size)
    upstream.proxy.throttle_bytes_per_second = 12_000_000  # about 4 s
    leader, follower, _third = start_replicas(start_gateway, replica_routes(
        upstream, seaweed, redis_server))

    def sent() -> int:
        return upstream.proxy.blob_bytes(repository, digest=digest)

    first_bytes = FirstBytes(sent)
    at_first_bytes = first_bytes.at

    path = f"/v2/{repository}/blobs/{digest}"
    async with aiohttp.ClientSession() as session, client_tasks() as spawn:
        first = spawn(stream_get(session, leader.url() + path, on_chunk=first_bytes.hook("leader")))
        await wait_until(lambda: sent() >= size // 4 or first.done(),
                         what="the upstream to send a quarter of the blob", timeout=60)
        second = spawn(stream_get(session, follower.url() + path,
                                  on_chunk=first_bytes.hook("follower")))
        await wait_until(lambda: "follower" in at_first_bytes or second.done(),
                         what="the follower's first bytes", timeout=60)
        assert at_first_bytes["follower"] < size, (
            "the client on the other replica got its first bytes only after the upstream "
            "had sent the whole blob")
        results: list[Transfer] = [await first, await second]
    for got in results:
        assert got.clean, got
        assert got.received == size and got.digest == digest
    assert [got.cache for got in results] == ["MISS", "COALESCED"]
    assert upstream.proxy.blob_fetches(repository, digest=digest) == 1
    assert sent() == size


async def test_a_killed_leader_is_taken_over_and_nothing_corrupt_is_stored(
        seaweed: SeaweedFS, redis_server: RedisServer,
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("replicas")
    size = 40 << 20
    digest = push_random_blob(upstream, repository, size)
    upstream.proxy.throttle_bytes_per_second = 10_000_000
    routes = replica_routes(upstream, seaweed, redis_server)
    leader, *others = start_replicas(start_gateway, routes)
    path = f"/v2/{repository}/blobs/{digest}"

    def sent() -> int:
        return upstream.proxy.blob_bytes(repository, digest=digest)

    async with aiohttp.ClientSession() as session, client_tasks() as spawn:
        doomed = spawn(stream_get(session, leader.url() + path))
        await wait_until(lambda: sent() >= size // 8, what="the leader's transfer", timeout=60)
        followers = [spawn(stream_get(session, other.url() + path)) for other in others
                     for _ in range(2)]
        await wait_until(lambda: sent() >= size // 3, what="a third of the blob", timeout=60)
        assert leader.process is not None
        leader.process.kill()  # SIGKILL: no release, no goodbye; its lease expires
        leader.process.wait(10)
        leader.process = None
        lost = await doomed
        assert not lost.clean or lost.digest != digest or lost.received != size
        for task in followers:  # every client on another replica completes, unbroken
            got = await task
            assert got.clean, got
            assert got.received == size and got.digest == digest
        # The killed replica's client tries again (its load balancer sends it elsewhere).
        again = await stream_get(session, others[0].url() + path)
        assert again.clean and again.digest == digest and again.received == size
        seen = await claims(session, others)
        assert seen["takeover"] == 1 and seen["follow"] >= 2, seen
    assert sent() <= 2 * size, f"the upstream sent {sent()} bytes of a {size}-byte blob"
    await wait_until(lambda: stored_blobs_are_intact(seaweed, routes) == 1,
                     what="the blob committed whole", timeout=30)


async def test_without_redis_replicas_serve_correct_bytes_and_coordinate_again_after(
        seaweed: SeaweedFS, redis_server: RedisServer,
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("replicas")
    size = 8 << 20
    during = push_random_blob(upstream, repository, size)
    after = push_random_blob(upstream, repository, size)
    upstream.proxy.throttle_bytes_per_second = 16_000_000
    routes = replica_routes(upstream, seaweed, redis_server)
    replicas = start_replicas(start_gateway, routes)

    async def pull_everywhere(digest: str) -> list[Transfer]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(
                stream_get(session, f"{replicas[n % REPLICAS].url()}/v2/{repository}/blobs/"
                           f"{digest}") for n in range(6)))

    redis_server.stop()
    for got in await pull_everywhere(during):
        assert got.clean, got
        assert got.received == size and got.digest == during
    # Each replica fetched for itself at most once: its own single flight held.
    assert 1 <= upstream.proxy.blob_fetches(repository, digest=during) <= REPLICAS
    async with aiohttp.ClientSession() as session:
        assert (await claims(session, replicas))["local"] == REPLICAS

    redis_server.start()  # the same port: the replicas reconnect by themselves
    await asyncio.sleep(1.5)  # past the replicas' second without Redis
    for got in await pull_everywhere(after):
        assert got.clean, got
        assert got.received == size and got.digest == after
    assert upstream.proxy.blob_fetches(repository, digest=after) == 1, "coordination did not resume"
    assert stored_blobs_are_intact(seaweed, routes) >= 1


async def test_the_size_cap_holds_for_the_bucket_the_replicas_share(
        seaweed: SeaweedFS, redis_server: RedisServer,
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    """Each replica commits less than the cap, all of them together twice as much: the
    bucket still comes down under the cap (each catalogue alone would keep all of it)."""
    upstream = start_upstream("docker.io")
    images = [make_image(layer_sizes=(1 << 20,), seed=170 + i) for i in range(6)]
    repositories = [unique_repository("replicas") for _ in images]
    for repository, image in zip(repositories, images, strict=True):
        upstream.push(repository, image, tags=("v1",))
    routes = replica_routes(upstream, seaweed, redis_server)
    cap = 3 << 20
    routes["cache"] = {"max_size": cap, "lease": "0s"}
    replicas = start_replicas(start_gateway, routes)
    async with aiohttp.ClientSession() as session:
        for number, (repository, image) in enumerate(zip(repositories, images, strict=True)):
            await pull_image(session, replicas[number % REPLICAS].url(), repository, "v1",
                             image)

    def blob_bytes() -> int:
        return sum(size for key, size in seaweed.keys(routes["storage"]["prefix"] + "/").items()
                   if "/blobs/" in key)

    await wait_until(lambda: blob_bytes() <= cap, what="the bucket evicted down to the cap",
                     timeout=30)
    stored_blobs_are_intact(seaweed, routes)
    async with aiohttp.ClientSession() as session:  # what went is fetched again, verified
        await pull_image(session, replicas[0].url(), repositories[0], "v1", images[0])


async def test_the_lease_is_fenced_extended_by_its_holder_only_and_expires(
        redis_server: RedisServer) -> None:
    """Two coordinators on one Redis stand for two replicas: one leads a key, the other
    follows it; the heartbeat keeps the lease past lease_ttl; only the holder's value
    extends or deletes it; tokens grow; a turn is exclusive; without Redis each decides
    alone. (A leader that stops beating loses its lease: the kill -9 test above.)"""
    from yarl import URL

    from gateway.cache.coordinate import InProcess
    from gateway.cache.coordinate_redis import Holder, RedisCoordinator
    from gateway.cache.replica_source import ReplicaLead
    from gateway.config import load_config
    from gateway.metrics import Metrics

    settings = load_config(
        "routes: {ghcr.io: {upstream: 'http://127.0.0.1:5000'}}\n"
        f"redis: {{url: '{redis_server.url}', prefix: 'c-{secrets.token_hex(3)}:', "
        "lease_ttl: 1s, heartbeat: 0.3s}\n", "routes.yaml", {}).redis
    one, two = (RedisCoordinator(settings, InProcess(), URL(f"http://127.0.0.1:{port}"),
                                 Metrics()) for port in (1, 2))
    await one.open(sweep=True)
    await two.open(sweep=False)
    try:
        lead = await one.claim("blob ns sha256:aa")
        other = await two.claim("blob ns sha256:aa")
        assert isinstance(lead, ReplicaLead) and isinstance(other, ReplicaLead)
        assert lead.leading and not other.leading
        assert other.holder == lead.holder and lead.holder.url == "http://127.0.0.1:1"
        assert one.held == {"blob ns sha256:aa": lead.holder.token}
        assert await one.secret() == await two.secret() is not None  # kept in Redis
        await asyncio.sleep(1.5)  # past lease_ttl: the heartbeat kept it
        assert await two.holder("blob ns sha256:aa") == lead.holder
        forged = Holder(other.holder.token + 1, "http://127.0.0.1:2")
        assert not await two.extend("blob ns sha256:aa", forged)  # not its value
        await two.let_go("blob ns sha256:aa", forged)  # compare-and-delete: no effect
        assert await two.holder("blob ns sha256:aa") == lead.holder
        await lead.release()  # let go: the next claim leads, with a larger token
        assert one.held == {}
        again = await two.claim("blob ns sha256:aa")
        assert isinstance(again, ReplicaLead) and again.leading
        assert again.holder.token > lead.holder.token
        await again.release()

        async with one.turn("manifest ns x") as waited:
            assert not waited
            entered = asyncio.get_running_loop().create_future()

            async def second() -> None:
                async with two.turn("manifest ns x") as waited_there:
                    entered.set_result(waited_there)

            task = asyncio.create_task(second())
            await asyncio.sleep(0.2)
            assert not entered.done()
        assert await entered is True
        await task

        redis_server.stop()
        alone = await one.claim("blob ns sha256:bb")
        assert not isinstance(alone, ReplicaLead)  # this host's own single flight
    finally:
        await one.close()
        await two.close()
