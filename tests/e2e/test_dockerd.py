"""A real dockerd pulling through the gateway: as a registry mirror (`docker pull NAME`
goes to docker.io/library/NAME through the default route), and by an exact host of the
docker.io route with and without `library/`. The daemon cannot fall back to Docker Hub
(see support/dockerd.py), so a successful pull came through the gateway."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dockerd import Dockerd, run_dockerd
from tests.support.images import Image, host_architecture, make_image, make_index
from tests.support.upstreams import unique_repository
from tests.support.world import HUB_HOST, World

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dockerd(world: World) -> Iterator[Dockerd]:
    with run_dockerd(registry_mirrors=(world.gateway.url(),),
                     insecure_registries=(world.gateway.address(HUB_HOST),)) as daemon:
        yield daemon


def assert_pulled(daemon: Dockerd, repository: str, image: Image, manifest_digest: str) -> None:
    """The daemon's `repository:latest` is exactly the upstream's image: config digest,
    layer diff_ids, and the manifest digest it was pulled by."""
    found = daemon.inspect_image(f"{repository}:latest")
    assert found["Id"] == image.config.digest
    assert found["RootFS"]["Layers"] == list(image.diff_ids)
    assert found["Architecture"] == image.architecture
    assert f"{repository}@{manifest_digest}" in found["RepoDigests"], found["RepoDigests"]


@pytest.mark.parametrize("oci", [False, True], ids=["docker-schema2", "oci"])
def test_plain_docker_pull_goes_through_the_mirror(world: World, dockerd: Dockerd,
                                                   oci: bool) -> None:
    upstream_repository = unique_repository("library")
    name = upstream_repository.split("/", 1)[1]
    image = world.hub.push(upstream_repository, make_image(oci=oci))

    dockerd.pull(name)

    assert_pulled(dockerd, name, image, image.digest)
    fetched = {s.path.rsplit("/", 1)[1] for s in world.hub.proxy.blob_requests(upstream_repository)}
    assert fetched == {b.digest for b in image.layers} | {image.config.digest}


def test_docker_pull_of_multi_arch_index_picks_the_host_platform(world: World,
                                                                 dockerd: Dockerd) -> None:
    upstream_repository = unique_repository("library")
    name = upstream_repository.split("/", 1)[1]
    index = world.hub.push_index(upstream_repository, make_index())
    wanted = index.image_for(host_architecture())

    dockerd.pull(name)

    assert_pulled(dockerd, name, wanted, index.digest)
    others = [i for i in index.images if i is not wanted]
    fetched = {s.path.rsplit("/", 1)[1] for s in world.hub.proxy.blob_requests(upstream_repository)}
    assert not fetched & {b.digest for i in others for b in i.layers}, "pulled other platforms"


@pytest.mark.parametrize("spelling", ["library/{name}", "{name}"],
                         ids=["with-library", "without-library"])
def test_docker_pull_by_explicit_host(world: World, dockerd: Dockerd, spelling: str) -> None:
    upstream_repository = unique_repository("library")
    name = upstream_repository.split("/", 1)[1]
    image = world.hub.push(upstream_repository, make_image())
    reference = f"{world.gateway.address(HUB_HOST)}/{spelling.format(name=name)}"

    dockerd.pull(reference)

    assert_pulled(dockerd, reference, image, image.digest)
    assert world.hub.proxy.blob_requests(upstream_repository)


def test_second_docker_pull_after_rmi_is_served_from_cache(world: World,
                                                           dockerd: Dockerd) -> None:
    upstream_repository = unique_repository("library")
    name = upstream_repository.split("/", 1)[1]
    image = world.hub.push(upstream_repository, make_image())
    dockerd.pull(name)
    fetched = len(world.hub.proxy.blob_requests(upstream_repository))
    dockerd.remove_image(name)

    dockerd.pull(name)

    assert_pulled(dockerd, name, image, image.digest)
    assert len(world.hub.proxy.blob_requests(upstream_repository)) == fetched
