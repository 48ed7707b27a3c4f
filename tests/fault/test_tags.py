"""Tags and misses against a real docker-registry behind a counting proxy (issue #5):
a re-pointed tag is served old until its TTL passes and new after it; an unchanged tag
is revalidated with a HEAD only; a manifest the upstream does not have is asked for
once, however many clients ask within the negative-cache time.

No assertion is about time. Where "within the TTL" matters, the test checks it can tell
(the wall clock span of its own requests is shorter than the TTL) before it judges.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.support.client import Response, raw_request
from tests.support.gateway import Gateway
from tests.support.images import ACCEPT_ALL_MANIFESTS, Image, make_image
from tests.support.pulls import assert_oci_error, fetch
from tests.support.upstreams import Upstream, route_entry, unique_repository

pytestmark = pytest.mark.fault

TAG_TTL = 2.0


def mirror_routes(upstream: Upstream, **route: Any) -> dict[str, Any]:
    return {"default_route": "docker.io", "routes": {"docker.io": route_entry(upstream, **route)}}


def small_image() -> Image:
    return make_image(layer_sizes=(4096,))


def get_manifest(gateway: Gateway, repository: str, reference: str,
                 method: str = "GET") -> Response:
    return raw_request(gateway.host, gateway.port, method,
                       f"/v2/{repository}/manifests/{reference}",
                       headers={"Accept": ACCEPT_ALL_MANIFESTS})


def tag_requests(upstream: Upstream, repository: str, tag: str, method: str) -> int:
    return sum(1 for s in upstream.proxy.manifest_requests(repository, methods=(method,))
               if s.path.endswith(f"/manifests/{tag}"))


def test_repointed_tag_is_served_old_until_the_ttl_passes_and_new_after(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("fault")
    images = [small_image() for _ in range(4)]
    upstream.push(repository, images[0], tags=("v1",))
    gateway = start_gateway(mirror_routes(upstream, tag_ttl=f"{TAG_TTL:g}s"))

    confirmed_after = time.time()  # the gateway confirms the tag after this instant
    first = get_manifest(gateway, repository, "v1")
    assert first.status == 200 and first.body == images[0].manifest.data
    assert first.header("X-Cache") == "MISS"

    judged = False
    for old, new in itertools.pairwise(images):
        upstream.push(repository, new, tags=("v1",))  # re-point the tag upstream
        asked = len(upstream.proxy.manifest_requests(repository))
        soon = get_manifest(gateway, repository, "v1")
        if time.time() - confirmed_after < TAG_TTL:
            # Certainly within the TTL of the last confirmation: the cached tag holds.
            assert soon.status == 200
            assert soon.header("Docker-Content-Digest") == old.digest, (
                "a re-pointed tag was served new before its tag_ttl passed")
            assert soon.body == old.manifest.data
            assert soon.header("X-Cache") == "HIT"
            assert len(upstream.proxy.manifest_requests(repository)) == asked, (
                "the gateway asked upstream about a tag within its TTL")
            judged = True
        # After the TTL the new target must appear; until then only the old one may.
        for _ in range(300):
            confirmed_after = time.time()
            now = get_manifest(gateway, repository, "v1")
            assert now.status == 200, now
            digest = now.header("Docker-Content-Digest")
            assert digest in (old.digest, new.digest), digest
            if digest == new.digest:
                break
            assert now.header("X-Cache") == "HIT", now.header("X-Cache")
            time.sleep(0.1)
        else:
            pytest.fail("the re-pointed tag was never served new after its TTL")
        assert now.body == new.manifest.data
        assert now.header("X-Cache") == "MISS"
        assert tag_requests(upstream, repository, "v1", "HEAD") >= 1, (
            "the tag was not revalidated with a HEAD")
        # Once new, never old again.
        again = get_manifest(gateway, repository, "v1")
        assert again.header("Docker-Content-Digest") == new.digest
        if judged:
            break
    assert judged, "this machine never answered two requests within the tag TTL"


def test_unchanged_tag_is_revalidated_with_a_head_only(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("fault")
    image = upstream.push(repository, small_image(), tags=("v1",))
    gateway = start_gateway(mirror_routes(upstream, tag_ttl=f"{TAG_TTL:g}s"))
    first = get_manifest(gateway, repository, "v1")
    assert first.status == 200 and first.header("X-Cache") == "MISS"
    gets = tag_requests(upstream, repository, "v1", "GET")
    assert gets == 1

    for _ in range(300):
        now = get_manifest(gateway, repository, "v1")
        assert now.status == 200 and now.body == image.manifest.data
        assert now.header("X-Cache") == "HIT", now.header("X-Cache")
        if tag_requests(upstream, repository, "v1", "HEAD"):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the tag was never revalidated after its TTL")
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
