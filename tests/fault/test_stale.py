"""Stale-if-error with real clients (issue #5): once the upstream is stopped or answers
429/503, a tag past its TTL is served from cache with `X-Cache: STALE`, and a real
Docker daemon (a private dockerd whose registry mirror is the gateway) and skopeo
still pull the cached image.

The private dockerd cannot fall back to the internet (its proxy refuses), so a pull
that succeeds came through the gateway.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.client import Response, raw_request
from tests.support.dockerd import Dockerd, run_dockerd
from tests.support.gateway import Gateway
from tests.support.images import ACCEPT_ALL_MANIFESTS, Image, make_image, sha256_digest
from tests.support.inprocess import InProcessGateway
from tests.support.tools import require_tool
from tests.support.upstreams import Upstream, route_entry, unique_repository

pytestmark = pytest.mark.fault

TAG = "v1"


AnyGateway = Gateway | InProcessGateway


@pytest.fixture
def start_dockerd() -> Iterator[Callable[[AnyGateway], Dockerd]]:
    """A private dockerd whose registry mirror is a given gateway; stopped at the end."""
    with ExitStack() as stack:

        def start(gateway: AnyGateway) -> Dockerd:
            return stack.enter_context(run_dockerd(registry_mirrors=(gateway.url(),),
                                                   insecure_registries=(gateway.address(),)))

        yield start


def get(gateway: AnyGateway, target: str, method: str = "GET") -> Response:
    return raw_request(gateway.host, gateway.port, method, target,
                       headers={"Accept": ACCEPT_ALL_MANIFESTS})


def warm(gateway: AnyGateway, repository: str, image: Image) -> None:
    """Pull the image once through the gateway (cold: every answer is a MISS)."""
    by_tag = get(gateway, f"/v2/{repository}/manifests/{TAG}")
    assert by_tag.status == 200 and by_tag.body == image.manifest.data
    assert by_tag.header("X-Cache") == "MISS"
    by_digest = get(gateway, f"/v2/{repository}/manifests/{image.digest}")
    assert by_digest.status == 200 and by_digest.body == image.manifest.data
    for blob in image.blobs:
        got = get(gateway, f"/v2/{repository}/blobs/{blob.digest}")
        assert got.status == 200 and sha256_digest(got.body) == blob.digest


def skopeo_copy(gateway: AnyGateway, repository: str, destination: Path) -> None:
    skopeo = require_tool("skopeo")
    home = destination.parent / "skopeo-home"
    home.mkdir(exist_ok=True)
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                   "REGISTRY_AUTH_FILE": str(home / "auth.json")}
    done = subprocess.run(
        [skopeo, "--insecure-policy", "copy", "--src-tls-verify=false",
         f"docker://{gateway.address()}/{repository}:{TAG}", f"dir:{destination}"],
        capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, (
        f"skopeo copy failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


@pytest.mark.parametrize("failure", ["stopped", 429, 503])
def test_stale_tag_is_served_and_real_clients_still_pull(
    start_upstream: Callable[..., Upstream],
    start_inprocess_gateway: Callable[..., InProcessGateway],
    start_dockerd: Callable[[AnyGateway], Dockerd], tmp_path: Path, failure: str | int,
) -> None:
    require_tool("skopeo")
    upstream = start_upstream("docker.io")
    repository = unique_repository("fault")
    image = upstream.push(repository, make_image(layer_sizes=(64 * 1024, 192 * 1024)),
                          tags=(TAG,))
    gateway = start_inprocess_gateway({"default_route": "docker.io", "routes": {
        "docker.io": route_entry(upstream, tag_ttl="2s", stale_if_error="forever")}})
    warm(gateway, repository, image)

    if failure == "stopped":
        upstream.stop()
    else:
        assert isinstance(failure, int)
        upstream.proxy.fail_status = failure

    # Within the TTL the tag is a plain HIT, without asking the failing upstream.
    asked = len(upstream.proxy.manifest_requests(repository))
    within = get(gateway, f"/v2/{repository}/manifests/{TAG}")
    assert (within.status, within.header("X-Cache")) == (200, "HIT")
    assert len(upstream.proxy.manifest_requests(repository)) == asked
    # After it, revalidation fails: STALE.
    gateway.clock.advance(3)
    now = get(gateway, f"/v2/{repository}/manifests/{TAG}")
    assert now.status == 200, f"{now.status} {now.body[:300]!r}"
    assert now.body == image.manifest.data
    assert now.header("Docker-Content-Digest") == image.digest
    assert now.header("X-Cache") == "STALE"
    assert now.header("Content-Type") == image.manifest.media_type
    head = get(gateway, f"/v2/{repository}/manifests/{TAG}", method="HEAD")
    assert head.status == 200 and head.header("X-Cache") == "STALE"
    assert head.header("Docker-Content-Digest") == image.digest
    if failure != "stopped":
        refused = [s for s in upstream.proxy.manifest_requests(repository)
                   if s.status == failure]
        assert refused, "the gateway never asked the failing upstream"

    dockerd = start_dockerd(gateway)
    dockerd.pull(f"{repository}:{TAG}")
    pulled = dockerd.inspect_image(f"{repository}:{TAG}")
    assert pulled["Id"] == image.config.digest
    assert f"{repository}@{image.digest}" in pulled.get("RepoDigests", [])

    copied = tmp_path / "skopeo-copy"
    skopeo_copy(gateway, repository, copied)
    assert (copied / "manifest.json").read_bytes() == image.manifest.data
    for blob in image.blobs:
        stored = copied / blob.digest.split(":", 1)[1]
        assert sha256_digest(stored.read_bytes()) == blob.digest, f"skopeo got bad {blob.digest}"

    still = get(gateway, f"/v2/{repository}/manifests/{TAG}")
    assert still.status == 200 and still.header("X-Cache") == "STALE"
