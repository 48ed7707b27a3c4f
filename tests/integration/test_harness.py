"""The test harness checked on its own, without the gateway: a test that passes
because its upstream, proxy or images are broken proves nothing about the gateway."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.client import RegistryClient, raw_request
from tests.support.fake_registry import RunningFake, run_fake_registry
from tests.support.faults import Fault, rate_limited, unavailable
from tests.support.images import (
    ACCEPT_ALL_MANIFESTS,
    make_image,
    make_index,
    push_image,
)
from tests.support.proxy import CountingProxy
from tests.support.registry import TokenServer
from tests.support.transfers import client_tasks, stream_get
from tests.support.upstreams import run_upstream, unique_repository
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


def test_images_are_valid() -> None:
    sizes = (10_000, 200_000)
    image = make_image(layer_sizes=sizes)
    config = json.loads(image.config.data)
    assert config["rootfs"]["diff_ids"] == list(image.diff_ids)
    for layer, diff_id, size in zip(image.layers, image.diff_ids, sizes, strict=True):
        raw = gzip.decompress(layer.data)
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            assert any(m.isfile() for m in tar.getmembers())
        assert len(layer.data) > size, "random file content should not compress"
    manifest = json.loads(image.manifest.data)
    assert manifest["config"]["digest"] == image.config.digest
    assert [d["digest"] for d in manifest["layers"]] == [b.digest for b in image.layers]
    index = json.loads(make_index().manifest.data)
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]


def test_token_registry_accepts_issued_tokens_and_rejects_forged_ones(tmp_path: Path) -> None:
    with run_upstream(tmp_path, "token.test", auth="token") as upstream:
        repository = unique_repository()
        image = upstream.push(repository, make_image(layer_sizes=(1024,)))
        registry = upstream.registry
        target = f"/v2/{repository}/manifests/{image.digest}"

        good = registry.client().get(target, accept=ACCEPT_ALL_MANIFESTS, repository=repository)
        assert good.status == 200 and good.body == image.manifest.data

        anonymous = registry.client(authenticated=False).get(target, repository=repository)
        assert anonymous.status == 401

        stranger = TokenServer(username="x", password="y", service="test-registry",
                               issuer="test-token-issuer")
        forged = stranger.issue(subject="tester", access=[
            {"type": "repository", "name": repository, "actions": ["pull"]}])
        refused = raw_request(registry.host, registry.port, "GET", target,
                              headers={"Authorization": f"Bearer {forged}"})
        assert refused.status == 401

        wrong_password = RegistryClient(registry.host, registry.port, "tester", "wrong")
        with pytest.raises(RuntimeError, match="401"):
            wrong_password.get(target, repository=repository)


def test_basic_registry_needs_the_password(tmp_path: Path) -> None:
    with run_upstream(tmp_path, "basic.test", auth="basic") as upstream:
        registry = upstream.registry
        assert registry.client(authenticated=False).get("/v2/").status == 401
        assert RegistryClient(registry.host, registry.port, "tester", "wrong").get(
            "/v2/").status == 401
        assert registry.client().get("/v2/").status == 200


def test_counting_proxy_counts_rewrites_location_and_fails_on_demand(tmp_path: Path) -> None:
    with run_upstream(tmp_path, "open.test") as upstream:
        proxy: CountingProxy = upstream.proxy
        through_proxy = RegistryClient(proxy.server.host, proxy.server.port)
        repository = unique_repository()
        # A push through the proxy only works if upload Locations point back at it.
        image = push_image(through_proxy, repository, make_image(layer_sizes=(50_000,)))
        assert not proxy.blob_requests(repository)
        for blob in image.blobs:
            assert through_proxy.get(f"/v2/{repository}/blobs/{blob.digest}").body == blob.data
        assert len(proxy.blob_requests(repository)) == len(image.blobs)
        assert proxy.blob_bytes(repository) == sum(b.size for b in image.blobs)

        proxy.fail_status = 503
        assert through_proxy.get("/v2/").status == 503
        proxy.fail_status = None

        proxy.stop()
        proxy.start()  # same port again
        assert through_proxy.get("/v2/").status == 200


async def test_counting_proxy_applies_scripted_faults(tmp_path: Path) -> None:
    with run_upstream(tmp_path, "open.test") as upstream:
        repository = unique_repository()
        image = upstream.push(repository, make_image(layer_sizes=(300_000,)))
        layer = image.layers[0]
        path = f"/v2/{repository}/blobs/{layer.digest}"
        upstream.proxy.queue("GET", path, Fault(cut_at=100_000), unavailable(503))
        async with aiohttp.ClientSession() as session:
            cut = await stream_get(session, upstream.url + path)
            failed = await stream_get(session, upstream.url + path)
            whole = await stream_get(session, upstream.url + path)
        assert cut.status == 200 and cut.error is not None and cut.received <= 100_000
        assert failed.status == 503
        assert whole.clean and whole.digest == layer.digest
        assert [(s.status, s.body_bytes) for s in upstream.proxy.blob_requests(repository)] == [
            (200, 100_000), (503, 0), (200, layer.size)]
        assert upstream.proxy.pending() == []


# -- the scripted fake registry ---------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[RunningFake]:
    with run_fake_registry() as running:
        yield running


BLOB = os.urandom(1 << 20)


async def test_fake_registry_serves_content_and_counts_what_it_sent(fake: RunningFake) -> None:
    digest = fake.fake.add_blob(BLOB)
    url = f"{fake.url}/v2/any/repo/blobs/{digest}"
    async with aiohttp.ClientSession() as session:
        whole = await stream_get(session, url, keep=True)
        ranged = await stream_get(session, url, headers={"Range": "bytes=1000-1999"}, keep=True)
    assert whole.clean and whole.body == BLOB
    assert whole.headers["Docker-Content-Digest"] == digest
    assert ranged.status == 206 and ranged.body == BLOB[1000:2000]
    assert ranged.headers["Content-Range"] == f"bytes 1000-1999/{len(BLOB)}"
    first, second = fake.fake.blob_requests(digest=digest)
    assert (first.status, first.body_bytes, first.range) == (200, len(BLOB), None)
    assert (second.status, second.body_bytes, second.range) == (206, 1000, "bytes=1000-1999")


@pytest.mark.parametrize("fault", ["cut", "reset"])
async def test_fake_registry_breaks_the_connection_where_scripted(
        fake: RunningFake, fault: str) -> None:
    digest = fake.fake.add_blob(BLOB)
    path = f"/v2/any/repo/blobs/{digest}"
    at = 300_000
    fake.fake.queue("GET", path, Fault(cut_at=at) if fault == "cut" else Fault(reset_at=at))
    async with aiohttp.ClientSession() as session:
        broken = await stream_get(session, fake.url + path)
        again = await stream_get(session, fake.url + path)
    assert broken.status == 200 and broken.error is not None and broken.received <= at
    assert again.clean and again.digest == digest  # a queued step is used once
    assert [s.body_bytes for s in fake.fake.blob_requests(digest=digest)] == [at, len(BLOB)]
    assert fake.fake.pending() == []


async def test_fake_registry_corrupts_ignores_range_and_lies_about_it(fake: RunningFake) -> None:
    digest = fake.fake.add_blob(BLOB)
    path = f"/v2/any/repo/blobs/{digest}"
    fake.fake.queue("GET", path, Fault(corrupt_at=(5, len(BLOB) - 1)),
                    Fault(ignore_range=True), Fault(content_range="bytes 7-9/10", chunked=True))
    async with aiohttp.ClientSession() as session:
        corrupt = await stream_get(session, fake.url + path, keep=True)
        full = await stream_get(session, fake.url + path, headers={"Range": "bytes=10-"},
                                keep=True)
        lying = await stream_get(session, fake.url + path, headers={"Range": "bytes=10-"},
                                 keep=True)
    assert corrupt.clean and corrupt.body is not None and len(corrupt.body) == len(BLOB)
    assert [i for i, (a, b) in enumerate(zip(corrupt.body, BLOB, strict=True)) if a != b] == [
        5, len(BLOB) - 1]
    assert corrupt.headers["Docker-Content-Digest"] == digest != corrupt.digest
    assert full.status == 200 and full.body == BLOB and "Content-Range" not in full.headers
    assert lying.status == 206 and lying.body == BLOB[10:]
    assert lying.headers["Content-Range"] == "bytes 7-9/10"
    assert "Content-Length" not in lying.headers


async def test_fake_registry_answers_scripted_statuses(fake: RunningFake) -> None:
    digest = fake.fake.add_blob(b"x")
    path = f"/v2/any/repo/blobs/{digest}"
    fake.fake.queue("*", path, rate_limited("7"), rate_limited(), unavailable(502))
    async with aiohttp.ClientSession() as session:
        answers = []
        for _ in range(4):
            async with session.get(fake.url + path) as response:
                answers.append((response.status, response.headers.get("Retry-After"),
                                await response.read()))
    assert [(status, retry) for status, retry, _ in answers] == [
        (429, "7"), (429, None), (502, None), (200, None)]
    assert json.loads(answers[0][2])["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert json.loads(answers[2][2])["errors"][0]["code"] == "UNAVAILABLE"
    assert answers[3][2] == b"x"


async def test_fake_registry_stalls_at_the_gate_and_caps_concurrency(
        fake: RunningFake) -> None:
    fake.fake.concurrency_cap = 1
    digest = fake.fake.add_blob(BLOB)
    url = f"{fake.url}/v2/any/repo/blobs/{digest}"
    fake.fake.queue("GET", f"/v2/any/repo/blobs/{digest}", Fault(stall_at=4096, throttle=1 << 30))
    async with aiohttp.ClientSession() as one, aiohttp.ClientSession() as two, \
            client_tasks() as spawn:
        stalled = spawn(stream_get(one, url, keep=True))
        await wait_until(lambda: fake.fake.gate.reached, what="the response to reach the gate")
        await asyncio.sleep(0.1)  # it stays there: nothing opens the gate meanwhile
        assert not stalled.done()
        assert fake.fake.blob_bytes(digest=digest) == 4096
        refused = await stream_get(two, url)
        fake.fake.release()
        finished = await stalled
    assert refused.status == 429
    assert finished.clean and finished.body == BLOB
    assert fake.fake.peak_concurrency == 1
