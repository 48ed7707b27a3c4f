"""skopeo (containers/image) copying through the gateway: routed by exact Host and by
/v2/<registry>/ path prefix (skopeo cannot send ?ns=; see integration/test_routing.py),
single images in both manifest formats, a multi-arch index kept intact, a token-auth
upstream, and a second copy served from the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.images import Image, make_image, make_index
from tests.support.skopeo import DirLayout, OciLayout, Skopeo
from tests.support.upstreams import unique_repository
from tests.support.world import GHCR_HOST, PRIVATE_ROUTE, World

pytestmark = pytest.mark.e2e


@pytest.fixture
def skopeo(tmp_path: Path) -> Skopeo:
    return Skopeo(tmp_path / "skopeo")


def assert_dir_holds(layout: DirLayout, image: Image) -> None:
    assert layout.manifest() == image.manifest.data
    blobs = layout.blob_digests()
    assert set(blobs) == {b.digest for b in image.blobs}
    assert all(name == content for name, content in blobs.items()), blobs


@pytest.mark.parametrize("oci", [False, True], ids=["docker-schema2", "oci"])
def test_copy_routed_by_exact_host(world: World, skopeo: Skopeo, tmp_path: Path,
                                   oci: bool) -> None:
    repository = unique_repository()
    image = world.ghcr.push(repository, make_image(oci=oci), tags=("v1",))

    skopeo.copy(f"{world.gateway.address(GHCR_HOST)}/{repository}:v1", f"dir:{tmp_path / 'out'}",
                "--preserve-digests")

    assert_dir_holds(DirLayout(tmp_path / "out"), image)
    assert world.ghcr.proxy.blob_requests(repository), "ghcr's upstream was not asked"


def test_copy_routed_by_path_prefix_to_oci_layout(world: World, skopeo: Skopeo,
                                                  tmp_path: Path) -> None:
    repository = unique_repository()
    image = world.ghcr.push(repository, make_image(oci=True), tags=("v1",))
    reference = f"{world.gateway.address()}/ghcr.io/{repository}:v1"

    assert skopeo.inspect_raw(reference) == image.manifest.data
    skopeo.copy(reference, f"oci:{tmp_path / 'layout'}:v1", "--preserve-digests")

    layout = OciLayout(tmp_path / "layout")
    assert layout.manifest_digest("v1") == image.digest
    assert layout.blob(image.digest) == image.manifest.data
    blobs = layout.blob_digests()
    assert {b.digest for b in image.blobs} <= set(blobs)
    assert all(name == content for name, content in blobs.items()), blobs


@pytest.mark.parametrize("oci", [False, True], ids=["docker-manifest-list", "oci-index"])
def test_multi_arch_index_is_intact_and_each_platform_pulls(
    world: World, skopeo: Skopeo, tmp_path: Path, oci: bool
) -> None:
    repository = unique_repository()
    index = world.ghcr.push_index(repository, make_index(oci=oci), tags=("multi",))
    reference = f"{world.gateway.address()}/ghcr.io/{repository}:multi"

    assert skopeo.inspect_raw(reference) == index.manifest.data

    skopeo.copy(reference, f"dir:{tmp_path / 'all'}", "--all", "--preserve-digests")
    everything = DirLayout(tmp_path / "all")
    assert everything.manifest() == index.manifest.data
    for image in index.images:
        assert everything.manifest(image.digest) == image.manifest.data

    for image in index.images:
        out = tmp_path / image.architecture
        skopeo.copy(reference, f"dir:{out}", architecture=image.architecture)
        assert_dir_holds(DirLayout(out), image)


def test_second_copy_is_served_from_cache(world: World, skopeo: Skopeo, tmp_path: Path) -> None:
    repository = unique_repository()
    image = world.ghcr.push(repository, make_image(), tags=("v1",))
    reference = f"{world.gateway.address()}/ghcr.io/{repository}:v1"

    skopeo.copy(reference, f"dir:{tmp_path / 'first'}")
    fetched = world.ghcr.proxy.blob_requests(repository)
    assert {s.path.rsplit("/", 1)[1] for s in fetched} == {b.digest for b in image.blobs}

    skopeo.copy(reference, f"dir:{tmp_path / 'second'}")

    assert_dir_holds(DirLayout(tmp_path / "second"), image)
    assert len(world.ghcr.proxy.blob_requests(repository)) == len(fetched), (
        "the second copy fetched blobs from the upstream again")


def test_copy_from_token_auth_upstream(world: World, skopeo: Skopeo, tmp_path: Path) -> None:
    repository = unique_repository()
    image = world.private.push(repository, make_image(), tags=("v1",))

    skopeo.copy(f"{world.gateway.address()}/{PRIVATE_ROUTE}/{repository}:v1",
                f"dir:{tmp_path / 'out'}")

    assert_dir_holds(DirLayout(tmp_path / "out"), image)
