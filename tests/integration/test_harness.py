"""The test harness checked on its own, without the gateway: a test that passes
because its upstream, proxy or images are broken proves nothing about the gateway."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.support.client import RegistryClient, raw_request
from tests.support.images import ACCEPT_ALL_MANIFESTS, make_image, make_index, push_image
from tests.support.proxy import CountingProxy
from tests.support.registry import TokenServer
from tests.support.upstreams import run_upstream, unique_repository

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
