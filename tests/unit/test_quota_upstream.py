"""The credential pool and the outbound proxies through `Upstream`, against the fake
registry's accounts (per-account Basic/Bearer, Docker Hub-like pull counting) and
in-process forward proxies (plain and TLS): which account each request went out as."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import encode_basic_auth
from yarl import URL

from gateway.config import Credentials, ProxySettings
from gateway.metrics import Metrics
from gateway.upstream import Upstream
from tests.support.clock import Clock
from tests.support.fake_registry import image_manifest
from tests.support.faults import rate_limited
from tests.support.net import free_port

from .conftest import Served, make_route
from .test_upstream import ForwardProxy, failure, fetch

SECRET = "Sup3r-s3cret-"
NAMES = ("alice", "bob", "carol")
ACCOUNTS = {name: SECRET + name for name in NAMES}
POOL = tuple(Credentials(name, password) for name, password in ACCOUNTS.items())
REPO = "owner/img"
MANIFEST = f"/v2/{REPO}/manifests/v1"

Registry = Callable[..., Awaitable[Served]]
UpstreamFor = Callable[..., Awaitable[Upstream]]


def accounts_of(served: Served, method: str = "GET", path: str = MANIFEST) -> list[str | None]:
    return [s.account for s in served.fake.seen(method, path) if s.status != 401]


@pytest.fixture
async def hub(registry: Registry) -> Served:
    served = await registry(auth="bearer", accounts=ACCOUNTS,
                            pull_limits=dict.fromkeys(NAMES, 100))
    served.fake.add_manifest(REPO, image_manifest(b"layer"), tag="v1")
    return served


async def test_pulls_are_spread_over_the_accounts_with_a_token_each(
        hub: Served, upstream_for: UpstreamFor) -> None:
    upstream = await upstream_for(make_route(hub.url, accounts=POOL))
    for _ in range(6):
        assert (await fetch(upstream, MANIFEST))[0] == 200
    assert accounts_of(hub) == ["alice", "bob", "carol", "alice", "bob", "carol"]
    # One token per account, asked as that account; each reused afterwards.
    assert sorted(hub.fake.token_accounts.values()) == sorted(NAMES)
    assert len(hub.fake.token_requests) == 3


async def test_a_spent_account_is_skipped_and_the_pull_goes_on(
        hub: Served, upstream_for: UpstreamFor) -> None:
    hub.fake.pulls["alice"] = 100  # alice is out: the fake answers 429 with headers
    metrics = Metrics()
    upstream = await upstream_for(make_route(hub.url, accounts=POOL), metrics=metrics)
    for _ in range(4):
        assert (await fetch(upstream, MANIFEST))[0] == 200
    seen = [(s.account, s.status) for s in hub.fake.seen("GET", MANIFEST) if s.status != 401]
    assert seen == [("alice", 429), ("bob", 200), ("carol", 200), ("bob", 200),
                    ("carol", 200)]
    value = metrics.registry.get_sample_value
    assert value("gateway_upstream_ratelimit_remaining",
                 {"route": "fake.test", "account": "alice"}) == 0
    assert value("gateway_upstream_ratelimit_remaining",
                 {"route": "fake.test", "account": "bob"}) == 98
    assert value("gateway_upstream_rate_limited_total", {
        "route": "fake.test", "account": "alice", "kind": "pull_limit"}) == 1


async def test_all_accounts_out_is_a_429_with_retry_after(
        hub: Served, upstream_for: UpstreamFor) -> None:
    for name in NAMES:
        hub.fake.pulls[name] = 100
    upstream = await upstream_for(make_route(hub.url, accounts=POOL))
    error = await failure(upstream, MANIFEST)
    assert (error.code, error.status) == ("TOOMANYREQUESTS", 429)
    assert error.headers == {"Retry-After": "21600"}  # the window: no Retry-After was sent
    assert accounts_of(hub) == ["alice", "bob", "carol"]
    # Asked again: nothing reaches the upstream until a window resets.
    await failure(upstream, MANIFEST)
    assert len(accounts_of(hub)) == 3
    # HEADs (free on Docker Hub) still go out.
    resp = await upstream.request("HEAD", MANIFEST, kind="manifest", repository=REPO)
    resp.release()
    assert resp.status == 200


async def test_abuse_429_backs_off_without_burning_the_other_accounts(
        hub: Served, upstream_for: UpstreamFor, caplog: pytest.LogCaptureFixture) -> None:
    hub.fake.queue_for("alice", "GET", MANIFEST, rate_limited(retry_after="30"))
    clock = Clock()
    metrics = Metrics()
    upstream = await upstream_for(make_route(hub.url, accounts=POOL), metrics=metrics,
                                  clock=clock)
    caplog.set_level(logging.WARNING, "gateway.upstream")
    error = await failure(upstream, MANIFEST)
    assert (error.status, error.headers) == (429, {"Retry-After": "30"})
    blob = await failure(upstream, f"/v2/{REPO}/blobs/sha256:{'0' * 64}", kind="blob")
    assert blob.status == 429
    assert accounts_of(hub) == ["alice"]  # bob and carol were not tried
    assert "abuse" in caplog.text
    clock.advance(30)
    assert (await fetch(upstream, MANIFEST))[0] == 200
    assert metrics.registry.get_sample_value("gateway_upstream_rate_limited_total", {
        "route": "fake.test", "account": "alice", "kind": "abuse"}) == 1


async def test_blobs_go_as_the_account_that_pulled_the_manifest(
        registry: Registry, upstream_for: UpstreamFor) -> None:
    served = await registry(auth="bearer", accounts=ACCOUNTS)
    served.fake.add_manifest(REPO, image_manifest(b"a"), tag="v1")
    served.fake.add_manifest("other/img", image_manifest(b"b"), tag="v1")
    digest = served.fake.add_blob(b"layer")
    upstream = await upstream_for(make_route(served.url, accounts=POOL))
    await fetch(upstream, MANIFEST)
    await fetch(upstream, "/v2/other/img/manifests/v1", repository="other/img")  # bob
    await fetch(upstream, f"/v2/{REPO}/blobs/{digest}", kind="blob")
    assert accounts_of(served, path=f"/v2/{REPO}/blobs/{digest}") == ["alice"]
    assert len(served.fake.token_requests) == 2  # the blob reused alice's token


async def test_basic_auth_pool(registry: Registry, upstream_for: UpstreamFor) -> None:
    served = await registry(auth="basic", accounts=ACCOUNTS,
                            pull_limits={"alice": 0, "bob": 5, "carol": 5})
    served.fake.add_manifest(REPO, image_manifest(b"a"), tag="v1")
    upstream = await upstream_for(make_route(served.url, accounts=POOL))
    for _ in range(2):
        await fetch(upstream, MANIFEST)
    assert accounts_of(served) == ["alice", "bob", "carol"]


async def test_the_pool_never_shows_a_password(
        hub: Served, upstream_for: UpstreamFor, caplog: pytest.LogCaptureFixture) -> None:
    for name in NAMES:
        hub.fake.pulls[name] = 100
    metrics = Metrics()
    upstream = await upstream_for(make_route(hub.url, accounts=POOL), metrics=metrics)
    caplog.set_level(logging.DEBUG)
    error = await failure(upstream, MANIFEST)
    shown = [caplog.text, metrics.render().decode(), str(error), error.body().decode(),
             repr(error.headers)]
    for text in shown:
        assert SECRET not in text
    assert 'account="carol"' in metrics.render().decode()


# ------------------------------------------------------------------ proxies


async def test_http_proxy_with_a_login(registry: Registry, upstream_for: UpstreamFor,
                                       aiohttp_server: Any) -> None:
    served = await registry(auth="bearer")
    body = image_manifest(b"via proxy")
    served.fake.add_manifest(REPO, body, tag="v1")
    proxy = ForwardProxy(served.url)
    proxy_server = await aiohttp_server(proxy.app)
    login = Credentials("gw", SECRET)
    route = make_route("http://127.0.0.1:9", proxy=ProxySettings(
        URL(str(proxy_server.make_url("")).rstrip("/")), None, login))
    upstream = await upstream_for(route)
    assert await fetch(upstream, MANIFEST) == (200, body)
    assert len(proxy.hosts) == 3  # 401, token, retry: all through the proxy
    # Each plain-http request carried the login (this test proxy passes it on, so the
    # fake sees it): the token request too.
    login_header = encode_basic_auth("gw", SECRET)
    for seen in [*served.fake.requests, *served.fake.token_requests]:
        assert seen.headers.get("Proxy-Authorization") == login_header


async def test_https_proxy(registry: Registry, upstream_for: UpstreamFor,
                           aiohttp_server: Any, tmp_path: Path) -> None:
    """TLS to the proxy itself (aiohttp ≥ 3.8 on Python ≥ 3.11), trusted by ca_file."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    served = await registry()
    body = image_manifest(b"via tls proxy")
    served.fake.add_manifest(REPO, body, tag="v1")
    proxy = ForwardProxy(served.url)
    proxy_server = await aiohttp_server(proxy.app, ssl=context)
    proxy_url = URL(str(proxy_server.make_url("")).rstrip("/"))
    assert proxy_url.scheme == "https"
    route = make_route("http://127.0.0.1:9", ca_file=str(ca_file),
                       proxy=ProxySettings(proxy_url))
    assert await fetch(await upstream_for(route), MANIFEST) == (200, body)
    assert proxy.hosts == ["127.0.0.1:9"]


async def test_an_unreachable_socks_proxy_is_a_502_without_its_login(
        upstream_for: UpstreamFor) -> None:
    proxy = ProxySettings(URL(f"socks5h://127.0.0.1:{free_port()}"), None,
                          Credentials("gw", SECRET))
    error = await failure(await upstream_for(make_route("http://registry.test", proxy=proxy)),
                          MANIFEST)
    assert (error.code, error.status) == ("UNAVAILABLE", 502)
    assert SECRET not in f"{error} {error.message}"
