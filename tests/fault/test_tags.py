"""Tags and misses against a real docker-registry behind a counting proxy (issue #5):
a re-pointed tag is served old until its TTL passes and new after it; an unchanged tag
is revalidated with a HEAD only; a manifest the upstream does not have is asked for
once, however many clients ask within the negative-cache time.

No assertion is about time, and no test waits for one: the TTL tests run the gateway in
this process and move its clock.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.support.client import Response, raw_request
from tests.support.gateway import Gateway
from tests.support.images import ACCEPT_ALL_MANIFESTS, Image, make_image
from tests.support.inprocess import InProcessGateway
from tests.support.pulls import assert_oci_error, fetch
from tests.support.upstreams import Upstream, route_entry, unique_repository

pytestmark = pytest.mark.fault

TAG_TTL = 2.0


def mirror_routes(upstream: Upstream, **route: Any) -> dict[str, Any]:
    return {"default_route": "docker.io", "routes": {"docker.io": route_entry(upstream, **route)}}


def small_image() -> Image:
    return make_image(layer_sizes=(4096,))


def get_manifest(gateway: Gateway | InProcessGateway, repository: str, reference: str,
                 method: str = "GET") -> Response:
    return raw_request(gateway.host, gateway.port, method,
                       f"/v2/{repository}/manifests/{reference}",
                       headers={"Accept": ACCEPT_ALL_MANIFESTS})


def tag_requests(upstream: Upstream, repository: str, tag: str, method: str) -> int:
    return sum(1 for s in upstream.proxy.manifest_requests(repository, methods=(method,))
               if s.path.endswith(f"/manifests/{tag}"))


def test_repointed_tag_is_served_old_until_the_ttl_passes_and_new_after(
    start_upstream: Callable[..., Upstream],
    start_inprocess_gateway: Callable[..., InProcessGateway],
) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("fault")
    images = [small_image() for _ in range(3)]
    upstream.push(repository, images[0], tags=("v1",))
    gateway = start_inprocess_gateway(mirror_routes(upstream, tag_ttl=f"{TAG_TTL:g}s"))

    first = get_manifest(gateway, repository, "v1")
    assert first.status == 200 and first.body == images[0].manifest.data
    assert first.header("X-Cache") == "MISS"
    for old, new in itertools.pairwise(images):
        upstream.push(repository, new, tags=("v1",))  # re-point the tag upstream
        asked = len(upstream.proxy.manifest_requests(repository))
        gateway.clock.advance(TAG_TTL - 0.5)  # still within the TTL of the last look
        soon = get_manifest(gateway, repository, "v1")
        assert soon.status == 200
        assert soon.header("Docker-Content-Digest") == old.digest, (
            "a re-pointed tag was served new before its tag_ttl passed")
        assert soon.body == old.manifest.data
        assert soon.header("X-Cache") == "HIT"
        assert len(upstream.proxy.manifest_requests(repository)) == asked, (
            "the gateway asked upstream about a tag within its TTL")
        heads = tag_requests(upstream, repository, "v1", "HEAD")
        gateway.clock.advance(1.0)  # past it
        now = get_manifest(gateway, repository, "v1")
        assert now.status == 200, now
        assert now.header("Docker-Content-Digest") == new.digest
        assert now.body == new.manifest.data
        assert now.header("X-Cache") == "MISS"
        assert tag_requests(upstream, repository, "v1", "HEAD") == heads + 1, (
            "the tag was not revalidated with a HEAD")
        # Once new, never old again.
        again = get_manifest(gateway, repository, "v1")
        assert again.header("Docker-Content-Digest") == new.digest
        assert again.header("X-Cache") == "HIT"


def test_unchanged_tag_is_revalidated_with_a_head_only(
    start_upstream: Callable[..., Upstream],
    start_inprocess_gateway: Callable[..., InProcessGateway],
) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("fault")
    image = upstream.push(repository, small_image(), tags=("v1",))
    gateway = start_inprocess_gateway(mirror_routes(upstream, tag_ttl=f"{TAG_TTL:g}s"))
    first = get_manifest(gateway, repository, "v1")
    assert first.status == 200 and first.header("X-Cache") == "MISS"
    gets = tag_requests(upstream, repository, "v1", "GET")
    assert gets == 1

    for heads in range(1, 4):
        gateway.clock.advance(TAG_TTL + 0.1)
        now = get_manifest(gateway, repository, "v1")
        assert now.status == 200 and now.body == image.manifest.data
        assert now.header("X-Cache") == "HIT", now.header("X-Cache")
        assert tag_requests(upstream, repository, "v1", "HEAD") == heads
        within = get_manifest(gateway, repository, "v1")  # confirmed: fresh again
        assert within.header("X-Cache") == "HIT"
        assert tag_requests(upstream, repository, "v1", "HEAD") == heads
    assert tag_requests(upstream, repository, "v1", "GET") == gets, (
        "an unchanged tag was fetched again with a GET (counts against pull limits)")


@pytest.mark.parametrize("kind", ["tag", "digest"])
async def test_missing_manifest_is_asked_for_once_within_the_negative_ttl(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway], kind: str,
) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("fault")
    upstream.push(repository, small_image(), tags=("v1",))  # the repository exists
    gateway = start_gateway(mirror_routes(upstream, negative_ttl="10m"))
    reference = "no-such-tag" if kind == "tag" else f"sha256:{secrets.token_hex(32)}"
    url = f"{gateway.url()}/v2/{repository}/manifests/{reference}"

    async with aiohttp.ClientSession() as session:
        async def ask(number: int) -> None:
            method = "HEAD" if number % 5 == 4 else "GET"
            got = await fetch(session, url, method=method)
            assert got.status == 404, got.describe()
            assert got.headers.get("X-Registry-Route") == "docker.io"
            if method == "GET":
                codes = [e["code"] for e in assert_oci_error(got)]
                assert codes == ["MANIFEST_UNKNOWN"], codes

        await ask(0)
        await asyncio.gather(*(ask(n) for n in range(1, 25)))  # 24 at once
        for number in range(25, 50):  # and 25 one after another
            await ask(number)

    asked = [s for s in upstream.proxy.manifest_requests(repository)
             if s.path.endswith(f"/manifests/{reference}")]
    assert len(asked) == 1, (
        f"50 requests for a missing manifest ({kind}) went upstream {len(asked)} times")
    assert asked[0].status == 404
