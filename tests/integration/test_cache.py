"""What the cache promises a user: a second pull costs the upstream nothing, a cached
image still pulls when the upstream is gone, a stale tag is served (and says so) when
the upstream fails, a moved tag is picked up after its TTL, and concurrent pulls of
one blob cost one upstream transfer."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.support.gateway import Gateway
from tests.support.images import make_image, sha256_digest
from tests.support.pulls import fetch, pull_image, wait_cached
from tests.support.upstreams import Upstream, unique_repository
from tests.support.world import World

pytestmark = pytest.mark.integration


async def test_second_pull_is_served_from_cache(world: World, http: aiohttp.ClientSession) -> None:
    repository = unique_repository()
    image = world.ghcr.push(repository, make_image(layer_sizes=(64 * 1024, 512 * 1024)))
    base = world.gateway.url()

    first = await pull_image(http, base, f"ghcr.io/{repository}", "latest", image)
    await wait_cached(http, base, f"ghcr.io/{repository}", image)
    upstream_blob_gets = len(world.ghcr.proxy.blob_requests(repository))
    upstream_manifest_gets = len(world.ghcr.proxy.manifest_requests(repository, methods=("GET",)))
    upstream_bytes = world.ghcr.proxy.blob_bytes(repository)

    assert first.cache["manifest:latest"] == "MISS"
    assert [first.cache[b.digest] for b in image.blobs] == ["MISS"] * len(image.blobs)
    assert upstream_blob_gets == len(image.blobs), "each blob is fetched from upstream once"
    assert upstream_bytes == sum(b.size for b in image.blobs)

    second = await pull_image(http, base, f"ghcr.io/{repository}", "latest", image)

    assert set(second.cache.values()) == {"HIT"}, second.cache
    assert len(world.ghcr.proxy.blob_requests(repository)) == upstream_blob_gets
    assert world.ghcr.proxy.blob_bytes(repository) == upstream_bytes
    assert len(world.ghcr.proxy.manifest_requests(repository, methods=("GET",))) == (
        upstream_manifest_gets), "a fresh tag was fetched again"


def _routes(upstream: Upstream, **route: Any) -> dict[str, Any]:
    return {"default_route": None,
            "routes": {"ghcr.io": {"upstream": upstream.url, **route}}}


async def test_cached_image_pulls_with_upstream_stopped(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
    http: aiohttp.ClientSession,
) -> None:
    upstream = start_upstream("ghcr.io")
    gateway = start_gateway(_routes(upstream))
    repository = unique_repository()
    image = upstream.push(repository, make_image())
    await pull_image(http, gateway.url(), f"ghcr.io/{repository}", "latest", image)
    await wait_cached(http, gateway.url(), f"ghcr.io/{repository}", image)

    upstream.stop()  # registry and proxy gone: connections are refused

    again = await pull_image(http, gateway.url(), f"ghcr.io/{repository}", "latest", image)
    assert all(again.cache[b.digest] == "HIT" for b in image.blobs), again.cache
    by_digest = await pull_image(http, gateway.url(), f"ghcr.io/{repository}", image.digest,
                                 image)
    assert by_digest.cache[f"manifest:{image.digest}"] == "HIT"


async def test_expired_tag_is_served_stale_when_upstream_is_down(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
    http: aiohttp.ClientSession,
) -> None:
    upstream = start_upstream("ghcr.io")
    gateway = start_gateway(_routes(upstream, tag_ttl=1, stale_if_error="forever"))
    repository = unique_repository()
    image = upstream.push(repository, make_image())
    await pull_image(http, gateway.url(), f"ghcr.io/{repository}", "latest", image)

    upstream.stop()
    await asyncio.sleep(1.5)  # let the 1 s tag TTL run out (no timing is asserted)

    stale = await fetch(http, f"{gateway.url()}/v2/ghcr.io/{repository}/manifests/latest")
    assert stale.status == 200, stale.describe()
    assert stale.body == image.manifest.data
    assert stale.headers.get("X-Cache") == "STALE"


async def test_moved_tag_is_picked_up_after_its_ttl(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
    http: aiohttp.ClientSession,
) -> None:
    upstream = start_upstream("ghcr.io")
    gateway = start_gateway(_routes(upstream, tag_ttl=1))
    repository = unique_repository()
    old = upstream.push(repository, make_image())
    await pull_image(http, gateway.url(), f"ghcr.io/{repository}", "latest", old)

    new = upstream.push(repository, make_image())  # same tag, new digest
    await asyncio.sleep(1.5)

    await pull_image(http, gateway.url(), f"ghcr.io/{repository}", "latest", new)
    # The old image is still there by digest (immutable), from the cache.
    kept = await pull_image(http, gateway.url(), f"ghcr.io/{repository}", old.digest, old)
    assert kept.cache[f"manifest:{old.digest}"] == "HIT"


async def test_concurrent_pulls_of_one_blob_cost_one_upstream_transfer(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
    http: aiohttp.ClientSession,
) -> None:
    upstream = start_upstream("ghcr.io")
    # Slow the upstream so the first fetch is still running when the others arrive.
    upstream.proxy.throttle_bytes_per_second = 4 * 1024 * 1024
    gateway = start_gateway(_routes(upstream))
    repository = unique_repository()
    image = upstream.push(repository, make_image(layer_sizes=(2 * 1024 * 1024,)))
    layer = image.layers[0]
    url = f"{gateway.url()}/v2/ghcr.io/{repository}/blobs/{layer.digest}"

    results = await asyncio.gather(*(fetch(http, url, accept=None) for _ in range(6)))

    for fetched in results:
        assert fetched.status == 200, fetched.describe()
        assert sha256_digest(fetched.body) == layer.digest
    # One request started the fetch; the others joined it (or, if late, found it cached).
    served = Counter(fetched.headers.get("X-Cache", "<missing>") for fetched in results)
    assert served["MISS"] == 1 and served["COALESCED"] >= 1, dict(served)
    assert set(served) <= {"MISS", "COALESCED", "HIT"}, dict(served)
    assert len(upstream.proxy.blob_requests(repository)) == 1, upstream.proxy.blob_requests()
    assert upstream.proxy.blob_bytes(repository) == layer.size
