"""Manifest content negotiation as real clients do it. Go clients (containers/image in
skopeo and podman, docker's distribution client) send one `Accept` header line per media
type rather than one comma-separated line; every line counts (RFC 9110 section 5.3)."""

from __future__ import annotations

import pytest

from tests.support.client import raw_request
from tests.support.images import DOCKER_MANIFEST_LIST, Blob, make_image, make_index
from tests.support.upstreams import unique_repository
from tests.support.world import World

pytestmark = pytest.mark.integration

# What skopeo 1.9 sends for GET .../manifests/<reference>, in this order.
GO_CLIENT_ACCEPT = [
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.v1+prettyjws"),
    ("Accept", "application/vnd.docker.distribution.manifest.v1+json"),
    ("Accept", "application/vnd.docker.distribution.manifest.list.v2+json"),
    ("Accept", "application/vnd.oci.image.index.v1+json"),
]


def _seed(world: World, kind: str, repository: str) -> Blob:
    if kind == "docker-list":
        return world.ghcr.push_index(repository, make_index()).manifest
    return world.ghcr.push(repository, make_image(oci=kind == "oci")).manifest


@pytest.mark.parametrize("kind", ["docker-schema2", "oci", "docker-list"])
@pytest.mark.parametrize("by", ["tag", "digest"])
def test_repeated_accept_lines_get_the_stored_manifest(world: World, kind: str, by: str) -> None:
    repository = unique_repository()
    manifest = _seed(world, kind, repository)
    reference = "latest" if by == "tag" else manifest.digest

    for attempt in ("upstream", "cache"):
        response = raw_request(world.gateway.host, world.gateway.port, "GET",
                               f"/v2/ghcr.io/{repository}/manifests/{reference}",
                               headers=GO_CLIENT_ACCEPT)
        assert response.status == 200, (attempt, response.status, response.body[:300])
        assert response.body == manifest.data, f"{attempt}: not the upstream's manifest"
        assert response.header("Docker-Content-Digest") == manifest.digest
        assert response.header("Content-Type") == manifest.media_type


def test_manifest_list_is_not_resolved_for_a_client_that_accepts_it(world: World) -> None:
    """Control with one comma-separated Accept line (what aiohttp and curl users send)."""
    repository = unique_repository()
    index = world.ghcr.push_index(repository, make_index())
    response = raw_request(world.gateway.host, world.gateway.port, "GET",
                           f"/v2/ghcr.io/{repository}/manifests/latest",
                           headers={"Accept": ", ".join(v for _, v in GO_CLIENT_ACCEPT)})
    assert response.status == 200, response.body[:300]
    assert response.header("Content-Type") == DOCKER_MANIFEST_LIST
    assert response.body == index.manifest.data
