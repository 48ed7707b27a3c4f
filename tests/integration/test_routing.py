"""Routing through the real gateway to real upstream registries: by exact Host, by
<label>.<base domain>, by /v2/<registry>/ path prefix, by ?ns=, and the default route
with Docker Hub's library/ rule. Every pull checks the bytes against the upstream's
and that the right upstream (and only it) was asked."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import pytest

from tests.support.images import make_image, make_index
from tests.support.pulls import assert_oci_error, fetch, pull_image, pull_index
from tests.support.upstreams import unique_repository
from tests.support.world import BASE_DOMAIN, GHCR_HOST, HUB_HOST, World

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Way:
    """How a client names a registry: where it connects, Host, path prefix, ns=."""

    connect: str = "127.0.0.1"
    host_label: str | None = None  # send Host: <label>.<base domain>:<port>
    prefix: str = ""  # /v2/<prefix><repository>
    ns: str | None = None

    def base(self, world: World) -> str:
        return world.gateway.url(self.connect)

    def host(self, world: World) -> str | None:
        if self.host_label is None:
            return None
        return f"{self.host_label}.{BASE_DOMAIN}:{world.gateway.port}"

    def params(self) -> dict[str, str] | None:
        return {"ns": self.ns} if self.ns else None


GHCR_WAYS = {
    "exact-host": Way(connect=GHCR_HOST),
    "label-host": Way(host_label="ghcr"),
    "path-prefix": Way(prefix="ghcr.io/"),
    "ns": Way(ns="ghcr.io"),
}


@pytest.mark.parametrize("way", GHCR_WAYS.values(), ids=GHCR_WAYS.keys())
async def test_ghcr_route(world: World, http: aiohttp.ClientSession, way: Way) -> None:
    repository = unique_repository()
    image = world.ghcr.push(repository, make_image(), tags=("v1",))

    result = await pull_image(http, way.base(world), way.prefix + repository, "v1", image,
                              host=way.host(world), params=way.params())

    assert result.route == {"ghcr.io"}
    fetched = {s.path.rsplit("/", 1)[1] for s in world.ghcr.proxy.blob_requests(repository)}
    assert fetched == {b.digest for b in image.blobs}, "blobs did not come from ghcr's upstream"
    for other in (world.hub, world.quay):
        assert not other.proxy.requests_for(repository)
        assert not other.proxy.requests_for("library/" + repository)


# (way, the repository as the client names it); the upstream repository is library/<name>.
HUB_WAYS = {
    "default-route": (Way(), "library/{name}"),
    "default-route-short-name": (Way(), "{name}"),
    "exact-host": (Way(connect=HUB_HOST), "library/{name}"),
    "exact-host-short-name": (Way(connect=HUB_HOST), "{name}"),
    "label-host-short-name": (Way(host_label="hub"), "{name}"),
    "path-prefix": (Way(prefix="docker.io/"), "library/{name}"),
    "path-prefix-short-name": (Way(prefix="docker.io/"), "{name}"),
    "ns": (Way(ns="docker.io"), "library/{name}"),
}


@pytest.mark.parametrize(("way", "spelling"), HUB_WAYS.values(), ids=HUB_WAYS.keys())
async def test_docker_hub_route_and_library_rule(
    world: World, http: aiohttp.ClientSession, way: Way, spelling: str
) -> None:
    upstream_repository = unique_repository("library")
    name = upstream_repository.split("/", 1)[1]
    image = world.hub.push(upstream_repository, make_image())

    result = await pull_image(http, way.base(world), way.prefix + spelling.format(name=name),
                              "latest", image, host=way.host(world), params=way.params())

    assert result.route == {"docker.io"}
    assert world.hub.proxy.blob_requests(upstream_repository), "nothing was fetched from hub"
    assert not world.hub.proxy.requests_for(name), "the library/ prefix was not added"


@pytest.mark.parametrize("oci", [False, True], ids=["docker-manifest-list", "oci-index"])
async def test_multi_arch_index_is_served_intact(
    world: World, http: aiohttp.ClientSession, oci: bool
) -> None:
    repository = unique_repository()
    index = world.ghcr.push_index(repository, make_index(oci=oci), tags=("multi",))

    # pull_index checks the index bytes and digest, then pulls each platform by digest.
    await pull_index(http, world.gateway.url(), f"ghcr.io/{repository}", "multi", index)
    again = await pull_index(http, world.gateway.url(), f"ghcr.io/{repository}", index.digest,
                             index)

    assert again.route == {"ghcr.io"}
    assert {i.architecture for i in index.images} == {"amd64", "arm64"}


async def test_same_repository_on_two_upstreams_never_mixes(
    world: World, http: aiohttp.ClientSession
) -> None:
    repository = unique_repository()
    on_ghcr = world.ghcr.push(repository, make_image(), tags=("latest",))
    on_quay = world.quay.push(repository, make_image(), tags=("latest",))
    base = world.gateway.url()

    # Alternate, so that each pull meets a warm cache for the other upstream's repository.
    await pull_image(http, base, f"ghcr.io/{repository}", "latest", on_ghcr)
    await pull_image(http, base, f"quay.io/{repository}", "latest", on_quay)
    await pull_image(http, base, repository, "latest", on_ghcr, params={"ns": "ghcr.io"})
    await pull_image(http, base, repository, "latest", on_quay, params={"ns": "quay.io"})
    await pull_image(http, base, f"ghcr.io/{repository}", "latest", on_ghcr)

    # What only one upstream has is unknown on the other route, cached or not.
    for route, foreign in (("quay.io", on_ghcr), ("ghcr.io", on_quay)):
        manifest = await fetch(http, f"{base}/v2/{route}/{repository}/manifests/{foreign.digest}")
        assert manifest.status == 404, manifest.describe()
        assert_oci_error(manifest)
        for blob in foreign.blobs:
            fetched = await fetch(http, f"{base}/v2/{route}/{repository}/blobs/{blob.digest}",
                                  accept=None)
            assert fetched.status == 404, fetched.describe()
