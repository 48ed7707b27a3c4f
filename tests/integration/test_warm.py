"""`registry-gateway warm URL IMAGE...` run as a user runs it (`python -m gateway warm`)
against a real gateway in front of real docker-registry upstreams: it caches only the
platforms asked for, its summary's numbers are the bytes that moved (from upstream on
the first run, from cache on the second), and a list with a missing image warms the
others and fails naming the missing one."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from gateway.client.warm_view import human_bytes
from tests.support.gateway import REPOSITORY_ROOT, Gateway
from tests.support.images import Image, make_image, make_index
from tests.support.pulls import fetch, wait_cached
from tests.support.tls_gateway import install_acme_sh_layout, run_tls_gateway
from tests.support.upstreams import Upstream, unique_repository

pytestmark = pytest.mark.integration

_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                    "all_proxy")


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str

    def summary(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.stdout)
        return document

    def describe(self) -> str:
        return f"exit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


async def run_warm(*args: str) -> Ran:
    """`python -m gateway warm ARGS` from the repository root, as a user would run it."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARIABLES}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "warm", *args, cwd=REPOSITORY_ROOT, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


def _routes(*upstreams: Upstream) -> dict[str, Any]:
    return {"default_route": None,
            "routes": {u.route: {"upstream": u.url} for u in upstreams}}


def _size(*images: Image) -> int:
    return sum(blob.size for image in images for blob in image.blobs)


async def _x_cache(http: aiohttp.ClientSession, url: str, blob_digest: str) -> str:
    fetched = await fetch(http, url, accept=None)
    assert fetched.status == 200, fetched.describe()
    assert len(fetched.body) > 0 and fetched.headers["Docker-Content-Digest"] == blob_digest
    return fetched.headers.get("X-Cache", "<missing>")


async def test_warm_one_platform_caches_only_that_platform(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
    http: aiohttp.ClientSession,
) -> None:
    upstream = start_upstream("ghcr.io")
    gateway = start_gateway(_routes(upstream))
    repository = unique_repository()
    index = upstream.push_index(repository, make_index())  # linux/amd64, linux/arm64/v8
    arm, amd = index.image_for("arm64"), index.image_for("amd64")

    ran = await run_warm(gateway.url(), f"ghcr.io/{repository}:latest",
                         "--platform", "linux/arm64", "--json")

    assert ran.returncode == 0, ran.describe()
    proxy = upstream.proxy
    paths = {seen.path for seen in proxy.seen()}
    assert f"/v2/{repository}/manifests/{amd.digest}" not in paths
    assert [b.digest for b in amd.blobs if proxy.blob_requests(repository, digest=b.digest)] \
        == [], "a blob of the platform not asked for reached the upstream"
    assert f"/v2/{repository}/manifests/{arm.digest}" in paths
    assert all(len(proxy.blob_requests(repository, digest=b.digest)) == 1 for b in arm.blobs)
    image = ran.summary()["images"][0]
    assert image["platforms"] == ["linux/arm64"]
    assert image["digest"] == index.digest
    assert (image["blobs"], image["bytes"]) == (len(arm.blobs), _size(arm))

    base = f"{gateway.url()}/v2/ghcr.io/{repository}/blobs"
    await wait_cached(http, gateway.url(), f"ghcr.io/{repository}", arm)
    assert [await _x_cache(http, f"{base}/{b.digest}", b.digest) for b in arm.blobs] == \
        ["HIT"] * len(arm.blobs)
    assert [await _x_cache(http, f"{base}/{b.digest}", b.digest) for b in amd.blobs] == \
        ["MISS"] * len(amd.blobs)


async def test_summary_counts_the_bytes_from_upstream_then_from_cache(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
    http: aiohttp.ClientSession,
) -> None:
    upstream = start_upstream("ghcr.io")
    gateway = start_gateway(_routes(upstream))
    repository = unique_repository()
    index = upstream.push_index(repository, make_index(layer_sizes=(48 * 1024, 700 * 1024)))
    total, blobs = _size(*index.images), sum(len(i.blobs) for i in index.images)
    image_ref = f"ghcr.io/{repository}:latest"

    first = await run_warm(gateway.url(), image_ref, "--json")  # no --platform: all of them

    assert first.returncode == 0, first.describe()
    summary = first.summary()
    assert summary["images"][0]["platforms"] == ["linux/amd64", "linux/arm64"]
    assert summary["total"] | {"seconds": 0} == {
        "images": 1, "failed": 0, "blobs": blobs, "bytes": total, "bytes_from_cache": 0,
        "bytes_from_upstream": total, "seconds": 0}
    assert upstream.proxy.blob_bytes(repository) == total, "the upstream sent other bytes"

    for image in index.images:
        await wait_cached(http, gateway.url(), f"ghcr.io/{repository}", image)
    second = await run_warm(gateway.url(), image_ref, "--json")

    assert second.returncode == 0, second.describe()
    assert second.summary()["total"] | {"seconds": 0} == {
        "images": 1, "failed": 0, "blobs": blobs, "bytes": total, "bytes_from_cache": total,
        "bytes_from_upstream": 0, "seconds": 0}
    assert upstream.proxy.blob_bytes(repository) == total, "a warm run reached the upstream"

    text = await run_warm(gateway.url(), image_ref)  # the table a person reads

    assert text.returncode == 0, text.describe()
    total_row = next(line for line in text.stdout.splitlines() if line.startswith("total"))
    assert total_row.split() == ["total", "(1", "image)", str(blobs), *human_bytes(total).split(),
                                 *human_bytes(total).split(), "0", "B",
                                 total_row.split()[-1]]
    assert f"done: {blobs} blobs, {human_bytes(total)} ({human_bytes(total)} from cache, 0 B " \
           "from upstream)" in text.stdout


async def test_file_with_a_missing_image_warms_the_others_and_fails(
    start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
    http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    hub, ghcr = start_upstream("docker.io"), start_upstream("ghcr.io")
    gateway = start_gateway(_routes(hub, ghcr))
    nginx = hub.push("library/nginx", make_image(), tags=("1.27",))
    app = ghcr.push_index("org/app", make_index(), tags=())
    listing = tmp_path / "images.txt"
    listing.write_text("# images for the Monday rollout\n\nnginx:1.27\n"
                       "ghcr.io/org/missing:1   # not pushed\n"
                       f"ghcr.io/org/app@{app.digest}\n")

    ran = await run_warm(gateway.url(), "--file", str(listing), "--json")

    assert ran.returncode == 1, ran.describe()
    assert "1 of 3 images failed:\n  ghcr.io/org/missing:1: manifest: HTTP 404" in ran.stderr, \
        ran.describe()
    by_image = {image["image"]: image for image in ran.summary()["images"]}
    assert list(by_image) == ["docker.io/library/nginx:1.27", "ghcr.io/org/missing:1",
                              f"ghcr.io/org/app@{app.digest}"]
    assert not by_image["ghcr.io/org/missing:1"]["ok"]
    assert "MANIFEST_UNKNOWN" in by_image["ghcr.io/org/missing:1"]["error"]
    assert by_image["docker.io/library/nginx:1.27"]["bytes"] == _size(nginx)
    assert by_image[f"ghcr.io/org/app@{app.digest}"]["bytes"] == _size(*app.images)
    assert ran.summary()["total"]["failed"] == 1

    await wait_cached(http, gateway.url(), "docker.io/library/nginx", nginx)
    for image in app.images:
        await wait_cached(http, gateway.url(), "ghcr.io/org/app", image)
    assert hub.proxy.blob_bytes("library/nginx") == _size(nginx)
    assert ghcr.proxy.blob_bytes("org/app") == _size(*app.images)


async def test_warm_over_https_with_the_gateways_private_ca(
    start_upstream: Callable[..., Upstream], tmp_path: Path,
) -> None:
    ca = trustme.CA()
    install_acme_sh_layout(tmp_path / "certs", ca.issue_cert("127.0.0.1"), "127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    upstream = start_upstream("ghcr.io")
    index = upstream.push_index("org/app", make_index())
    with run_tls_gateway(tmp_path / "gateway", _routes(upstream), tmp_path / "certs",
                         tmp_path / "ca.pem", server_name="127.0.0.1") as tls:
        url = f"https://127.0.0.1:{tls.tls_port}"

        untrusted = await run_warm(url, "ghcr.io/org/app")
        plain = await run_warm(tls.gateway.url(), "ghcr.io/org/app")  # redirects to HTTPS
        trusted = await run_warm(url, "ghcr.io/org/app", "--ca", str(tmp_path / "ca.pem"),
                                 "--platform", "linux/amd64", "--json")

    assert untrusted.returncode == 2, untrusted.describe()
    assert "TLS certificate does not verify" in untrusted.stderr
    assert "--ca" in untrusted.stderr
    assert plain.returncode == 2 and f"give {url} instead" in plain.stderr, plain.describe()
    assert trusted.returncode == 0, trusted.describe()
    assert trusted.summary()["total"]["bytes"] == _size(index.image_for("amd64"))
