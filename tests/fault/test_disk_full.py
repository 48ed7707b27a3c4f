"""A data directory on a small tmpfs the test mounts (issue #9, "Disk full"): an image
larger than the disk still pulls with verified bytes, nothing partial stays behind, and
the gateway serves the next request; on a disk filled to 100% a manifest is still a 200
and an uncached blob arrives whole and verified. Real docker-registry upstream, the
gateway as a subprocess; ENOSPC comes from the kernel, nothing is mocked.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.datadir import blob_path
from tests.support.gateway import Gateway
from tests.support.images import Image, make_image, sha256_digest
from tests.support.pulls import fetch, pull_image
from tests.support.tools import require_tool, unavailable
from tests.support.transfers import stream_get
from tests.support.upstreams import Upstream, route_entry, unique_repository
from tests.support.wait import wait_until

pytestmark = pytest.mark.fault

MiB = 1 << 20
DISK = 64 * MiB
LAYER = 40 * MiB  # three of them: about twice the disk
ROUTE = "docker.io"




@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK bytes mounted for this test, unmounted at the end."""
    mount, umount = require_tool("mount"), require_tool("umount")
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs for the disk-full tests needs root")
    point = tmp_path / "small-disk"
    point.mkdir()
    done = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(point)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield point
    finally:
        if subprocess.run([umount, str(point)], check=False).returncode != 0:
            subprocess.run([umount, "--lazy", str(point)], check=True)


@pytest.fixture
def disk_gateway(small_disk: Path, start_upstream: Callable[..., Upstream],
                 start_gateway: Callable[..., Gateway]
                 ) -> Iterator[tuple[Upstream, Gateway, Path]]:
    """An upstream and a gateway whose data directory is on the small disk. Requesting
    `small_disk` first makes it outlive the gateway (fixtures end in reverse order)."""
    upstream = start_upstream(ROUTE)
    data_dir = small_disk / "data"
    routes: dict[str, Any] = {"default_route": ROUTE, "routes": {ROUTE: route_entry(upstream)}}
    gateway = start_gateway(routes, extra_args=("--data-dir", str(data_dir)))
    yield upstream, gateway, data_dir


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has not one block left."""
    filler = directory / "filler"
    block = b"\0" * MiB
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (MiB, 4096, 1):
            try:
                while True:
                    os.write(fd, block[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def leftovers(data_dir: Path) -> list[Path]:
    """Files in the spool (besides each process's lock), and blob files whose content does
    not hash to their name: what a failed write would have left."""
    found = [p for p in (data_dir / ".spool").rglob("*") if p.is_file() and p.name != ".owner"]
    for path in data_dir.glob("*/blobs/*/*/*"):
        if sha256_digest(path.read_bytes()) != f"{path.parent.parent.name}:{path.name}":
            found.append(path)
    return found


def held_by_unlinked_files(data_dir: Path) -> int:
    """Bytes the filesystem has in use beyond what its files hold (pages rounded up): the
    space of unlinked files still open, such as a spool a reader kept open too long."""
    disk = os.statvfs(data_dir)
    used = (disk.f_blocks - disk.f_bfree) * disk.f_frsize
    held = sum(-(-path.stat().st_size // 4096) * 4096
               for path in data_dir.rglob("*") if path.is_file())
    return used - held


async def nothing_held(data_dir: Path) -> None:
    # A client has its last byte a moment before the handler closes its descriptors.
    await wait_until(lambda: held_by_unlinked_files(data_dir) < MiB,
                     what="the space of removed spool files to be freed")


async def disk_full_events(http: aiohttp.ClientSession, gateway: Gateway) -> dict[str, float]:
    """gateway_disk_full_total by what (blob, manifest, tag), and the relays as "relayed"."""
    async with http.get(f"{gateway.url()}/metrics") as resp:
        text = await resp.text()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_disk_full_total":
                what = sample.labels["what"]
                counts[what] = counts.get(what, 0.0) + sample.value
            elif sample.name == "gateway_disk_full_relays_total":
                counts["relayed"] = counts.get("relayed", 0.0) + sample.value
    return counts


def push(upstream: Upstream, image: Image) -> str:
    repository = unique_repository("diskfull")
    upstream.push(repository, image)
    return repository


async def test_an_image_larger_than_the_disk_pulls_with_verified_bytes(
        disk_gateway: tuple[Upstream, Gateway, Path], http: aiohttp.ClientSession) -> None:
    upstream, gateway, data_dir = disk_gateway
    image = make_image(layer_sizes=(LAYER, LAYER, LAYER), seed=9)
    assert sum(layer.size for layer in image.layers) > 1.8 * DISK
    repository = push(upstream, image)

    # Every blob's bytes and digest are checked by pull_image.
    await pull_image(http, gateway.url(), repository, "latest", image)

    assert leftovers(data_dir) == []
    await nothing_held(data_dir)
    events = await disk_full_events(http, gateway)
    assert events.get("blob", 0) >= 1, events
    assert events.get("relayed", 0) >= 2, events  # layers 2 and 3 at least
    log = gateway.logged("disk full (", count=events["blob"])
    assert "ENOSPC" in log, "the disk-full event was not logged"
    # One line per event, not one per chunk or per reader.
    assert log.count("disk full (") == events["blob"], log

    # The gateway goes on serving: the manifest, a kept layer, and a pull of it all again.
    manifest = await fetch(http, f"{gateway.url()}/v2/{repository}/manifests/{image.digest}")
    assert manifest.status == 200 and manifest.body == image.manifest.data
    kept = [layer for layer in image.layers
            if blob_path(data_dir, ROUTE, layer.digest).exists()]
    assert kept, "nothing at all was kept, though the first layer fits"
    got = await stream_get(http, f"{gateway.url()}/v2/{repository}/blobs/{kept[0].digest}")
    assert got.clean and got.digest == kept[0].digest and got.cache == "HIT"
    await pull_image(http, gateway.url(), repository, "latest", image)
    assert leftovers(data_dir) == []
    await nothing_held(data_dir)


async def test_clients_pulling_layers_in_parallel_all_get_verified_bytes(
        disk_gateway: tuple[Upstream, Gateway, Path], http: aiohttp.ClientSession) -> None:
    """As dockerd does (three layers at a time), with two clients per layer: every spool
    competes for the same small disk."""
    upstream, gateway, data_dir = disk_gateway
    image = make_image(layer_sizes=(LAYER, LAYER, LAYER), seed=11)
    repository = push(upstream, image)
    manifest = await fetch(http, f"{gateway.url()}/v2/{repository}/manifests/latest")
    assert manifest.status == 200 and manifest.body == image.manifest.data

    blobs = [blob for blob in image.blobs for _ in range(2)]
    got = await asyncio.gather(*(stream_get(
        http, f"{gateway.url()}/v2/{repository}/blobs/{blob.digest}") for blob in blobs))
    for blob, transfer in zip(blobs, got, strict=True):
        assert transfer.clean, (blob.digest, transfer)
        assert transfer.received == blob.size and transfer.digest == blob.digest
    assert leftovers(data_dir) == []
    await nothing_held(data_dir)
    assert (await disk_full_events(http, gateway)).get("blob", 0) >= 1

    await pull_image(http, gateway.url(), repository, "latest", image)  # still served


async def test_a_full_disk_still_serves_manifests_and_whole_verified_blobs(
        disk_gateway: tuple[Upstream, Gateway, Path], http: aiohttp.ClientSession) -> None:
    upstream, gateway, data_dir = disk_gateway
    image = make_image(layer_sizes=(3 * MiB, 2 * MiB), seed=10)
    repository = push(upstream, image)
    filler = fill(data_dir)
    base = f"{gateway.url()}/v2/{repository}"

    tagged = await fetch(http, f"{base}/manifests/latest")
    assert tagged.status == 200, tagged.describe()
    assert tagged.body == image.manifest.data
    assert tagged.headers["Docker-Content-Digest"] == image.digest
    by_digest = await fetch(http, f"{base}/manifests/{image.digest}")
    assert by_digest.status == 200 and by_digest.body == image.manifest.data

    for blob in image.blobs:  # the first is spooled (and fails), the rest are relayed
        got = await stream_get(http, f"{base}/blobs/{blob.digest}")
        assert got.status == 200, got
        assert got.error is None, f"blob {blob.digest}: the body broke: {got.error!r}"
        assert got.received == blob.size, "a 200 with fewer bytes than the blob"
        assert got.digest == blob.digest
    events = await disk_full_events(http, gateway)
    assert all(events.get(what, 0) >= 1 for what in ("blob", "manifest", "tag")), events
    # The first blob's reader went on from the upstream, the others were relayed at once.
    assert events.get("relayed") == len(image.blobs), events
    assert leftovers(data_dir) == []
    assert not any(blob_path(data_dir, ROUTE, blob.digest).exists() for blob in image.blobs)
    assert os.statvfs(data_dir).f_bavail == 0, "the disk was not full all along"

    # Served from memory now (not kept on disk, but not fetched again either).
    again = await fetch(http, f"{base}/manifests/{image.digest}")
    assert again.status == 200 and again.body == image.manifest.data
    assert again.headers["X-Cache"] == "HIT"
    filler.unlink()


def test_the_filler_really_fills(small_disk: Path) -> None:
    """The harness: on a full disk a write fails with ENOSPC, so the test above is real."""
    fill(small_disk)
    with pytest.raises(OSError) as failed:
        (small_disk / "one-more").write_bytes(b"x" * 8192)
    assert failed.value.errno == errno.ENOSPC
