"""The gateway on S3-compatible storage (`storage: {type: s3}`) against a real SeaweedFS:
cold and warm pulls by crane and skopeo with verified digests, a warm blob GET costing at
most one S3 request (counted by SeaweedFS itself, also after a restart with an empty
index), 307s to presigned URLs that the clients follow, and nothing ever committed under a
blob's key unless its digest checked (corrupt bytes, a broken upstream, an abandoned
fetch all leave no object and no open multipart upload).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.dockerd import run_dockerd
from tests.support.faults import Fault
from tests.support.gateway import Gateway
from tests.support.images import Image, make_image, sha256_digest
from tests.support.net import free_port
from tests.support.pulls import pull_image
from tests.support.sandbox import run_containerd, run_sandbox
from tests.support.seaweed import SeaweedFS, run_seaweed
from tests.support.skopeo import DirLayout, Skopeo
from tests.support.tools import local_tool
from tests.support.transfers import read_then_hang_up, stream_get
from tests.support.upstreams import Upstream, unique_repository
from tests.support.wait import wait_for, wait_until

pytestmark = pytest.mark.integration

PART = 5 << 20
# Three blobs: the config, a small layer (one PUT), and a layer of three parts.
LAYERS = (48 * 1024, 2 * PART + 300_000)


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with run_seaweed(tmp_path_factory.mktemp("seaweed")) as running:
        yield running


def s3_routes(upstream: Upstream, seaweed: SeaweedFS, **storage: Any) -> dict[str, Any]:
    prefix = f"gw-{secrets.token_hex(4)}"
    return {"routes": {"ghcr.io": {"upstream": upstream.url,
                                   # One stream per blob: one upstream GET each to count.
                                   "parallel_fetch_threshold": "off"}},
            "storage": seaweed.storage(prefix=prefix, part_size="5MiB", **storage)}


def blob_object(routes: dict[str, Any], digest: str) -> str:
    hex_digest = digest.removeprefix("sha256:")
    return f"{routes['storage']['prefix']}/ghcr.io/blobs/sha256/{hex_digest[:2]}/{hex_digest}"


def stored(seaweed: SeaweedFS, routes: dict[str, Any]) -> dict[str, int]:
    return seaweed.keys(routes["storage"]["prefix"] + "/")


def crane(tmp_path: Path, *args: str) -> str:
    home = tmp_path / "crane-home"
    home.mkdir(exist_ok=True)
    done = subprocess.run([local_tool("crane"), *args], capture_output=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(home)})
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return done.stdout.decode()


def assert_oci_layout_holds(layout: Path, image: Image) -> None:
    """crane's OCI layout: the image's manifest and every blob, each file named by the
    digest of what it holds."""
    blobs = {f"sha256:{p.name}": p.read_bytes() for p in (layout / "blobs/sha256").iterdir()}
    assert all(sha256_digest(data) == name for name, data in blobs.items())
    assert {b.digest for b in image.blobs} | {image.digest} <= set(blobs)
    index = json.loads((layout / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image.digest]


def redirects(gateway: Gateway, digest: str) -> int:
    """307s the gateway answered to GETs of blob `digest` (its access log)."""
    count = 0
    for line in gateway.log().splitlines():
        if line.startswith("{") and f"/blobs/{digest}" in line:
            entry = json.loads(line)
            count += entry.get("status") == 307 and entry.get("method") == "GET"
    return count


def upstream_blob_gets(upstream: Upstream, repository: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for seen in upstream.proxy.blob_requests(repository):
        digest = seen.path.rsplit("/", 1)[1]
        counts[digest] = counts.get(digest, 0) + 1
    return counts


def test_cold_and_warm_pulls_with_one_s3_request_per_warm_blob(
        seaweed: SeaweedFS, start_upstream: Callable[..., Upstream],
        start_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    upstream = start_upstream("ghcr.io")
    repository = unique_repository()
    image = upstream.push(repository, make_image(layer_sizes=LAYERS, oci=True), tags=("v1",))
    routes = s3_routes(upstream, seaweed)
    gateway = start_gateway(routes)
    reference = f"{gateway.address()}/ghcr.io/{repository}:v1"

    crane(tmp_path, "pull", "--insecure", "--format=oci", reference, str(tmp_path / "cold"))
    assert_oci_layout_holds(tmp_path / "cold", image)
    assert upstream_blob_gets(upstream, repository) == {b.digest: 1 for b in image.blobs}

    # Committed under the content-addressed keys, whole; no upload left open.
    def committed() -> bool:
        keys = stored(seaweed, routes)
        return all(keys.get(blob_object(routes, b.digest)) == b.size for b in image.blobs)

    wait_for(committed, what="every blob committed to the bucket")
    assert seaweed.object(blob_object(routes, image.layers[1].digest)) == image.layers[1].data
    assert seaweed.uploads() == []

    skopeo = Skopeo(tmp_path / "skopeo")
    skopeo.copy(reference, f"dir:{tmp_path / 'warm'}", "--preserve-digests")
    warm = DirLayout(tmp_path / "warm")
    assert warm.manifest() == image.manifest.data
    assert all(name == content for name, content in warm.blob_digests().items())
    crane(tmp_path, "pull", "--insecure", "--format=oci", reference, str(tmp_path / "warm2"))
    assert_oci_layout_holds(tmp_path / "warm2", image)
    assert upstream_blob_gets(upstream, repository) == {b.digest: 1 for b in image.blobs}

    # One blob GET, whole or ranged, costs at most one S3 request; also after a restart,
    # when the index knows nothing and the size comes with the GET's answer.
    big = image.layers[1]
    client = gateway.client()
    for restart in (False, True):
        if restart:
            gateway.stop()
            gateway.start()
        for headers, want in (({}, big.data), ({"Range": "bytes=100-199"}, big.data[100:200]),
                              ({"Range": "bytes=-10"}, big.data[-10:])):
            before = seaweed.request_count()
            got = client.get(f"/v2/ghcr.io/{repository}/blobs/{big.digest}", headers=headers)
            assert got.status in (200, 206) and got.body == want
            assert got.header("X-Cache") == "HIT"
            assert seaweed.request_count() - before <= 1, seaweed.requests()
    assert upstream_blob_gets(upstream, repository) == {b.digest: 1 for b in image.blobs}


def test_clients_pull_through_redirects_to_presigned_urls(
        seaweed: SeaweedFS, start_upstream: Callable[..., Upstream],
        start_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    upstream = start_upstream("ghcr.io")
    repository = unique_repository()
    image = upstream.push(repository, make_image(layer_sizes=LAYERS), tags=("v1",))
    routes = s3_routes(upstream, seaweed, redirect={"min_size": "1MiB", "expires": "5m"})
    gateway = start_gateway(routes)
    reference = f"{gateway.address()}/ghcr.io/{repository}:v1"
    skopeo = Skopeo(tmp_path / "skopeo")

    skopeo.copy(reference, f"dir:{tmp_path / 'cold'}", "--preserve-digests")  # from the flight
    big, small = image.layers[1], image.layers[0]
    wait_for(lambda: blob_object(routes, big.digest) in stored(seaweed, routes),
             what="the big layer committed")

    client = gateway.client()
    asked = seaweed.request_count()
    redirected = client.get(f"/v2/ghcr.io/{repository}/blobs/{big.digest}")
    assert redirected.status == 307, redirected.status
    assert seaweed.request_count() == asked, "the index knew the size: no S3 request"
    location = redirected.header("Location") or ""
    assert location.startswith(seaweed.endpoint + "/") and "X-Amz-Signature=" in location
    assert redirected.header("Docker-Content-Digest") == big.digest
    assert redirected.header("X-Cache") == "HIT"
    below = client.get(f"/v2/ghcr.io/{repository}/blobs/{small.digest}")
    assert below.status == 200 and below.body == small.data  # under min_size: served here

    before = seaweed.requests().get(("GET", "200"), 0)
    assert redirects(gateway, big.digest) == 1
    skopeo.copy(reference, f"dir:{tmp_path / 'warm'}", "--preserve-digests")
    warm = DirLayout(tmp_path / "warm")
    assert warm.manifest() == image.manifest.data
    assert set(warm.blob_digests()) == {b.digest for b in image.blobs}
    assert all(name == content for name, content in warm.blob_digests().items())
    crane(tmp_path, "pull", "--insecure", "--format=oci", reference, str(tmp_path / "crane"))
    assert_oci_layout_holds(tmp_path / "crane", image)
    # skopeo and crane were each sent to SeaweedFS for the big layer, and went.
    assert redirects(gateway, big.digest) == 3
    assert redirects(gateway, small.digest) == 0
    assert seaweed.requests().get(("GET", "200"), 0) - before >= 2
    assert upstream_blob_gets(upstream, repository) == {b.digest: 1 for b in image.blobs}


async def no_fetch_in_flight(session: aiohttp.ClientSession, gateway: Gateway) -> bool:
    """The gateway's own gauge: a fetch ends after its upload was committed or aborted."""
    async with session.get(gateway.url() + "/metrics") as answer:
        text = await answer.text()
    return not any(line.startswith("gateway_inflight_fetches{") and
                   float(line.rsplit(" ", 1)[1]) > 0 for line in text.splitlines())


@pytest.mark.e2e
def test_docker_pulls_through_redirects_to_presigned_urls(
        seaweed: SeaweedFS, start_upstream: Callable[..., Upstream],
        start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("ghcr.io")
    repository = unique_repository()
    image = upstream.push(repository, make_image(layer_sizes=LAYERS), tags=("v1",))
    routes = s3_routes(upstream, seaweed, redirect={"min_size": "1MiB"})
    gateway = start_gateway(routes)
    client = gateway.client()
    for blob in image.blobs:  # warm: committed to the bucket
        assert client.get(f"/v2/ghcr.io/{repository}/blobs/{blob.digest}").status == 200
    wait_for(lambda: all(blob_object(routes, b.digest) in stored(seaweed, routes)
                         for b in image.blobs), what="every blob committed")
    before = seaweed.requests().get(("GET", "200"), 0)
    reference = f"{gateway.address()}/ghcr.io/{repository}:v1"
    with run_dockerd(insecure_registries=(gateway.address(),)) as daemon:
        daemon.pull(reference)
        found = daemon.inspect_image(reference)
    assert found["Id"] == image.config.digest
    assert found["RootFS"]["Layers"] == list(image.diff_ids)
    assert redirects(gateway, image.layers[1].digest) == 1
    assert seaweed.requests().get(("GET", "200"), 0) > before, "dockerd never reached S3"
    assert upstream_blob_gets(upstream, repository) == {b.digest: 1 for b in image.blobs}


@pytest.mark.e2e
def test_containerd_pulls_through_redirects_to_presigned_urls(
        seaweed: SeaweedFS, start_upstream: Callable[..., Upstream],
        start_gateway: Callable[..., Gateway]) -> None:
    """ctr in a network namespace of its own, where the gateway's and SeaweedFS's loopback
    ports are relayed to ours: the 307's URL names 127.0.0.1 and the S3 port."""
    upstream = start_upstream("ghcr.io")
    repository = unique_repository()
    image = upstream.push(repository, make_image(layer_sizes=LAYERS), tags=("v1",))
    routes = s3_routes(upstream, seaweed, redirect={"min_size": "1MiB"})
    gateway = start_gateway(routes)
    client = gateway.client()
    for blob in image.blobs:
        assert client.get(f"/v2/ghcr.io/{repository}/blobs/{blob.digest}").status == 200
    wait_for(lambda: all(blob_object(routes, b.digest) in stored(seaweed, routes)
                         for b in image.blobs), what="every blob committed")
    with run_sandbox(()) as sandbox, run_containerd(sandbox) as containerd:
        for port in (gateway.port, seaweed.s3_port):
            sandbox.forward(("127.0.0.1", port), ("127.0.0.1", port))
        reference = f"{gateway.address()}/ghcr.io/{repository}:v1"
        containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "native", reference)
        listed = containerd.ctr("images", "ls").stdout
        line = next(line for line in listed.splitlines() if line.startswith(reference))
        assert image.digest in line, listed
        content = containerd.ctr("content", "ls").stdout  # verified by containerd
        assert all(blob.digest in content for blob in image.blobs), content
    assert redirects(gateway, image.layers[1].digest) == 1
    assert upstream_blob_gets(upstream, repository) == {b.digest: 1 for b in image.blobs}


def _nothing_under(seaweed: SeaweedFS, routes: dict[str, Any], digest: str) -> None:
    assert blob_object(routes, digest) not in stored(seaweed, routes)
    assert seaweed.uploads() == [], "a multipart upload was left open"


@pytest.mark.parametrize("fault", ["corrupt", "broken"])
async def test_a_blob_that_fails_is_never_committed(
        seaweed: SeaweedFS, start_upstream: Callable[..., Upstream],
        start_gateway: Callable[..., Gateway], fault: str) -> None:
    upstream = start_upstream("ghcr.io")
    repository = unique_repository()
    image = upstream.push(repository, make_image(layer_sizes=(3 * PART,)), tags=("v1",))
    layer = image.layers[0]
    path = f"/v2/{repository}/blobs/{layer.digest}"
    if fault == "corrupt":  # every byte arrives, the last part's byte is wrong
        upstream.proxy.queue("GET", path, Fault(corrupt_at=(layer.size - 2,)))
    else:  # the connection breaks after two parts, and every resume breaks too
        upstream.proxy.always("GET", path, Fault(cut_at=2 * PART + 1000))
    routes = s3_routes(upstream, seaweed)
    gateway = start_gateway(routes)
    blob_url = gateway.url() + f"/v2/ghcr.io/{repository}/blobs/{layer.digest}"
    async with aiohttp.ClientSession() as session:
        got = await stream_get(session, blob_url)
        assert got.error is not None or got.status >= 500, "a failed blob ended cleanly"
        await wait_until(lambda: no_fetch_in_flight(session, gateway),
                         what="the failed fetch to end (its upload aborted)")
    _nothing_under(seaweed, routes, layer.digest)
    if fault == "corrupt":  # the next GET fetches again and commits the right bytes
        upstream.proxy.reset()
        async with aiohttp.ClientSession() as session:
            again = await stream_get(session, blob_url)
        assert again.error is None and again.digest == layer.digest
        wait_for(lambda: blob_object(routes, layer.digest) in stored(seaweed, routes),
                 what="the verified blob committed")
        assert seaweed.object(blob_object(routes, layer.digest)) == layer.data


async def test_an_abandoned_fetch_leaves_no_object(
        seaweed: SeaweedFS, start_upstream: Callable[..., Upstream],
        start_gateway: Callable[..., Gateway]) -> None:
    """The only client hangs up and the route keeps no orphaned fetch: the parts already
    sent are aborted, nothing appears under the key."""
    upstream = start_upstream("ghcr.io")
    repository = unique_repository()
    size = 4 * PART
    data = os.urandom(size)
    digest = sha256_digest(data)
    upstream.registry.client().push_blob(repository, data, digest)
    upstream.proxy.throttle_bytes_per_second = 8 << 20  # ~2.5 s: time to hang up mid-way
    routes = s3_routes(upstream, seaweed)
    routes["routes"]["ghcr.io"]["orphan_fetch_limit"] = 0
    gateway = start_gateway(routes)
    target = f"/v2/ghcr.io/{repository}/blobs/{digest}"

    def upload_begun() -> bool:
        return any(k == blob_object(routes, digest) for k in seaweed.uploads())

    hung_up = await read_then_hang_up(
        gateway.host, gateway.port, target, PART + (1 << 20),
        before_hang_up=lambda: wait_for(upload_begun, what="a part sent while streaming",
                                        interval=0.05))
    assert hung_up.status == 200
    async with aiohttp.ClientSession() as session:
        await wait_until(lambda: no_fetch_in_flight(session, gateway),
                         what="the abandoned fetch to end (its upload aborted)")
    _nothing_under(seaweed, routes, digest)
    assert upstream.proxy.blob_bytes(repository, digest=digest) < size


def test_a_rotated_key_file_applies_live_and_a_new_bucket_is_refused(
        seaweed: SeaweedFS, start_upstream: Callable[..., Upstream],
        start_gateway: Callable[..., Gateway]) -> None:
    """The secret file is watched like any secret: the wrong key gives 503s (never the
    secret in the answer or the log), the right one written to the file is used at once;
    a reload that names another bucket is refused and the running config stays."""
    upstream = start_upstream("ghcr.io")
    repository = unique_repository()
    image = upstream.push(repository, make_image(layer_sizes=(4096,)), tags=("v1",))
    routes = s3_routes(upstream, seaweed)
    secret_file = Path(routes["storage"]["secret_key_file"])
    wrong = "wrong-" + secrets.token_hex(8)
    secret_file.write_text(wrong + "\n")
    gateway = start_gateway(routes, extra_args=("--config-poll", "0.2"))
    client = gateway.client()
    target = f"/v2/ghcr.io/{repository}/manifests/v1"

    refused = client.get(target, accept=image.manifest.media_type)
    assert refused.status == 503, refused.status
    assert refused.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert wrong not in refused.body.decode()

    secret_file.write_text(seaweed.secret_key + "\n")
    wait_for(lambda: client.get(target, accept=image.manifest.media_type).status == 200,
             what="the new key in use", timeout=30, interval=0.2)
    for blob in image.blobs:
        got = client.get(f"/v2/ghcr.io/{repository}/blobs/{blob.digest}")
        assert got.status == 200 and got.body == blob.data

    moved = dict(routes, storage=dict(routes["storage"], bucket="another-bucket"))
    gateway.routes = moved
    gateway.write_routes()
    wait_for(lambda: "takes a restart" in gateway.log(), what="the reload refused",
             timeout=30, interval=0.2)
    assert client.get(f"/v2/ghcr.io/{repository}/blobs/{image.layers[0].digest}").status == 200
    assert wrong not in gateway.log() and seaweed.secret_key not in gateway.log()


def test_an_unreachable_store_answers_503_never_a_wrong_body(
        seaweed: SeaweedFS, start_upstream: Callable[..., Upstream],
        start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("ghcr.io")
    repository = unique_repository()
    image = upstream.push(repository, make_image(layer_sizes=(4096,)), tags=("v1",))
    routes = s3_routes(upstream, seaweed)
    routes["storage"]["endpoint"] = f"http://127.0.0.1:{free_port()}"  # nothing listens
    gateway = start_gateway(routes)
    client = gateway.client()
    for target in (f"/v2/ghcr.io/{repository}/manifests/v1",
                   f"/v2/ghcr.io/{repository}/blobs/{image.layers[0].digest}"):
        got = client.get(target, accept=image.manifest.media_type)
        assert got.status == 503, (target, got.status)
        assert got.json()["errors"][0]["code"] == "UNAVAILABLE"


async def test_the_size_cap_holds_on_the_bucket_after_a_crash(
        seaweed: SeaweedFS, start_upstream: Callable[..., Upstream],
        start_gateway: Callable[..., Gateway]) -> None:
    """kill -9, then a restart with a lower cap: the catalogue still knows what the bucket
    holds (the data directory has none of it, so a scan of it must not forget it), and
    the evictor deletes from the bucket down to the cap, the last image pulled kept."""
    upstream = start_upstream("ghcr.io")
    images = [make_image(layer_sizes=(1 << 20,), seed=70 + i) for i in range(4)]
    repositories = [unique_repository() for _ in images]
    for repository, image in zip(repositories, images, strict=True):
        upstream.push(repository, image, tags=("v1",))
    routes = s3_routes(upstream, seaweed)
    routes["cache"] = {"lease": "0s"}
    gateway = start_gateway(routes)
    async with aiohttp.ClientSession() as session:
        for repository, image in zip(repositories, images, strict=True):
            await pull_image(session, gateway.url(), f"ghcr.io/{repository}", "v1", image)
    every = [b for image in images for b in image.blobs]
    wait_for(lambda: all(blob_object(routes, b.digest) in stored(seaweed, routes)
                         for b in every), what="every blob committed")
    assert gateway.process is not None
    gateway.process.kill()  # kill -9: no clean close of the index
    gateway.process.wait()
    gateway.process = None

    cap = 2 << 20
    routes["cache"]["max_size"] = cap
    gateway.routes = routes
    gateway.start()

    def blob_bytes() -> int:
        return sum(size for key, size in stored(seaweed, routes).items() if "/blobs/" in key)

    wait_for(lambda: blob_bytes() <= cap, what="the bucket evicted down to the cap",
             timeout=30, interval=0.2)
    last = images[-1]
    assert all(blob_object(routes, b.digest) in stored(seaweed, routes) for b in last.blobs)
    async with aiohttp.ClientSession() as session:
        again = await pull_image(session, gateway.url(), f"ghcr.io/{repositories[-1]}", "v1",
                                 last)
    assert set(again.cache.values()) == {"HIT"}, again.cache
