"""api.py and middleware.py through aiohttp's test client on `create_app` with fake upstreams.

What a registry client notices: statuses, bytes and digests, headers (X-Cache,
X-Registry-Route, Content-Length, Range), OCI error bodies, and what reached upstream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from gateway.api.blobs import byte_range
from gateway.errors import RegistryError
from gateway.pipeline.observe import access_line
from tests.support.fake_registry import image_manifest, stream_in_parts
from tests.support.images import OCI_INDEX, OCI_MANIFEST
from tests.support.images import sha256_digest as digest_of
from tests.support.wait import wait_until

from .conftest import Gateway, Served

MiB = 1 << 20
SECRET = "api-test-secret-value"


@dataclass
class Setup:
    gw: Gateway
    hub: Served
    ghcr: Served

    @property
    def client(self) -> Any:
        return self.gw.client

    def upstream_requests(self) -> int:
        return self.hub.fake.count() + self.ghcr.fake.count()

    def inflight(self) -> float:
        """Blob fetches in progress (the metric falls once a fetch is committed or failed)."""
        return sum(self.gw.sample("gateway_inflight_fetches", route=r)
                   for r in ("docker.io", "ghcr.io"))


@pytest.fixture
async def setup(registry: Callable[..., Awaitable[Served]],
                gateway: Callable[..., Awaitable[Gateway]]) -> Callable[..., Awaitable[Setup]]:
    async def make(hub: dict[str, Any] | None = None, ghcr: dict[str, Any] | None = None,
                   **top: Any) -> Setup:
        hub_fake, ghcr_fake = await registry(), await registry()
        routes = {
            "docker.io": {"upstream": hub_fake.url, **(hub or {})},
            "ghcr.io": {"upstream": ghcr_fake.url, **(ghcr or {})},
        }
        gw = await gateway(routes, env={"HUB_PASSWORD": SECRET}, **top)
        return Setup(gw, hub_fake, ghcr_fake)

    return make


MakeSetup = Callable[..., Awaitable[Setup]]


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    assert resp.headers["Content-Type"].startswith("application/json")
    body = json.loads(await resp.read())
    (error,) = body["errors"]
    assert isinstance(error["message"], str)
    return dict(error)


# -------------------------------------------------------------- basics


async def test_base_endpoint(setup: MakeSetup) -> None:
    s = await setup()
    resp = await s.client.get("/v2/")
    assert resp.status == 200
    assert await resp.json() == {}
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert resp.headers["X-Request-Id"]
    head = await s.client.head("/v2/")
    assert head.status == 200
    assert s.upstream_requests() == 0


async def test_request_id_is_echoed(setup: MakeSetup) -> None:
    s = await setup()
    resp = await s.client.get("/v2/", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path", [
    "/v2/", "/v2/library/nginx/manifests/latest", "/v2/library/nginx/blobs/uploads/",
    f"/v2/library/nginx/blobs/sha256:{'a' * 64}", "/v2/library/nginx/tags/list", "/metrics",
])
async def test_writes_are_refused_with_405_and_allow(setup: MakeSetup, method: str,
                                                     path: str) -> None:
    s = await setup()
    resp = await s.client.request(method, path, data=b"x" * 100)
    assert resp.status == 405
    assert resp.headers["Allow"] == "GET, HEAD"
    assert (await error_of(resp))["code"] == "UNSUPPORTED"
    assert s.upstream_requests() == 0


async def test_upload_start_with_get_is_refused_too(setup: MakeSetup) -> None:
    s = await setup()
    resp = await s.client.get("/v2/library/nginx/blobs/uploads/some-uuid")
    assert resp.status == 405
    assert (await error_of(resp))["code"] == "UNSUPPORTED"


BAD_REQUESTS = [
    ("/v2/Library/nginx/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/library/nginx/manifests/-bad", 400, "TAG_INVALID"),
    (f"/v2/library/nginx/manifests/{'t' * 129}", 400, "TAG_INVALID"),
    ("/v2/library/nginx/manifests/%00", 400, "TAG_INVALID"),
    ("/v2/library/nginx/manifests/sha256:abc", 400, "DIGEST_INVALID"),
    (f"/v2/library/nginx/manifests/md5:{'a' * 32}", 400, "DIGEST_INVALID"),
    ("/v2/library/nginx/blobs/latest", 400, "DIGEST_INVALID"),
    (f"/v2/library/nginx/blobs/sha256:{'A' * 64}", 400, "DIGEST_INVALID"),
    ("/v2/library/nginx/referrers/v1", 400, "DIGEST_INVALID"),
    (f"/v2/{'a' * 300}/manifests/latest", 400, "NAME_INVALID"),
    (f"/v2/{'abc/' * 2500}manifests/latest", 400, "NAME_INVALID"),
    (f"/v2/{'a' * 10000}", 400, "NAME_INVALID"),
    ("/v2/ñ/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/library/nginx", 404, "NOT_FOUND"),
    ("/v2/library/nginx/tags/other", 404, "NOT_FOUND"),
    ("/v2/unknown.example/owner/img/manifests/latest", 404, "NAME_UNKNOWN"),
    ("/v2/owner/img/manifests/latest?ns=unknown.example", 404, "NAME_UNKNOWN"),
    ("/v2/owner/img/tags/list?n=abc", 400, "PAGINATION_NUMBER_INVALID"),
    ("/v2/owner/img/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
    ("/nothing/here", 404, "NOT_FOUND"),
    ("/", 404, "NOT_FOUND"),
]


@pytest.mark.parametrize(("path", "status", "code"), BAD_REQUESTS)
async def test_client_mistakes_get_oci_errors(setup: MakeSetup, caplog: pytest.LogCaptureFixture,
                                              path: str, status: int, code: str) -> None:
    s = await setup()
    caplog.set_level(logging.INFO)
    resp = await s.client.get(path)
    assert resp.status == status
    error = await error_of(resp)
    assert error["code"] == code
    assert len(error["message"]) < 400
    assert resp.headers["X-Cache"] == "-"
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    head = await s.client.head(path)
    assert head.status == status
    assert await head.read() == b""
    assert s.upstream_requests() == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text


async def test_absurd_range_headers_are_not_500s(setup: MakeSetup) -> None:
    s = await setup()
    data = b"0123456789" * 10
    digest = s.hub.fake.add_blob(data)
    path = f"/v2/owner/img/blobs/{digest}"
    for value in ["bytes=abc", "bytes=1-2,5-6", "items=0-1", "bytes=-", "bytes=99999999999999-",
                  "bytes=5-2", "bytes=" + "9" * 50 + "-"]:
        resp = await s.client.get(path, headers={"Range": value})
        assert resp.status in (200, 206, 416), value
        if resp.status == 200:
            assert await resp.read() == data
        else:
            await resp.read()


# ---------------------------------------------------------------- manifests


async def test_manifest_miss_then_hit(setup: MakeSetup) -> None:
    s = await setup()
    body = image_manifest(b"layer")
    digest = s.hub.fake.add_manifest("library/nginx", body, tag="latest")
    resp = await s.client.get("/v2/nginx/manifests/latest",
                              headers={"Accept": OCI_MANIFEST})
    assert resp.status == 200
    assert await resp.read() == body
    assert resp.headers["Content-Type"] == OCI_MANIFEST
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["X-Cache"] == "MISS"
    assert resp.headers["X-Registry-Route"] == "docker.io"
    # Docker Hub's library/ rule, and the client's Accept went upstream.
    (seen,) = s.hub.fake.seen("GET")
    assert seen.path == "/v2/library/nginx/manifests/latest"
    assert seen.headers["Accept"] == OCI_MANIFEST

    # The same client again is a hit. (A client that also takes an index would be sent
    # upstream once: an answer to a client that takes none may be one platform's.)
    again = await s.client.get("/v2/library/nginx/manifests/latest",
                               headers={"Accept": OCI_MANIFEST})
    assert (again.status, await again.read()) == (200, body)
    assert again.headers["X-Cache"] == "HIT"
    by_digest = await s.client.get(f"/v2/library/nginx/manifests/{digest}")
    assert (by_digest.status, await by_digest.read()) == (200, body)
    assert by_digest.headers["X-Cache"] == "HIT"
    assert s.hub.fake.count() == 1


async def test_head_manifest_has_content_length_and_digest(setup: MakeSetup) -> None:
    s = await setup()
    body = image_manifest(b"layer")
    digest = s.hub.fake.add_manifest("owner/img", body, tag="v1")
    for expected_cache in ("MISS", "HIT"):
        resp = await s.client.head("/v2/owner/img/manifests/v1")
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(body))
        assert resp.headers["Docker-Content-Digest"] == digest
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        assert resp.headers["X-Cache"] == expected_cache
        assert await resp.read() == b""


async def test_manifest_not_found_upstream(setup: MakeSetup) -> None:
    s = await setup()
    resp = await s.client.get("/v2/owner/img/manifests/nope")
    assert resp.status == 404
    assert (await error_of(resp))["code"] == "MANIFEST_UNKNOWN"
    assert resp.headers["X-Registry-Route"] == "docker.io"
    again = await s.client.get("/v2/owner/img/manifests/nope")
    assert again.status == 404
    assert s.hub.fake.count() == 1  # remembered for negative_ttl


async def test_stale_tag_says_so(setup: MakeSetup) -> None:
    s = await setup(hub={"tag_ttl": 0})
    body = image_manifest(b"v1")
    s.hub.fake.add_manifest("owner/img", body, tag="v1")
    assert (await s.client.get("/v2/owner/img/manifests/v1")).headers["X-Cache"] == "MISS"
    s.hub.fake.respond("HEAD", "/v2/owner/img/manifests/v1", 503)
    resp = await s.client.get("/v2/owner/img/manifests/v1")
    assert (resp.status, await resp.read()) == (200, body)
    assert resp.headers["X-Cache"] == "STALE"


async def test_revalidated_tag_is_a_hit_without_get(setup: MakeSetup) -> None:
    s = await setup(hub={"tag_ttl": 0})
    body = image_manifest(b"v1")
    s.hub.fake.add_manifest("owner/img", body, tag="v1")
    await s.client.get("/v2/owner/img/manifests/v1")
    resp = await s.client.get("/v2/owner/img/manifests/v1")
    assert (resp.status, await resp.read(), resp.headers["X-Cache"]) == (200, body, "HIT")
    assert (s.hub.fake.count("GET"), s.hub.fake.count("HEAD")) == (1, 1)


@pytest.mark.parametrize(("status", "client_status", "code"), [
    (500, 502, "UNAVAILABLE"), (503, 502, "UNAVAILABLE"), (429, 429, "TOOMANYREQUESTS"),
    (403, 403, "DENIED"),
])
async def test_upstream_failures_reach_the_client_as_oci_errors(
        setup: MakeSetup, status: int, client_status: int, code: str) -> None:
    s = await setup()
    s.hub.fake.respond("GET", "/v2/owner/img/manifests/v1", status,
                       headers={"Retry-After": "42"})
    resp = await s.client.get("/v2/owner/img/manifests/v1")
    assert resp.status == client_status
    assert (await error_of(resp))["code"] == code
    if status == 429:
        assert resp.headers["Retry-After"] == "42"


async def test_unreachable_upstream_is_502(setup: MakeSetup) -> None:
    s = await setup()
    await s.ghcr.stop()
    resp = await s.client.get("/v2/ghcr.io/owner/img/manifests/v1")
    assert resp.status == 502
    error = await error_of(resp)
    assert error["code"] == "UNAVAILABLE" and "ghcr.io" in error["message"]
    assert resp.headers["X-Registry-Route"] == "ghcr.io"


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize(("path", "headers"), [
    ("/v2/owner/img/manifests/v1", {"Host": "ghcr.example.com"}),
    ("/v2/owner/img/manifests/v1", {"Host": "GHCR.example.com:5000"}),
    ("/v2/ghcr.io/owner/img/manifests/v1", {}),
    ("/v2/owner/img/manifests/v1?ns=ghcr.io", {}),
])
async def test_requests_reach_the_route_they_name(setup: MakeSetup, path: str,
                                                  headers: dict[str, str]) -> None:
    s = await setup()
    body = image_manifest(b"ghcr")
    s.ghcr.fake.add_manifest("owner/img", body, tag="v1")
    s.hub.fake.add_manifest("owner/img", image_manifest(b"hub"), tag="v1")
    resp = await s.client.get(path, headers=headers)
    assert (resp.status, await resp.read()) == (200, body)
    assert resp.headers["X-Registry-Route"] == "ghcr.io"
    assert s.hub.fake.count() == 0
    assert [r.path for r in s.ghcr.fake.requests] == ["/v2/owner/img/manifests/v1"]


async def test_same_repository_on_two_routes_never_shares_a_cache(setup: MakeSetup) -> None:
    s = await setup()
    hub_body, ghcr_body = image_manifest(b"hub"), image_manifest(b"ghcr")
    s.hub.fake.add_manifest("owner/img", hub_body, tag="v1")
    s.ghcr.fake.add_manifest("owner/img", ghcr_body, tag="v1")
    data = os.urandom(1000)
    digest = s.hub.fake.add_blob(data)
    assert await (await s.client.get("/v2/owner/img/manifests/v1")).read() == hub_body
    assert await (await s.client.get("/v2/ghcr.io/owner/img/manifests/v1")).read() == ghcr_body
    assert await (await s.client.get(f"/v2/owner/img/blobs/{digest}")).read() == data
    resp = await s.client.get(f"/v2/ghcr.io/owner/img/blobs/{digest}")
    assert resp.status == 404
    assert (await error_of(resp))["code"] == "BLOB_UNKNOWN"


async def test_without_a_default_route_plain_paths_are_refused(setup: MakeSetup) -> None:
    s = await setup(default_route=None)
    resp = await s.client.get("/v2/library/nginx/manifests/latest")
    assert resp.status == 404
    assert (await error_of(resp))["code"] == "NAME_UNKNOWN"
    assert s.upstream_requests() == 0


# ------------------------------------------------------------------- blobs


async def test_blob_miss_then_hit(setup: MakeSetup) -> None:
    s = await setup()
    data = os.urandom(2 * MiB + 5)
    digest = s.hub.fake.add_blob(data)
    path = f"/v2/owner/img/blobs/{digest}"
    for expected in ("MISS", "HIT"):
        before = {result: s.gw.sample("gateway_cache_requests_total", route="docker.io",
                                      kind="blob", result=result) for result in ("miss", "hit")}
        resp = await s.client.get(path)
        assert resp.status == 200
        assert await resp.read() == data
        assert resp.headers["Content-Length"] == str(len(data))
        assert resp.headers["Docker-Content-Digest"] == digest
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["X-Cache"] == expected
        assert resp.headers["X-Registry-Route"] == "docker.io"
        await wait_until(lambda: not s.inflight(), what="the commit")
        # Every hit ratio is built on this counter: each answer moves its result by 1.
        after = {result: s.gw.sample("gateway_cache_requests_total", route="docker.io",
                                     kind="blob", result=result) for result in ("miss", "hit")}
        assert {r: after[r] - before[r] for r in after} == {
            "miss": int(expected == "MISS"), "hit": int(expected == "HIT")}
    assert s.hub.fake.count("GET", path) == 1


@pytest.mark.parametrize("header", [None, "bytes=0-99", "bytes=-10"])
async def test_every_cached_blob_answer_counts_one_hit(setup: MakeSetup,
                                                       header: str | None) -> None:
    s = await setup()
    path = await _cached_blob(s, os.urandom(1000))
    hits = s.gw.sample("gateway_cache_requests_total", route="docker.io", kind="blob",
                       result="hit")
    resp = await s.client.get(path, headers={"Range": header} if header else {})
    assert resp.status in (200, 206) and resp.headers["X-Cache"] == "HIT"
    assert s.gw.sample("gateway_cache_requests_total", route="docker.io", kind="blob",
                       result="hit") == hits + 1


async def test_head_blob(setup: MakeSetup) -> None:
    s = await setup()
    data = os.urandom(12345)
    digest = s.hub.fake.add_blob(data)
    path = f"/v2/owner/img/blobs/{digest}"
    miss = await s.client.head(path)
    assert (miss.status, miss.headers["X-Cache"]) == (200, "MISS")
    assert miss.headers["Content-Length"] == str(len(data))
    assert miss.headers["Docker-Content-Digest"] == digest
    assert (s.hub.fake.count("HEAD", path), s.hub.fake.count("GET", path)) == (1, 0)
    await (await s.client.get(path)).read()
    await wait_until(lambda: not s.inflight(), what="the commit")
    hit = await s.client.head(path)
    assert (hit.status, hit.headers["X-Cache"]) == (200, "HIT")
    assert hit.headers["Content-Length"] == str(len(data))
    assert await hit.read() == b""
    assert s.hub.fake.count() == 2


async def test_head_blob_unknown(setup: MakeSetup) -> None:
    s = await setup()
    resp = await s.client.head(f"/v2/owner/img/blobs/{digest_of(b'nope')}")
    assert resp.status == 404


async def test_concurrent_pulls_cost_one_upstream_transfer(setup: MakeSetup) -> None:
    s = await setup()
    data = os.urandom(3 * MiB)
    digest = s.hub.fake.add_blob(data)
    path = f"/v2/owner/img/blobs/{digest}"
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data[:MiB], data[MiB:]], gates=[None, gate],
                                     content_length=len(data))

    s.hub.fake.override("GET", path, slow)

    async def pull() -> tuple[int, bytes, str]:
        resp = await s.client.get(path)
        return resp.status, await resp.read(), resp.headers["X-Cache"]

    pulls = [asyncio.create_task(pull()) for _ in range(5)]
    await wait_until(lambda: s.gw.sample("gateway_cache_requests_total", route="docker.io",
                                         kind="blob", result="coalesced") == 4,
                     what="every pull to join the fetch")
    gate.set()
    results = await asyncio.gather(*pulls)
    assert all(status == 200 and body == data for status, body, _ in results)
    assert sorted(cache for _, _, cache in results) == ["COALESCED"] * 4 + ["MISS"]
    assert s.hub.fake.count("GET", path) == 1


async def test_corrupt_blob_is_never_delivered_whole(setup: MakeSetup) -> None:
    s = await setup()
    good = os.urandom(MiB)
    digest = digest_of(good)
    s.hub.fake.blobs[digest] = good[:-1] + bytes([good[-1] ^ 1])
    path = f"/v2/owner/img/blobs/{digest}"
    resp = await s.client.get(path)
    with pytest.raises(aiohttp.ClientError):
        await resp.read()
    await wait_until(lambda: not s.inflight(), what="the fetch to end")
    s.hub.fake.blobs[digest] = good
    again = await s.client.get(path)
    assert (again.status, await again.read()) == (200, good)
    assert again.headers["X-Cache"] == "MISS"
    assert s.hub.fake.count("GET", path) == 2


async def test_client_that_disconnects_does_not_cancel_the_fetch(setup: MakeSetup) -> None:
    s = await setup()
    data = os.urandom(2 * MiB)
    digest = s.hub.fake.add_blob(data)
    path = f"/v2/owner/img/blobs/{digest}"
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data[:MiB], data[MiB:]], gates=[None, gate],
                                     content_length=len(data))

    s.hub.fake.override("GET", path, slow)
    resp = await s.client.get(path)
    assert resp.status == 200
    await resp.content.readexactly(1000)
    resp.close()  # the client goes away mid-body
    await asyncio.sleep(0.05)
    gate.set()
    await wait_until(lambda: not s.inflight(), what="the fetch to end")
    again = await s.client.get(path)
    assert (again.status, await again.read()) == (200, data)
    assert again.headers["X-Cache"] == "HIT"
    assert s.hub.fake.count("GET", path) == 1


async def test_blob_larger_than_the_orphan_limit_reaches_its_client(setup: MakeSetup) -> None:
    """The client that starts a fetch waits for it from the first byte; the orphan limit
    is for fetches nobody waits for, not for the moments before the first read."""
    s = await setup(hub={"orphan_fetch_limit": MiB})
    data = os.urandom(6 * MiB)
    digest = s.hub.fake.add_blob(data)
    resp = await s.client.get(f"/v2/owner/img/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == data


async def test_blob_not_found_upstream(setup: MakeSetup) -> None:
    s = await setup()
    resp = await s.client.get(f"/v2/owner/img/blobs/{digest_of(b'nope')}")
    assert resp.status == 404
    assert (await error_of(resp))["code"] == "BLOB_UNKNOWN"


# ------------------------------------------------------------------- ranges


async def _cached_blob(s: Setup, data: bytes) -> str:
    digest = s.hub.fake.add_blob(data)
    resp = await s.client.get(f"/v2/owner/img/blobs/{digest}")
    assert await resp.read() == data
    await wait_until(lambda: not s.inflight(), what="the commit")
    return f"/v2/owner/img/blobs/{digest}"


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=10-19", 10, 20), ("bytes=-5", 995, 1000), ("bytes=990-", 990, 1000),
    ("bytes=0-0", 0, 1), ("bytes=900-5000", 900, 1000),
])
async def test_range_is_206(setup: MakeSetup, cached: bool, header: str, start: int,
                            end: int) -> None:
    s = await setup()
    data = os.urandom(1000)
    if cached:
        path = await _cached_blob(s, data)
    else:
        path = f"/v2/owner/img/blobs/{s.hub.fake.add_blob(data)}"
    resp = await s.client.get(path, headers={"Range": header})
    assert resp.status == 206
    assert await resp.read() == data[start:end]
    assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/1000"
    assert resp.headers["Content-Length"] == str(end - start)
    assert resp.headers["X-Cache"] == ("HIT" if cached else "MISS")
    assert s.hub.fake.count("GET") == 1


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
async def test_unsatisfiable_range_is_416(setup: MakeSetup, cached: bool, header: str) -> None:
    s = await setup()
    data = os.urandom(1000)
    if cached:
        path = await _cached_blob(s, data)
    else:
        path = f"/v2/owner/img/blobs/{s.hub.fake.add_blob(data)}"
    resp = await s.client.get(path, headers={"Range": header})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == "bytes */1000"
    assert data not in await resp.read()


# -------------------------------------------------------------- tags, referrers


async def test_tags_list_pages_and_link_rewrite(setup: MakeSetup) -> None:
    s = await setup()
    for tag in ("a", "b", "c"):
        s.hub.fake.add_manifest("library/nginx", image_manifest(tag.encode()), tag=tag)
    resp = await s.client.get("/v2/nginx/tags/list?n=2")
    assert resp.status == 200
    assert await resp.json() == {"name": "library/nginx", "tags": ["a", "b"]}
    assert resp.headers["X-Registry-Route"] == "docker.io"
    (seen,) = s.hub.fake.seen("GET")
    assert (seen.path, seen.query) == ("/v2/library/nginx/tags/list", {"n": "2"})
    link = _next_link(resp.headers["Link"])
    assert link.path == "/v2/nginx/tags/list"  # the client's own path, not the upstream's
    assert dict(link.query) == {"n": "2", "last": "b"}

    follow = await s.client.get(str(link))
    assert await follow.json() == {"name": "library/nginx", "tags": ["c"]}
    assert "Link" not in follow.headers
    assert s.hub.fake.seen("GET")[-1].query == {"n": "2", "last": "b"}


@pytest.mark.parametrize(("path", "headers", "want_path", "want_query"), [
    ("/v2/ghcr.io/owner/img/tags/list?n=1", {}, "/v2/ghcr.io/owner/img/tags/list", {}),
    ("/v2/owner/img/tags/list?n=1&ns=ghcr.io", {}, "/v2/owner/img/tags/list", {"ns": "ghcr.io"}),
    ("/v2/owner/img/tags/list?n=1", {"Host": "ghcr.example.com"}, "/v2/owner/img/tags/list", {}),
])
async def test_tags_link_keeps_the_clients_route(setup: MakeSetup, path: str,
                                                 headers: dict[str, str], want_path: str,
                                                 want_query: dict[str, str]) -> None:
    s = await setup()
    for tag in ("a", "b"):
        s.ghcr.fake.add_manifest("owner/img", image_manifest(tag.encode()), tag=tag)
    resp = await s.client.get(path, headers=headers)
    assert await resp.json() == {"name": "owner/img", "tags": ["a"]}
    link = _next_link(resp.headers["Link"])
    assert link.path == want_path
    assert dict(link.query) == {"n": "1", "last": "a", **want_query}
    assert s.hub.fake.count() == 0


async def test_tags_of_an_unknown_repository(setup: MakeSetup) -> None:
    s = await setup()
    resp = await s.client.get("/v2/owner/nothing/tags/list")
    assert resp.status == 404
    assert (await error_of(resp))["code"] == "NAME_UNKNOWN"


def _next_link(header: str) -> URL:
    target, _, rel = header.partition(";")
    assert rel.strip() == 'rel="next"'
    assert target.startswith("<") and target.endswith(">")
    return URL(target[1:-1])


async def test_referrers_pass_through(setup: MakeSetup) -> None:
    s = await setup()
    subject = digest_of(b"subject manifest")
    sbom = {"mediaType": OCI_MANIFEST, "digest": digest_of(b"sbom"), "size": 10,
            "artifactType": "application/spdx+json"}
    sig = {"mediaType": OCI_MANIFEST, "digest": digest_of(b"sig"), "size": 10,
           "artifactType": "application/vnd.dev.cosign"}
    s.ghcr.fake.referrers[subject] = [sbom, sig]

    resp = await s.client.get(f"/v2/ghcr.io/owner/img/referrers/{subject}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == OCI_INDEX
    assert (await resp.json())["manifests"] == [sbom, sig]
    assert "OCI-Filters-Applied" not in resp.headers

    filtered = await s.client.get(
        f"/v2/ghcr.io/owner/img/referrers/{subject}?artifactType=application/spdx%2Bjson")
    assert (await filtered.json())["manifests"] == [sbom]
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert s.ghcr.fake.seen("GET")[-1].query == {"artifactType": "application/spdx+json"}
    assert s.ghcr.fake.seen("GET")[-1].path == f"/v2/owner/img/referrers/{subject}"


# ------------------------------------------------------------ metrics, logs


async def test_metrics_expose_gateway_series_by_route(setup: MakeSetup) -> None:
    s = await setup()
    body = image_manifest(b"layer")
    s.hub.fake.add_manifest("library/nginx", body, tag="latest")
    data = os.urandom(4096)
    digest = s.ghcr.fake.add_blob(data)
    await (await s.client.get("/v2/nginx/manifests/latest")).read()
    await (await s.client.get("/v2/nginx/manifests/latest")).read()
    await (await s.client.get(f"/v2/ghcr.io/owner/img/blobs/{digest}")).read()
    await (await s.client.get("/v2/Bad/manifests/latest")).read()

    resp = await s.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(await resp.text())
               for sample in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("gateway_requests_total", route="docker.io", kind="manifest", method="GET",
                 status="200") == 2
    assert value("gateway_requests_total", route="ghcr.io", kind="blob", method="GET",
                 status="200") == 1
    assert value("gateway_requests_total", route="-", kind="other", method="GET",
                 status="400") == 1
    assert value("gateway_cache_requests_total", route="docker.io", kind="tag",
                 result="miss") == 1
    assert value("gateway_cache_requests_total", route="docker.io", kind="tag",
                 result="hit") == 1
    assert value("gateway_cache_requests_total", route="ghcr.io", kind="blob",
                 result="miss") == 1
    assert value("gateway_upstream_requests_total", route="docker.io", kind="manifest",
                 status="200") == 1
    assert value("gateway_upstream_bytes_total", route="ghcr.io") == len(data)
    assert value("gateway_served_bytes_total", route="ghcr.io") > 0
    assert value("gateway_request_duration_seconds_count", route="docker.io",
                 kind="manifest") == 2
    assert any(name == "gateway_inflight_fetches" for name, _ in samples)
    # Repositories stay out of labels (unbounded cardinality); they go to the log.
    assert "nginx" not in await resp.text()


async def test_access_log_is_one_json_line_per_request(setup: MakeSetup,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    s = await setup(hub={"credentials": {"username": "me", "password_env": "HUB_PASSWORD"}})
    caplog.set_level(logging.INFO, logger="gateway.access")
    body = image_manifest(b"layer")
    s.hub.fake.add_manifest("library/nginx", body, tag="latest")
    await (await s.client.get("/v2/nginx/manifests/latest",
                              headers={"X-Request-Id": "req-1"})).read()
    await (await s.client.get("/v2/nginx/manifests/-bad")).read()
    await (await s.client.get("/v2/ghcr.io/owner/img/manifests/v1")).read()

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 3
    ok, bad, missing = lines
    assert ok["id"] == "req-1"
    assert (ok["route"], ok["repository"], ok["reference"]) == (
        "docker.io", "library/nginx", "latest")
    assert (ok["status"], ok["cache"], ok["method"]) == (200, "MISS", "GET")
    assert ok["bytes"] > 0
    assert ok["path"] == "/v2/nginx/manifests/latest"
    assert ok["duration_ms"] >= 0
    assert (bad["status"], bad["cache"]) == (400, "-")
    assert (missing["route"], missing["repository"], missing["status"]) == (
        "ghcr.io", "owner/img", 404)
    assert SECRET not in caplog.text


_LOGGED_TEXT = st.one_of(st.none(), st.text(max_size=40), st.sampled_from(
    ['a"quote', "back\\slash", "ctl\x01", "del\x7f", "naïve", "line\nbreak", "\u2028", ""]))


@settings(max_examples=300, deadline=None)
@given(request_id=st.text(max_size=20), remote=_LOGGED_TEXT, host=st.text(max_size=30),
       path=st.text(max_size=60), user=_LOGGED_TEXT, error=_LOGGED_TEXT,
       now=st.floats(min_value=0, max_value=4e9), duration=st.floats(min_value=0, max_value=1e4),
       aborted=st.booleans())
def test_an_access_line_is_one_line_of_json_with_every_field(
        request_id: str, remote: str | None, host: str, path: str, user: str | None,
        error: str | None, now: float, duration: float, aborted: bool) -> None:
    """The line is written out directly (not json.dumps): whatever a client put in its
    Host, path or X-Request-Id, it stays one line that parses to the same values."""
    line = access_line(now, request_id, remote, host, "GET", path, "docker.io",
                       "https://registry-1.docker.io", "library/nginx", "latest", 200, 1234,
                       duration, "HIT", user, "access.anonymous", error, aborted)
    assert "\n" not in line and "\r" not in line
    parsed = json.loads(line)
    expected: dict[str, Any] = {
        "id": request_id, "remote": remote, "host": host, "method": "GET", "path": path,
        "route": "docker.io", "upstream": "https://registry-1.docker.io",
        "repository": "library/nginx", "reference": "latest", "status": 200,
        "bytes": 1234, "cache": "HIT", "user": user, "rule": "access.anonymous"}
    if error is not None:
        expected["error"] = error
    if aborted:
        expected["aborted"] = True
    times = parsed.pop("ts"), parsed.pop("duration_ms")
    assert parsed == expected
    assert abs(times[0] - now) <= 0.001 and abs(times[1] - duration * 1000) <= 0.006


async def test_served_bytes_count_bodies_not_headers(setup: MakeSetup,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """gateway_served_bytes is documented as body bytes (and the log's "bytes" is the
    same number): response headers, and HEAD answers, are not body."""
    s = await setup()
    caplog.set_level(logging.INFO, logger="gateway.access")
    body = image_manifest(b"layer")
    s.ghcr.fake.add_manifest("owner/img", body, tag="v1")
    data = os.urandom(4096)
    digest = s.ghcr.fake.add_blob(data)
    await (await s.client.get("/v2/ghcr.io/owner/img/manifests/v1")).read()
    await (await s.client.head("/v2/ghcr.io/owner/img/manifests/v1")).read()
    await (await s.client.get(f"/v2/ghcr.io/owner/img/blobs/{digest}")).read()
    # The server logs once its send returns, which may be after the client has it all.
    await wait_until(lambda: sum(r.name == "gateway.access" for r in caplog.records) == 3,
                     what="three access log lines")
    logged = [json.loads(r.getMessage())["bytes"] for r in caplog.records
              if r.name == "gateway.access"]
    assert logged == [len(body), 0, len(data)]
    assert s.gw.sample("gateway_served_bytes_total", route="ghcr.io") == len(body) + len(data)


async def test_json_error_for_an_unexpected_exception(setup: MakeSetup,
                                                      caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    s = await setup()

    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(s.gw.services.cache.manifests, "get", boom)
    resp = await s.client.get("/v2/owner/img/manifests/v1")
    assert resp.status == 500
    error = await error_of(resp)
    assert error["code"] == "UNKNOWN"
    assert "Traceback" not in error["message"] and "a bug" not in error["message"]
    assert resp.headers["X-Request-Id"] in error["message"]


async def test_aborted_transfer_is_logged_with_the_bytes_sent(
        setup: MakeSetup, caplog: pytest.LogCaptureFixture) -> None:
    """A client that goes away mid-blob still got bytes: the log line and
    gateway_served_bytes say how many, and the line is marked aborted."""
    s = await setup()
    caplog.set_level(logging.INFO, logger="gateway.access")
    data = os.urandom(2 * MiB)
    digest = s.hub.fake.add_blob(data)
    path = f"/v2/owner/img/blobs/{digest}"
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data[:MiB], data[MiB:]], gates=[None, gate],
                                     content_length=len(data))

    s.hub.fake.override("GET", path, slow)
    resp = await s.client.get(path)
    received = await resp.content.readexactly(MiB - 1)  # all the gateway can send so far
    resp.close()
    await wait_until(lambda: any(r.name == "gateway.access" for r in caplog.records),
                     what="the access log line")
    gate.set()
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert line["aborted"] is True
    assert (line["route"], line["repository"]) == ("docker.io", "owner/img")
    assert line["bytes"] >= len(received)
    assert s.gw.sample("gateway_served_bytes_total", route="docker.io") >= len(received)
    # The client was told X-Cache: MISS with its 200; the log says the same.
    assert line["cache"] == "MISS"


async def test_unsatisfiable_range_on_a_miss_still_keeps_the_blob(setup: MakeSetup) -> None:
    s = await setup()
    data = os.urandom(1000)
    digest = s.hub.fake.add_blob(data)
    path = f"/v2/owner/img/blobs/{digest}"
    resp = await s.client.get(path, headers={"Range": "bytes=2000-"})
    assert resp.status == 416
    assert (await error_of(resp))["code"] == "RANGE_INVALID"
    await wait_until(lambda: not s.inflight(), what="the commit")
    again = await s.client.get(path)
    assert (again.status, await again.read(), again.headers["X-Cache"]) == (200, data, "HIT")
    assert s.hub.fake.count("GET", path) == 1


async def test_inflight_gauge_returns_to_zero(setup: MakeSetup) -> None:
    s = await setup()
    data = os.urandom(MiB)
    digest = s.hub.fake.add_blob(data)
    path = f"/v2/owner/img/blobs/{digest}"
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data[:10], data[10:]], gates=[None, gate],
                                     content_length=len(data))

    s.hub.fake.override("GET", path, slow)
    pull = asyncio.create_task(s.client.get(path))
    await wait_until(lambda: s.gw.sample("gateway_inflight_fetches", route="docker.io") == 1,
                     what="the fetch to start")
    gate.set()
    assert await (await pull).read() == data
    await wait_until(lambda: s.gw.sample("gateway_inflight_fetches", route="docker.io") == 0,
                     what="the gauge to drop")


async def test_shutdown_with_a_stalled_fetch_is_prompt(setup: MakeSetup) -> None:
    """The cache owns its fetches and cancels them when the app stops: a stalled upstream
    cannot hold shutdown, and nothing half-fetched is left in the store."""
    s = await setup()
    data = os.urandom(MiB)
    digest = s.hub.fake.add_blob(data)
    path = f"/v2/owner/img/blobs/{digest}"
    never = asyncio.Event()

    async def stalled(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data[:10], data[10:]], gates=[None, never],
                                     content_length=len(data))

    s.hub.fake.override("GET", path, stalled)
    pull = asyncio.create_task(s.client.get(path))
    await wait_until(lambda: bool(s.inflight()), what="the fetch to start")
    await asyncio.wait_for(s.client.close(), 5)
    pull.cancel()
    await asyncio.gather(pull, return_exceptions=True)
    spool = s.gw.data_dir / ".spool"
    assert not spool.exists() or list(spool.iterdir()) == []
    assert not list(s.gw.data_dir.rglob(digest.split(":")[1]))


async def test_every_accept_line_counts(setup: MakeSetup) -> None:
    s = await setup()
    body = image_manifest(b"layer")
    s.hub.fake.add_manifest("owner/img", body, tag="v1")
    headers = CIMultiDict([("Accept", OCI_INDEX), ("Accept", OCI_MANIFEST)])
    resp = await s.client.get("/v2/owner/img/manifests/v1", headers=headers)
    assert (resp.status, await resp.read()) == (200, body)
    sent = s.hub.fake.seen("GET")[0].headers["Accept"]
    assert OCI_INDEX in sent and OCI_MANIFEST in sent
    # The cached tag is usable for a client that accepts it on its second Accept line.
    again = await s.client.get("/v2/owner/img/manifests/v1", headers=headers)
    assert again.headers["X-Cache"] == "HIT"


async def test_media_type_comes_from_the_manifest_when_upstream_says_json(
        setup: MakeSetup) -> None:
    s = await setup()
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    s.hub.fake.respond("GET", "/v2/owner/img/manifests/v1", 200, body=body,
                       headers={"Content-Type": "application/json"})
    resp = await s.client.get("/v2/owner/img/manifests/v1")
    assert (resp.status, await resp.read()) == (200, body)
    assert resp.headers["Content-Type"] == OCI_INDEX
    assert resp.headers["Docker-Content-Digest"] == digest_of(body)


async def test_healthz(setup: MakeSetup) -> None:
    s = await setup()
    resp = await s.client.get("/healthz")
    assert (resp.status, await resp.text()) == (200, "ok\n")
    assert s.upstream_requests() == 0


async def test_route_listing_hides_upstreams_and_credentials(setup: MakeSetup) -> None:
    s = await setup(hub={"credentials": {"username": "hub-user", "password_env": "HUB_PASSWORD"},
                         "hosts": ["hub-mirror.corp"]})
    resp = await s.client.get("/_gateway/routes")
    assert resp.status == 200
    text = await resp.text()
    listing = json.loads(text)
    assert {r["name"] for r in listing["routes"]} == {"docker.io", "ghcr.io"}
    hub = next(r for r in listing["routes"] if r["name"] == "docker.io")
    assert hub["label"] == "hub" and hub["hosts"] == ["hub-mirror.corp"]
    assert listing["default_route"] == "docker.io"
    for secret in (SECRET, "hub-user", s.hub.url, s.ghcr.url, "127.0.0.1"):
        assert secret not in text


async def test_blob_deleted_from_the_store_is_fetched_again(setup: MakeSetup) -> None:
    """BlobStore.delete is part of the store's interface (eviction, repair): a blob that
    is gone from disk must be fetched again, not answered from a stale size memo."""
    s = await setup()
    data = os.urandom(5000)
    path = await _cached_blob(s, data)
    digest = path.rsplit("/", 1)[1]
    hex_digest = digest.split(":")[1]
    key = f"docker.io/blobs/sha256/{hex_digest[:2]}/{hex_digest}"
    store = s.gw.services.cache.store
    assert await store.stat(key) == len(data)
    await store.delete(key)
    resp = await s.client.get(path)
    assert resp.status == 200
    assert await resp.read() == data
    assert resp.headers["X-Cache"] == "MISS"
    assert s.hub.fake.count("GET", path) == 2


@settings(max_examples=150, deadline=None)
@given(st.one_of(
    st.from_regex(r"\s*bytes\s*=\s*\d{0,12}\s*-\s*\d{0,12}\s*", fullmatch=True),
    st.text(max_size=40)), st.integers(0, 10**9))
def test_range_header_parsing_is_total(header: str, size: int) -> None:
    """Any Range header against any size: the whole blob, a 416, or a range inside it."""
    request = make_mocked_request("GET", "/", headers={"Range": header})
    try:
        span = byte_range(request, size)
    except RegistryError as exc:
        assert exc.status == 416 and exc.headers["Content-Range"] == f"bytes */{size}"
        return
    if span is not None:
        start, end = span
        assert 0 <= start < end <= size
