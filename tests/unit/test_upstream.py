"""upstream.py against in-process fake registries: auth, redirects, and the error table."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from yarl import URL

from gateway.config import Credentials, ProxySettings
from gateway.errors import UpstreamError
from gateway.metrics import Metrics
from gateway.oci import MANIFEST_TYPES, manifest_accept
from gateway.upstream import Upstream
from tests.support.client import basic_header
from tests.support.clock import Clock
from tests.support.fake_registry import FakeRegistry, image_manifest
from tests.support.faults import Fault, rate_limited, unavailable
from tests.support.images import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.support.net import free_port

from .conftest import Served, make_route

SECRET = "s3cr3t-Pa55word"
USER = "gw-user"
REPO = "owner/img"

Registry = Callable[..., Awaitable[Served]]
UpstreamFor = Callable[..., Awaitable[Upstream]]


async def fetch(upstream: Upstream, path: str, *, kind: str = "manifest",
                repository: str | None = REPO, **kwargs: Any) -> tuple[int, bytes]:
    resp = await upstream.request("GET", path, kind=kind, repository=repository, **kwargs)
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


async def failure(upstream: Upstream, path: str, *, kind: str = "manifest",
                  method: str = "GET") -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        resp = await upstream.request(method, path, kind=kind, repository=REPO)
        resp.release()
    return caught.value


def assert_no_secret(error: UpstreamError, *secrets: str) -> None:
    shown = [str(error), repr(error), error.message, error.body().decode(),
             *error.headers.values()]
    for secret in secrets:
        for text in shown:
            assert secret not in text


def challenge_401(realm: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    header = f'Bearer realm="{realm}",service="x",scope="repository:{REPO}:pull"'

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(status=401, headers={"WWW-Authenticate": header})

    return answer


# ----------------------------------------------------------------- tokens


async def test_anonymous_bearer_token_dance(registry: Registry,
                                            upstream_for: UpstreamFor) -> None:
    served = await registry(auth="bearer")
    body = image_manifest(b"layer")
    served.fake.add_manifest(REPO, body, tag="v1")
    upstream = await upstream_for(make_route(served.url))

    assert await fetch(upstream, f"/v2/{REPO}/manifests/v1") == (200, body)

    seen = served.fake.seen("GET", f"/v2/{REPO}/manifests/v1")
    assert [s.headers.get("Authorization") for s in seen] == [None, "Bearer token-1"]
    (token_request,) = served.fake.token_requests
    assert token_request.query == {"service": "fake-registry",
                                   "scope": f"repository:{REPO}:pull"}
    assert "Authorization" not in token_request.headers  # anonymous: no credentials sent


async def test_token_request_carries_basic_credentials(registry: Registry,
                                                       upstream_for: UpstreamFor) -> None:
    served = await registry(auth="bearer", username=USER, password=SECRET)
    body = image_manifest(b"private")
    served.fake.add_manifest(REPO, body, tag="v1")
    route = make_route(served.url, credentials=Credentials(USER, SECRET))
    upstream = await upstream_for(route)

    assert await fetch(upstream, f"/v2/{REPO}/manifests/v1") == (200, body)
    (token_request,) = served.fake.token_requests
    assert token_request.headers["Authorization"] == basic_header(USER, SECRET)
    # The registry itself only ever sees the bearer token, never the password.
    sent = [s.headers.get("Authorization") for s in served.fake.requests]
    assert sent == [None, "Bearer token-1"]


async def test_refused_credentials_at_the_token_endpoint(registry: Registry,
                                                         upstream_for: UpstreamFor) -> None:
    served = await registry(auth="bearer", username=USER, password="the-right-one")
    route = make_route(served.url, credentials=Credentials(USER, SECRET))
    upstream = await upstream_for(route)
    error = await failure(upstream, f"/v2/{REPO}/manifests/v1")
    assert (error.code, error.status, error.retryable) == ("UNAUTHORIZED", 502, False)
    assert_no_secret(error, SECRET, base64.b64encode(f"{USER}:{SECRET}".encode()).decode())


async def test_token_is_cached_per_scope(registry: Registry, upstream_for: UpstreamFor) -> None:
    served = await registry(auth="bearer")
    served.fake.add_manifest(REPO, image_manifest(b"a"), tag="v1")
    served.fake.add_manifest("other/img", image_manifest(b"b"), tag="v1")
    upstream = await upstream_for(make_route(served.url))

    for _ in range(3):
        assert (await fetch(upstream, f"/v2/{REPO}/manifests/v1"))[0] == 200
    assert len(served.fake.token_requests) == 1
    assert served.fake.count("GET", f"/v2/{REPO}/manifests/v1") == 4  # one 401, three 200

    # Another repository is another scope: a token of its own, asked for up front.
    assert (await fetch(upstream, "/v2/other/img/manifests/v1",
                        repository="other/img"))[0] == 200
    assert [t.query["scope"] for t in served.fake.token_requests] == [
        f"repository:{REPO}:pull", "repository:other/img:pull"]
    assert served.fake.count("GET", "/v2/other/img/manifests/v1") == 1
    # And the first scope's token is still the cached one.
    assert (await fetch(upstream, f"/v2/{REPO}/manifests/v1"))[0] == 200
    assert len(served.fake.token_requests) == 2


async def test_token_is_renewed_after_it_expires(registry: Registry,
                                                 upstream_for: UpstreamFor) -> None:
    served = await registry(auth="bearer", token_expires_in=1)
    served.fake.add_manifest(REPO, image_manifest(b"a"), tag="v1")
    clock = Clock()
    upstream = await upstream_for(make_route(served.url), clock=clock)

    assert (await fetch(upstream, f"/v2/{REPO}/manifests/v1"))[0] == 200
    assert (await fetch(upstream, f"/v2/{REPO}/manifests/v1"))[0] == 200
    assert len(served.fake.token_requests) == 1
    clock.advance(1.1)  # past the token's life (1 s, renewed early)
    assert (await fetch(upstream, f"/v2/{REPO}/manifests/v1"))[0] == 200
    assert len(served.fake.token_requests) == 2
    # Renewed before use: the expired token was never sent and refused.
    last = served.fake.seen("GET", f"/v2/{REPO}/manifests/v1")[-1]
    assert last.headers["Authorization"] == "Bearer token-2"
    assert served.fake.count("GET", f"/v2/{REPO}/manifests/v1") == 4


async def test_refused_token_is_renewed_once(registry: Registry,
                                             upstream_for: UpstreamFor) -> None:
    served = await registry(auth="bearer")
    body = image_manifest(b"a")
    served.fake.add_manifest(REPO, body, tag="v1")
    upstream = await upstream_for(make_route(served.url))
    assert (await fetch(upstream, f"/v2/{REPO}/manifests/v1"))[0] == 200

    served.fake.revoke_tokens()  # e.g. the registry restarted with a new signing key
    assert await fetch(upstream, f"/v2/{REPO}/manifests/v1") == (200, body)
    assert len(served.fake.token_requests) == 2
    sent = [s.headers.get("Authorization")
            for s in served.fake.seen("GET", f"/v2/{REPO}/manifests/v1")]
    assert sent == [None, "Bearer token-1", "Bearer token-1", "Bearer token-2"]


async def test_a_401_after_renewal_is_not_retried_again(registry: Registry,
                                                        upstream_for: UpstreamFor) -> None:
    served = await registry(auth="bearer")
    upstream = await upstream_for(make_route(served.url))
    path = f"/v2/{REPO}/manifests/v1"
    served.fake.override("GET", path, challenge_401(f"{served.url}/token"))
    error = await failure(upstream, path)
    assert (error.code, error.status) == ("DENIED", 403)
    assert served.fake.count("GET", path) == 2
    assert len(served.fake.token_requests) == 1
    assert_no_secret(error, "token-1")


async def test_concurrent_first_requests_share_one_token(registry: Registry,
                                                         upstream_for: UpstreamFor) -> None:
    """A cold gateway hit by many pulls of one image asks for one token, not one each:
    a concurrent request's challenge is not a refusal of a token this request sent."""
    served = await registry(auth="bearer")
    served.fake.add_manifest(REPO, image_manifest(b"a"), tag="v1")
    upstream = await upstream_for(make_route(served.url))
    results = await asyncio.gather(*(fetch(upstream, f"/v2/{REPO}/manifests/v1")
                                     for _ in range(5)))
    assert [status for status, _ in results] == [200] * 5
    assert len(served.fake.token_requests) == 1


async def test_unreachable_token_endpoint_is_502(registry: Registry,
                                                 upstream_for: UpstreamFor) -> None:
    served = await registry()
    path = f"/v2/{REPO}/manifests/v1"
    served.fake.override("GET", path, challenge_401(f"http://127.0.0.1:{free_port()}/token"))
    route = make_route(served.url, credentials=Credentials(USER, SECRET))
    error = await failure(await upstream_for(route), path)
    assert (error.code, error.status, error.retryable) == ("UNAVAILABLE", 502, True)
    assert_no_secret(error, SECRET)


@pytest.mark.parametrize(("answer", "status"), [
    (web.Response(text="<html>oops</html>"), 200),
    (web.json_response({"nothing": "here"}), 200),
    (web.Response(status=500), 500),
])
async def test_broken_token_endpoint_is_502(registry: Registry, upstream_for: UpstreamFor,
                                            answer: web.Response, status: int) -> None:
    served = await registry()
    path = f"/v2/{REPO}/manifests/v1"
    served.fake.override("GET", path, challenge_401(f"{served.url}/other-token"))
    served.fake.respond("GET", "/other-token", status, body=bytes(answer.body or b""),
                        headers={"Content-Type": answer.content_type})
    route = make_route(served.url, credentials=Credentials(USER, SECRET))
    error = await failure(await upstream_for(route), path)
    assert (error.code, error.status) == ("UNAVAILABLE", 502)
    assert_no_secret(error, SECRET)


# ------------------------------------------------------------------ basic


async def test_basic_auth_upstream(registry: Registry, upstream_for: UpstreamFor) -> None:
    served = await registry(auth="basic", username=USER, password=SECRET)
    body = image_manifest(b"basic")
    served.fake.add_manifest(REPO, body, tag="v1")
    upstream = await upstream_for(make_route(served.url, credentials=Credentials(USER, SECRET)))

    assert await fetch(upstream, f"/v2/{REPO}/manifests/v1") == (200, body)
    assert await fetch(upstream, f"/v2/{REPO}/manifests/v1") == (200, body)
    sent = [s.headers.get("Authorization")
            for s in served.fake.seen("GET", f"/v2/{REPO}/manifests/v1")]
    # Challenged once, then the credentials go with every request.
    assert sent == [None, basic_header(USER, SECRET), basic_header(USER, SECRET)]
    assert served.fake.token_requests == []


async def test_basic_auth_upstream_without_credentials_is_401(
        registry: Registry, upstream_for: UpstreamFor) -> None:
    served = await registry(auth="basic", username=USER, password=SECRET)
    upstream = await upstream_for(make_route(served.url))
    error = await failure(upstream, f"/v2/{REPO}/manifests/v1")
    assert (error.code, error.status, error.retryable) == ("UNAUTHORIZED", 401, False)
    assert served.fake.count() == 1


async def test_wrong_basic_credentials_are_denied_without_echo(
        registry: Registry, upstream_for: UpstreamFor) -> None:
    served = await registry(auth="basic", username=USER, password="the-right-one")
    upstream = await upstream_for(make_route(served.url, credentials=Credentials(USER, SECRET)))
    error = await failure(upstream, f"/v2/{REPO}/manifests/v1")
    assert (error.code, error.status) == ("DENIED", 403)
    assert served.fake.count() == 2
    assert_no_secret(error, SECRET, basic_header(USER, SECRET))


# -------------------------------------------------------------- redirects


@pytest.mark.parametrize("auth", ["bearer", "basic"])
async def test_redirect_to_another_host_drops_authorization(
        registry: Registry, upstream_for: UpstreamFor, auth: str) -> None:
    cdn = await registry()
    data = b"layer bytes from the CDN" * 100
    digest = cdn.fake.add_blob(data)
    served = await registry(auth=auth, username=USER if auth == "basic" else None,
                            password=SECRET if auth == "basic" else None,
                            redirect_blobs_to=cdn.url)
    served.fake.add_blob(data)
    upstream = await upstream_for(make_route(served.url, credentials=Credentials(USER, SECRET)))

    assert await fetch(upstream, f"/v2/{REPO}/blobs/{digest}", kind="blob") == (200, data)
    assert await fetch(upstream, f"/v2/{REPO}/blobs/{digest}", kind="blob") == (200, data)
    (first, second) = [s for s in served.fake.seen("GET", f"/v2/{REPO}/blobs/{digest}")
                       if "Authorization" in s.headers]
    assert first.headers["Authorization"] and second.headers["Authorization"]
    assert cdn.fake.count("GET", f"/cdn/{digest}") == 2
    for seen in cdn.fake.requests:
        assert "Authorization" not in seen.headers
        assert seen.query == {"sig": "x"}


@pytest.mark.parametrize("absolute", [False, True])
async def test_same_host_redirect_keeps_authorization(
        registry: Registry, upstream_for: UpstreamFor, absolute: bool) -> None:
    served = await registry(auth="bearer")
    data = b"same host storage"
    digest = served.fake.add_blob(data)
    path = f"/v2/{REPO}/blobs/{digest}"
    location = f"{served.url if absolute else ''}/storage/{digest}"

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(location)

    served.fake.override("GET", path, redirect)
    upstream = await upstream_for(make_route(served.url))
    assert await fetch(upstream, path, kind="blob") == (200, data)
    (storage,) = served.fake.seen("GET", f"/storage/{digest}")
    assert storage.headers["Authorization"] == "Bearer token-1"


async def test_redirect_loop_is_502(registry: Registry, upstream_for: UpstreamFor) -> None:
    served = await registry()
    path = f"/v2/{REPO}/blobs/sha256:{'a' * 64}"

    async def loop(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(path)

    served.fake.override("GET", path, loop)
    error = await failure(await upstream_for(make_route(served.url)), path, kind="blob")
    assert (error.code, error.status) == ("UNAVAILABLE", 502)
    assert 2 <= served.fake.count("GET", path) <= 10


async def test_identity_encoding_is_asked_for(registry: Registry,
                                              upstream_for: UpstreamFor) -> None:
    served = await registry()
    digest = served.fake.add_blob(b"x")
    await fetch(await upstream_for(make_route(served.url)), f"/v2/{REPO}/blobs/{digest}",
                kind="blob")
    (seen,) = served.fake.requests
    assert seen.headers["Accept-Encoding"] == "identity"


# ------------------------------------------------------- proxy, TLS, tokens


class ForwardProxy:
    """An HTTP forward proxy on 127.0.0.1 that sends everything to one fake registry,
    whatever host the request names, and remembers the Host of each request."""

    def __init__(self, target: str) -> None:
        self.target = URL(target)
        self.hosts: list[str] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._forward)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.hosts.append(request.headers.get("Host", ""))
        url = self.target.with_path(request.path).with_query(request.query)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("proxy-connection", "connection")}
        async with aiohttp.ClientSession(auto_decompress=False) as session, \
                session.request(request.method, url, headers=headers,
                                allow_redirects=False) as resp:
            body = await resp.read()
            keep = {k: v for k, v in resp.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")}
            return web.Response(status=resp.status, body=body, headers=keep)


async def test_everything_goes_through_the_outbound_proxy(
        registry: Registry, upstream_for: UpstreamFor, aiohttp_server: Any) -> None:
    served = await registry(auth="bearer")
    body = image_manifest(b"via proxy")
    served.fake.add_manifest(REPO, body, tag="v1")
    proxy = ForwardProxy(served.url)
    proxy_server = await aiohttp_server(proxy.app)
    # Nothing listens at the upstream's own address: only the proxy can reach it.
    unreachable = f"127.0.0.1:{free_port()}"
    route = make_route(f"http://{unreachable}",
                       proxy=ProxySettings(URL(str(proxy_server.make_url("")).rstrip("/"))))
    upstream = await upstream_for(route)
    assert await fetch(upstream, f"/v2/{REPO}/manifests/v1") == (200, body)
    # The 401, the token request (realm on the upstream's host) and the retry.
    assert proxy.hosts == [unreachable] * 3
    assert len(served.fake.token_requests) == 1


async def test_private_ca_from_ca_file(registry: Registry, upstream_for: UpstreamFor,
                                       aiohttp_server: Any, tmp_path: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    fake = FakeRegistry()
    body = image_manifest(b"over tls")
    fake.add_manifest(REPO, body, tag="v1")
    server = await aiohttp_server(fake.app, ssl=server_context)
    url = str(server.make_url("")).rstrip("/")
    assert url.startswith("https://")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    trusting = await upstream_for(make_route(url, ca_file=str(ca_file)))
    assert await fetch(trusting, f"/v2/{REPO}/manifests/v1") == (200, body)

    default = await upstream_for(make_route(url))
    error = await failure(default, f"/v2/{REPO}/manifests/v1")
    assert (error.code, error.status) == ("UNAVAILABLE", 502)
    assert len(fake.requests) == 1


async def test_token_endpoint_answering_access_token(registry: Registry,
                                                     upstream_for: UpstreamFor) -> None:
    served = await registry()
    path = f"/v2/{REPO}/manifests/v1"
    body = image_manifest(b"oauth2 style")

    async def guarded(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != "Bearer oauth-token":
            return await challenge_401(f"{served.url}/oauth2/token")(request)
        return web.Response(body=body, headers={"Content-Type": OCI_MANIFEST})

    served.fake.override("GET", path, guarded)
    served.fake.respond("GET", "/oauth2/token", 200,
                        body=json.dumps({"access_token": "oauth-token"}).encode(),
                        headers={"Content-Type": "application/json"})
    upstream = await upstream_for(make_route(served.url))
    assert await fetch(upstream, path) == (200, body)


# ------------------------------------------------------------ error table


@pytest.mark.parametrize(("kind", "path", "code"), [
    ("manifest", f"/v2/{REPO}/manifests/v1", "MANIFEST_UNKNOWN"),
    ("blob", f"/v2/{REPO}/blobs/sha256:{'0' * 64}", "BLOB_UNKNOWN"),
    ("tags", f"/v2/{REPO}/tags/list", "NAME_UNKNOWN"),
    ("referrers", f"/v2/{REPO}/referrers/sha256:{'0' * 64}", "MANIFEST_UNKNOWN"),
])
async def test_404_per_kind(registry: Registry, upstream_for: UpstreamFor, kind: str,
                            path: str, code: str) -> None:
    served = await registry()
    served.fake.respond("GET", path, 404)
    error = await failure(await upstream_for(make_route(served.url)), path, kind=kind)
    assert (error.code, error.status, error.retryable, error.upstream_status) == (
        code, 404, False, 404)
    assert served.fake.count("GET", path) == 1


async def test_429_keeps_retry_after(registry: Registry, upstream_for: UpstreamFor) -> None:
    served = await registry()
    path = f"/v2/{REPO}/manifests/v1"
    served.fake.always("GET", path, rate_limited(retry_after="17"))
    error = await failure(await upstream_for(make_route(served.url)), path)
    assert (error.code, error.status, error.retryable) == ("TOOMANYREQUESTS", 429, True)
    assert error.headers == {"Retry-After": "17"}
    assert "17" in error.message
    assert served.fake.count("GET", path) == 1  # a 429 is handed on, not retried


async def test_429_without_retry_after_still_says_when_to_retry(
        registry: Registry, upstream_for: UpstreamFor) -> None:
    served = await registry()
    path = f"/v2/{REPO}/manifests/v1"
    served.fake.always("GET", path, rate_limited())
    error = await failure(await upstream_for(make_route(served.url)), path)
    assert (error.code, error.status, error.retryable) == ("TOOMANYREQUESTS", 429, True)
    assert error.headers["Retry-After"].isdigit()


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_502_unavailable(registry: Registry, upstream_for: UpstreamFor,
                                      status: int) -> None:
    served = await registry()
    path = f"/v2/{REPO}/manifests/v1"
    served.fake.always("GET", path, unavailable(status))
    error = await failure(await upstream_for(make_route(served.url)), path)
    assert (error.code, error.status, error.retryable, error.upstream_status) == (
        "UNAVAILABLE", 502, True, status)


@pytest.mark.parametrize(("status", "code", "client_status", "retryable"), [
    (403, "DENIED", 403, False),
    (400, "UNAVAILABLE", 502, False),
    (416, "RANGE_INVALID", 416, False),
    (304, "UNAVAILABLE", 502, False),
])
async def test_other_statuses(registry: Registry, upstream_for: UpstreamFor, status: int,
                              code: str, client_status: int, retryable: bool) -> None:
    served = await registry()
    path = f"/v2/{REPO}/manifests/v1"
    served.fake.respond("GET", path, status)
    error = await failure(await upstream_for(make_route(served.url)), path)
    assert (error.code, error.status, error.retryable) == (code, client_status, retryable)


async def test_connection_refused_is_502(upstream_for: UpstreamFor) -> None:
    route = make_route(f"http://127.0.0.1:{free_port()}", credentials=Credentials(USER, SECRET))
    metrics = Metrics()
    error = await failure(await upstream_for(route, metrics=metrics), f"/v2/{REPO}/manifests/v1")
    assert (error.code, error.status, error.retryable) == ("UNAVAILABLE", 502, True)
    assert "fake.test" in error.message
    assert_no_secret(error, SECRET)
    # Every attempt is counted: the first and each retry (retries: attempts 3 by default).
    retries = metrics.registry.get_sample_value(
        "gateway_upstream_retries_total", {"route": "fake.test", "reason": "down"})
    assert retries == 2
    assert metrics.registry.get_sample_value(
        "gateway_upstream_errors_total", {"route": "fake.test", "reason": "connect"}) == 1 + retries


async def test_read_timeout_is_504(registry: Registry, upstream_for: UpstreamFor) -> None:
    served = await registry()
    path = f"/v2/{REPO}/manifests/v1"
    served.fake.add_manifest(REPO, image_manifest(b"late"), tag="v1")
    served.fake.always("GET", path, Fault(delay=5))  # far past the read timeout
    upstream = await upstream_for(make_route(served.url), read_timeout=0.2)
    error = await failure(upstream, path)
    assert (error.code, error.status, error.retryable) == ("UNAVAILABLE", 504, True)


@pytest.mark.parametrize("status", [401, 403, 404, 429, 500])
async def test_credentials_never_appear_in_errors(registry: Registry,
                                                  upstream_for: UpstreamFor,
                                                  status: int) -> None:
    served = await registry(auth="basic", username=USER, password=SECRET)
    path = f"/v2/{REPO}/manifests/v1"
    served.fake.respond("GET", path, status, body=SECRET.encode(),
                        headers={"WWW-Authenticate": 'Basic realm="x"'})
    upstream = await upstream_for(make_route(served.url, credentials=Credentials(USER, SECRET)))
    error = await failure(upstream, path)
    assert_no_secret(error, SECRET, basic_header(USER, SECRET))


async def test_metrics_count_upstream_requests_by_status(registry: Registry,
                                                         upstream_for: UpstreamFor) -> None:
    served = await registry()
    served.fake.add_manifest(REPO, image_manifest(b"a"), tag="v1")
    metrics = Metrics()
    upstream = await upstream_for(make_route(served.url), metrics=metrics)
    await fetch(upstream, f"/v2/{REPO}/manifests/v1")
    await failure(upstream, f"/v2/{REPO}/manifests/nope")
    value = metrics.registry.get_sample_value
    assert value("gateway_upstream_requests_total",
                 {"route": "fake.test", "kind": "manifest", "status": "200"}) == 1
    assert value("gateway_upstream_requests_total",
                 {"route": "fake.test", "kind": "manifest", "status": "404"}) == 1


# --------------------------------------------------------- manifest_accept


@pytest.mark.parametrize("client", [None, "", "*/*", "application/json", "text/html, */*"])
def test_manifest_accept_without_manifest_types_asks_for_all(client: str | None) -> None:
    accept = manifest_accept(client)
    assert [t.strip() for t in accept.split(",")] == list(MANIFEST_TYPES)


@pytest.mark.parametrize("client", [
    DOCKER_MANIFEST,
    f"{OCI_INDEX}, {DOCKER_MANIFEST};q=0.5",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
])
def test_manifest_accept_keeps_the_clients_manifest_types(client: str) -> None:
    assert manifest_accept(client) == client
