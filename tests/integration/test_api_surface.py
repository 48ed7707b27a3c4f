"""The gateway's HTTP surface as any client meets it: /v2/, refusal of writes, malformed
requests and unconfigured registries, each with an OCI error body and without
bothering any upstream."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support.client import raw_request
from tests.support.images import DOCKER_MANIFEST, make_image
from tests.support.pulls import assert_oci_error, fetch, oci_errors
from tests.support.tools import require_tool
from tests.support.upstreams import unique_repository
from tests.support.world import World

pytestmark = pytest.mark.integration

DIGEST = "sha256:" + "a" * 64


def test_v2_base_answers_curl(world: World) -> None:
    curl = require_tool("curl")
    done = subprocess.run(
        [curl, "-sS", "-i", "--max-time", "30", f"{world.gateway.url()}/v2/"],
        capture_output=True, check=True,
    )
    output = done.stdout.decode()
    head, _, _ = output.partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    assert status_line.split()[1] == "200", output
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert headers.get("docker-distribution-api-version") == "registry/2.0", output


WRITE_TARGETS = [
    "/v2/library/anything/manifests/latest",
    f"/v2/library/anything/manifests/{DIGEST}",
    "/v2/library/anything/blobs/uploads/",
    "/v2/library/anything/blobs/uploads/some-session-id",
    f"/v2/library/anything/blobs/{DIGEST}",
    "/v2/ghcr.io/owner/img/manifests/v1",
    "/v2/",
]


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize("target", WRITE_TARGETS)
async def test_writes_are_refused_with_405(
    world: World, http: aiohttp.ClientSession, method: str, target: str
) -> None:
    before = world.upstream_request_count()
    fetched = await fetch(http, world.gateway.url() + target, method=method, accept=None,
                          headers={"Content-Type": "application/octet-stream"})
    assert fetched.status == 405, fetched.describe()
    allow = {m.strip().upper() for m in fetched.headers.get("Allow", "").split(",")}
    assert allow == {"GET", "HEAD"}, fetched.headers.get("Allow")
    assert_oci_error(fetched)
    assert world.upstream_request_count() == before, "a refused write reached an upstream"


@pytest.fixture(scope="module")
def hub_repository(world: World) -> Iterator[str]:
    """A repository that exists on the docker.io upstream: `library/<name>`.

    The `..` cases below are built so that a gateway which normalised the path would
    find this repository and answer 200 instead of refusing.
    """
    repository = unique_repository("library")
    world.hub.push(repository, make_image(layer_sizes=(1024,)))
    yield repository


MALFORMED = {
    "uppercase-name": "/v2/Library/{name}/manifests/latest",
    "empty-component": "/v2/library//{name}/manifests/latest",
    "trailing-separator": "/v2/library/{name}_/manifests/latest",
    "leading-separator": "/v2/library/-{name}/manifests/latest",
    "nul-byte": "/v2/library/{name}%00/manifests/latest",
    "dot-dot": "/v2/library/x/../{name}/manifests/latest",
    "dot-dot-encoded": "/v2/library/x/%2e%2e/{name}/manifests/latest",
    "dot-dot-encoded-upper": "/v2/library/x/%2E%2E/{name}/manifests/latest",
    "dot-dot-half-encoded": "/v2/library/x/.%2e/{name}/manifests/latest",
    "dot-dot-before-v2": "/v2/../v2/library/{name}/manifests/latest",
    "dot-segment": "/v2/library/./{name}/manifests/latest",
    "digest-too-short": "/v2/library/{name}/blobs/sha256:abc",
    "digest-not-hex": "/v2/library/{name}/blobs/sha256:" + "z" * 64,
    "digest-uppercase-hex": "/v2/library/{name}/blobs/sha256:" + "A" * 64,
    "digest-without-algorithm": "/v2/library/{name}/blobs/" + "a" * 64,
    "digest-sha512-wrong-length": "/v2/library/{name}/blobs/sha512:" + "a" * 64,
    "manifest-digest-too-short": "/v2/library/{name}/manifests/sha256:" + "a" * 10,
    "tag-bad-character": "/v2/library/{name}/manifests/bad!tag",
    "tag-leading-dot": "/v2/library/{name}/manifests/.hidden",
    "tag-129-characters": "/v2/library/{name}/manifests/" + "t" * 129,
    "name-10kb-one-component": "/v2/" + "a" * 10240 + "/manifests/latest",
    "name-10kb-many-components": "/v2/" + "/".join(["abcdefghi"] * 1024) + "/manifests/latest",
    "unknown-endpoint": "/v2/library/{name}/not-an-endpoint",
}


@pytest.mark.parametrize("template", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_get_4xx_with_oci_error(
    world: World, hub_repository: str, template: str
) -> None:
    target = template.replace("{name}", hub_repository.split("/", 1)[1])
    before = world.upstream_request_count()
    # Sent with http.client so that the target reaches the gateway byte for byte: aiohttp
    # and curl would resolve the dot segments before sending.
    response = raw_request(world.gateway.host, world.gateway.port, "GET", target)
    assert 400 <= response.status < 500, (response.status, response.body[:300])
    oci_errors(response.header("Content-Type"), response.body, context=target[:200])
    assert world.upstream_request_count() == before, "a malformed request reached an upstream"


def test_the_seeded_repository_is_reachable(world: World, hub_repository: str) -> None:
    """Control for the `..` cases: the normalised path really would answer 200."""
    name = hub_repository.split("/", 1)[1]
    response = raw_request(world.gateway.host, world.gateway.port, "GET",
                           f"/v2/library/{name}/manifests/latest",
                           headers={"Accept": DOCKER_MANIFEST})
    assert response.status == 200, (response.status, response.body[:300])


@pytest.mark.parametrize("suffix", ["manifests/latest", f"blobs/{DIGEST}", "tags/list"])
async def test_unconfigured_registry_in_path_prefix_is_404(
    world: World, http: aiohttp.ClientSession, suffix: str
) -> None:
    before = world.upstream_request_count()
    fetched = await fetch(http, f"{world.gateway.url()}/v2/unconfigured.example/owner/img/{suffix}")
    assert fetched.status == 404, fetched.describe()
    assert_oci_error(fetched)
    assert world.upstream_request_count() == before, "the request went to some upstream"


@pytest.mark.parametrize("suffix", ["manifests/latest", f"blobs/{DIGEST}", "tags/list"])
async def test_unconfigured_registry_in_ns_is_404(
    world: World, http: aiohttp.ClientSession, suffix: str
) -> None:
    before = world.upstream_request_count()
    fetched = await fetch(http, f"{world.gateway.url()}/v2/owner/img/{suffix}",
                          params={"ns": "unconfigured.example"})
    assert fetched.status == 404, fetched.describe()
    assert_oci_error(fetched)
    assert world.upstream_request_count() == before, "the request went to some upstream"
