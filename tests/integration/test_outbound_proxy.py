"""Outbound proxies (issue #11): pulls through a real SOCKS5 server (Debian's microsocks),
with and without a proxy login, and through an HTTP forward proxy with a login, against a
real docker-registry.

The SOCKS server's outgoing connections leave from 127.0.0.3, and the counting proxy in
front of the registry records each request's peer, so every upstream request is seen to
have come through it. In the HTTP case the route's upstream names a closed port: only the
proxy can reach the registry.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.gateway import Gateway
from tests.support.images import make_image
from tests.support.net import free_port
from tests.support.pulls import fetch, pull_image
from tests.support.socks import run_microsocks
from tests.support.upstreams import Upstream, unique_repository

pytestmark = pytest.mark.integration

StartUpstream = Callable[..., Upstream]
StartGateway = Callable[..., Gateway]
PASSWORD_ENV = "GATEWAY_PROXY_PASSWORD"


def hub_routes(upstream_url: str, proxy: Any) -> dict[str, Any]:
    return {"default_route": "docker.io",
            "routes": {"docker.io": {"upstream": upstream_url, "proxy": proxy}}}


@pytest.mark.parametrize("with_login", [False, True], ids=["open", "login"])
async def test_pull_through_a_real_socks5_server(
        start_upstream: StartUpstream, start_gateway: StartGateway, tmp_path: Path,
        http: aiohttp.ClientSession, with_login: bool) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("socks")
    image = upstream.push(repository, make_image(layer_sizes=(300 * 1024, 64 * 1024)))
    login = ("gw-proxy", secrets.token_urlsafe(12)) if with_login else None
    with run_microsocks(tmp_path / "socks", login=login) as socks:
        proxy: Any = socks.url.replace("socks5://", "socks5h://")
        env = {}
        if login is not None:
            proxy = {"url": socks.url, "username": login[0], "password_env": PASSWORD_ENV}
            env[PASSWORD_ENV] = login[1]
        gateway = start_gateway(hub_routes(upstream.url, proxy), env=env)
        await pull_image(http, gateway.url(), repository, "latest", image)

        fetched = {s.path.rsplit("/", 1)[1] for s in upstream.proxy.blob_requests(repository)}
        assert fetched == {blob.digest for blob in image.blobs}
        # Every request reached the upstream from the SOCKS server's own address...
        assert {s.peer for s in upstream.proxy.seen()} == {socks.source}
        # ... on connections it made to the upstream (kept alive: one or more).
        assert set(socks.connections()) == {f"127.0.0.1:{upstream.proxy.port}"}
        if login is not None:
            assert login[1] not in gateway.log()


async def test_a_wrong_socks_login_is_a_502_that_names_no_secret(
        start_upstream: StartUpstream, start_gateway: StartGateway, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("socks")
    upstream.push(repository, make_image(layer_sizes=(1024,)))
    wrong = secrets.token_urlsafe(12)
    with run_microsocks(tmp_path / "socks", login=("gw-proxy", "the-right-one")) as socks:
        gateway = start_gateway(hub_routes(upstream.url, {
            "url": socks.url, "username": "gw-proxy", "password_env": PASSWORD_ENV}),
            env={PASSWORD_ENV: wrong})
        got = await fetch(http, f"{gateway.url()}/v2/{repository}/manifests/latest")
        assert got.status == 502, got.describe()
        assert wrong not in got.body.decode() and wrong not in gateway.log()
        assert upstream.proxy.seen() == []


async def test_pull_through_an_http_proxy_with_a_login(
        start_upstream: StartUpstream, start_gateway: StartGateway,
        http: aiohttp.ClientSession) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("httpproxy")
    image = upstream.push(repository, make_image(layer_sizes=(200 * 1024,)))
    password = secrets.token_urlsafe(12)
    upstream.proxy.proxy_login = ("gw-proxy", password)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing there: only the proxy gets through
    gateway = start_gateway(hub_routes(closed, {
        "url": upstream.proxy.url, "username": "gw-proxy", "password_env": PASSWORD_ENV}),
        env={PASSWORD_ENV: password})
    await pull_image(http, gateway.url(), repository, "latest", image)
    seen = upstream.proxy.requests_for(repository)
    fetched = {s.path.rsplit("/", 1)[1] for s in upstream.proxy.blob_requests(repository)}
    assert fetched == {blob.digest for blob in image.blobs}
    assert all(s.status != 407 and "Proxy-Authorization" in s.headers for s in seen)
    assert password not in gateway.log()
