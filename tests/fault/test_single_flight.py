"""Single flight, streamed: the gateway as a subprocess in front of a real docker-registry
behind a counting (and throttling) proxy (issue #5).

"Before" is judged by the bytes the proxy has sent, never by a clock: the proxy counts
a chunk before it writes it, so a count read after a client got its first bytes is an
upper bound on what the upstream had sent when they arrived.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.support.datadir import blob_path
from tests.support.gateway import Gateway
from tests.support.images import make_image, sha256_digest
from tests.support.pulls import fetch
from tests.support.transfers import Transfer, client_tasks, read_then_hang_up, stream_get
from tests.support.upstreams import Upstream, route_entry, unique_repository
from tests.support.wait import wait_until

pytestmark = pytest.mark.fault

CLIENTS = 16
LAYERS = 8
LAYER_SIZE = 13 << 20  # 8 layers of 13 MiB: 109 MB of incompressible bytes in all


def mirror_routes(upstream: Upstream, **route: Any) -> dict[str, Any]:
    return {"default_route": "docker.io", "routes": {"docker.io": route_entry(upstream, **route)}}


def proxy_blob_bytes(upstream: Upstream, repository: str, digest: str) -> int:
    return upstream.proxy.blob_bytes(repository, digest=digest)


def push_random_blob(upstream: Upstream, repository: str, size: int) -> tuple[bytes, str]:
    data = random.Random(secrets.randbits(64)).randbytes(size)
    digest = sha256_digest(data)
    upstream.registry.client().push_blob(repository, data, digest)  # not through the proxy
    return data, digest


async def test_concurrent_clients_of_a_cold_image_cost_one_upstream_transfer(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("fault")
    image = upstream.push(repository, make_image(layer_sizes=(LAYER_SIZE,) * LAYERS),
                          tags=("v1",))
    assert sum(layer.size for layer in image.layers) > 100_000_000
    gateway = start_gateway(mirror_routes(upstream))
    base = f"{gateway.url()}/v2/{repository}"
    blobs = list(image.blobs)
    caches: dict[str, list[str]] = defaultdict(list)

    async def client(number: int) -> None:
        async with aiohttp.ClientSession() as session:
            manifest = await fetch(session, f"{base}/manifests/v1")
            assert manifest.status == 200, manifest.describe()
            assert manifest.body == image.manifest.data
            caches["manifest:v1"].append(manifest.headers.get("X-Cache", "<missing>"))
            by_digest = await fetch(session, f"{base}/manifests/{image.digest}")
            assert by_digest.status == 200 and by_digest.body == image.manifest.data
            # Each client starts at another blob, so every blob has clients joining it
            # from the start as well as halfway through.
            order = blobs[number % len(blobs):] + blobs[:number % len(blobs)]
            for blob in order:
                got = await stream_get(session, f"{base}/blobs/{blob.digest}")
                assert got.clean, f"client {number}, blob {blob.digest}: {got}"
                assert got.received == blob.size
                assert got.digest == blob.digest, f"client {number}: wrong bytes for {blob.digest}"
                caches[blob.digest].append(got.cache)

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))

    proxy = upstream.proxy
    for blob in blobs:
        gets = upstream.proxy.blob_fetches(repository, digest=blob.digest)  # its parts: one fetch
        assert gets == 1, f"blob {blob.digest} was fetched upstream {gets} times"
        sent = proxy_blob_bytes(upstream, repository, blob.digest)
        assert sent == blob.size, f"blob {blob.digest}: upstream sent {sent} bytes for {blob.size}"
        seen = Counter(caches[blob.digest])
        assert seen["MISS"] == 1, f"blob {blob.digest}: X-Cache {dict(seen)}"
        assert set(seen) <= {"MISS", "COALESCED", "HIT"}, dict(seen)
    assert proxy.blob_bytes(repository) == sum(blob.size for blob in blobs)
    manifest_gets = proxy.manifest_requests(repository, methods=("GET",))
    assert len(manifest_gets) == 1, f"manifest fetched upstream more than once: {manifest_gets}"
    assert Counter(caches["manifest:v1"])["MISS"] == 1, caches["manifest:v1"]


async def test_first_bytes_reach_clients_while_a_throttled_upstream_is_still_sending(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("fault")
    size = 200 << 20
    data, digest = push_random_blob(upstream, repository, size)
    del data
    upstream.proxy.throttle_bytes_per_second = 20_000_000
    gateway = start_gateway(mirror_routes(upstream))
    url = f"{gateway.url()}/v2/{repository}/blobs/{digest}"

    def sent() -> int:
        return proxy_blob_bytes(upstream, repository, digest)

    upstream_sent_at_first_bytes: dict[str, int] = {}

    def first_bytes(name: str) -> Callable[[int, int], None]:
        def note(before: int, length: int) -> None:
            if before == 0:
                upstream_sent_at_first_bytes[name] = sent()
        return note

    async with aiohttp.ClientSession() as one, aiohttp.ClientSession() as two, \
            client_tasks() as spawn:
        first = spawn(stream_get(one, url, on_chunk=first_bytes("first")))
        await wait_until(lambda: "first" in upstream_sent_at_first_bytes or first.done(),
                         what="the first client to get bytes", timeout=60)
        assert upstream_sent_at_first_bytes.get("first", size) < size // 4, (
            f"the first client's first bytes came after the upstream sent "
            f"{upstream_sent_at_first_bytes.get('first')} of {size} bytes")

        await wait_until(lambda: sent() >= size // 2 or first.done(),
                         what="the upstream to send half the blob", timeout=120)
        joined_at = sent()
        second = spawn(stream_get(two, url, on_chunk=first_bytes("second")))
        await wait_until(lambda: "second" in upstream_sent_at_first_bytes or second.done(),
                         what="the second client to get bytes", timeout=120)
        at_second = upstream_sent_at_first_bytes.get("second", size)
        assert at_second < size, (
            f"the client that joined at {joined_at} bytes got its first bytes only after the "
            "upstream had sent the whole blob")

        results: list[Transfer] = [await first, await second]
    for got in results:
        assert got.clean, got
        assert got.received == size and got.digest == digest
    assert [got.cache for got in results] == ["MISS", "COALESCED"]
    assert upstream.proxy.blob_fetches(repository, digest=digest) == 1
    assert sent() == size


async def test_starter_hanging_up_does_not_cancel_the_fetch_another_client_waits_on(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("fault")
    size = 64 << 20
    data, digest = push_random_blob(upstream, repository, size)
    del data
    # Slow enough that the hang-up happens while the upstream is still sending.
    upstream.proxy.throttle_bytes_per_second = 32_000_000
    gateway = start_gateway(mirror_routes(upstream))
    target = f"/v2/{repository}/blobs/{digest}"
    url = gateway.url() + target
    waiter_has_bytes = asyncio.Event()
    sent_at_hang_up: list[int] = []

    def note_waiter(before: int, length: int) -> None:
        waiter_has_bytes.set()

    async def starter() -> Any:
        async def hang_up_when_the_waiter_streams() -> None:
            await waiter_has_bytes.wait()
            sent_at_hang_up.append(proxy_blob_bytes(upstream, repository, digest))

        return await read_then_hang_up(gateway.host, gateway.port, target, size // 10,
                                       before_hang_up=hang_up_when_the_waiter_streams)

    async with aiohttp.ClientSession() as session, client_tasks() as spawn:
        starting = spawn(starter())
        await wait_until(lambda: upstream.proxy.blob_fetches(repository, digest=digest) == 1,
                         what="the starter's GET to reach the upstream")
        waiting = await stream_get(session, url, on_chunk=note_waiter)
        hung_up = await starting

        assert hung_up.status == 200 and hung_up.headers.get("x-cache") == "MISS", hung_up
        assert size // 10 <= hung_up.received < size
        assert sent_at_hang_up and sent_at_hang_up[0] < size, (
            "the upstream had finished before the starter hung up; nothing was tested")

        assert waiting.clean, f"the waiting client's transfer broke: {waiting}"
        assert waiting.received == size and waiting.digest == digest
        assert waiting.cache == "COALESCED"
        assert upstream.proxy.blob_fetches(repository, digest=digest) == 1

        # Readers get the last byte once it is verified; the file is renamed into the
        # store just after (fsync first). Wait for that state, not for a time.
        data_dir = gateway.data_dir
        await wait_until(lambda: blob_path(data_dir, "docker.io", digest).exists(),
                         what="the verified blob to be committed to the store")
        third = await stream_get(session, url)
        assert third.clean and third.digest == digest
        assert third.cache == "HIT"
    assert upstream.proxy.blob_fetches(repository, digest=digest) == 1, "the blob was fetched again"
    assert proxy_blob_bytes(upstream, repository, digest) == size


async def test_fetch_nobody_waits_for_any_more_still_completes_and_is_cached(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("fault")
    size = 32 << 20
    data, digest = push_random_blob(upstream, repository, size)
    del data
    upstream.proxy.throttle_bytes_per_second = 32_000_000
    gateway = start_gateway(mirror_routes(upstream))
    target = f"/v2/{repository}/blobs/{digest}"
    sent_at_hang_up: list[int] = []

    hung_up = await read_then_hang_up(
        gateway.host, gateway.port, target, size // 10,
        before_hang_up=lambda: sent_at_hang_up.append(
            proxy_blob_bytes(upstream, repository, digest)))
    assert hung_up.status == 200 and hung_up.headers.get("x-cache") == "MISS"
    assert sent_at_hang_up[0] < size, "the upstream finished before the hang-up"

    async with aiohttp.ClientSession() as session:
        states: list[str] = []

        async def cached() -> bool:
            async with session.head(gateway.url() + target) as response:
                states.append(response.headers.get("X-Cache", "<missing>"))
            return states[-1] == "HIT"

        for _ in range(2400):
            if await cached():
                break
            assert states[-1] == "COALESCED", (
                f"the orphaned fetch was abandoned (HEAD said {states[-1]})")
            await asyncio.sleep(0.05)
        assert states[-1] == "HIT", states[-5:]
        got = await stream_get(session, gateway.url() + target)
        assert got.clean and got.digest == digest and got.cache == "HIT"
    assert upstream.proxy.blob_fetches(repository, digest=digest) == 1
    assert proxy_blob_bytes(upstream, repository, digest) == size
