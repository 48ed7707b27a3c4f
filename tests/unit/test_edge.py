"""The edge of the pipeline (gateway/pipeline/edge.py), in process: X-Forwarded-* believed
only from trusted proxies, and the redirect of plain HTTP to HTTPS."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.net import NetworkSet
from gateway.pipeline.edge import forwarded_middleware, redirect_middleware
from gateway.server import create_app
from tests.support.served import GatewayTestServer


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"host": request.host, "scheme": request.scheme,
                              "remote": request.remote})


async def echo_client(aiohttp_client: Any, middlewares: list[Any]) -> TestClient[Any, Any]:
    app = web.Application(middlewares=middlewares)
    app.router.add_get("/{tail:.*}", _echo)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    return client


FORWARDED = {"X-Forwarded-Host": "ghcr.gw.test", "X-Forwarded-Proto": "https",
             "X-Forwarded-For": "203.0.113.9, 10.0.0.7"}


async def test_forwarded_headers_from_a_trusted_proxy_are_used(aiohttp_client: Any) -> None:
    trusted = (ip_network("127.0.0.0/8"), ip_network("10.0.0.0/8"))
    client = await echo_client(aiohttp_client, [forwarded_middleware(trusted)])
    response = await client.get("/", headers={"Host": "internal:5000", **FORWARDED})
    # 10.0.0.7 is a trusted hop too, so the client is the address left of it.
    assert await response.json() == {"host": "ghcr.gw.test", "scheme": "https",
                                     "remote": "203.0.113.9"}


async def test_forwarded_headers_from_anyone_else_are_ignored(aiohttp_client: Any) -> None:
    client = await echo_client(aiohttp_client, [forwarded_middleware((ip_network("10.0.0.0/8"),))])
    response = await client.get("/", headers={"Host": "hub.gw.test", **FORWARDED})
    assert await response.json() == {"host": "hub.gw.test", "scheme": "http",
                                     "remote": "127.0.0.1"}


async def test_a_client_cannot_spoof_its_address_through_a_trusted_proxy(
        aiohttp_client: Any) -> None:
    client = await echo_client(aiohttp_client, [forwarded_middleware((ip_network("127.0.0.1"),))])
    # The client sent "X-Forwarded-For: 127.0.0.1"; the proxy appended the real address.
    response = await client.get("/", headers={
        "X-Forwarded-For": "127.0.0.1, 198.51.100.4",
        "X-Forwarded-Host": "evil.test, not a host"})
    body = await response.json()
    assert body["remote"] == "198.51.100.4"
    assert body["host"].startswith("127.0.0.1")  # an invalid forwarded host is not used


async def test_plain_http_is_redirected_but_health_checks_are_not(aiohttp_client: Any) -> None:
    client = await echo_client(aiohttp_client, [
        forwarded_middleware((ip_network("127.0.0.1"),)), redirect_middleware(8443)])
    response = await client.get("/v2/library/alpine/manifests/3?ns=docker.io",
                                headers={"Host": "hub.gw.test:8080"}, allow_redirects=False)
    assert response.status == 308
    assert response.headers["Location"] == \
        "https://hub.gw.test:8443/v2/library/alpine/manifests/3?ns=docker.io"
    health = await client.get("/healthz", allow_redirects=False)
    assert health.status == 200
    # A TLS-terminating proxy in front says the client used https: serve, don't loop.
    proxied = await client.get("/v2/", headers={"X-Forwarded-Proto": "https"},
                               allow_redirects=False)
    assert proxied.status == 200


async def test_repeated_headers_are_one_list_and_the_nearest_proxy_counts(
        aiohttp_client: Any) -> None:
    client = await echo_client(aiohttp_client, [forwarded_middleware(
        NetworkSet(["127.0.0.1", "10.0.0.0/8"]))])
    headers = CIMultiDict([
        ("X-Forwarded-For", "198.51.100.1, 203.0.113.9"), ("X-Forwarded-For", "10.0.0.7"),
        ("X-Forwarded-Host", "evil.test"), ("X-Forwarded-Host", "ghcr.gw.test"),
        ("X-Forwarded-Proto", "HTTPS")])
    response = await client.get("/", headers=headers)
    assert await response.json() == {"host": "ghcr.gw.test", "scheme": "https",
                                     "remote": "203.0.113.9"}
    # Only proxies past us: the peer stays the client; an unknown scheme is not used.
    response = await client.get("/", headers={"X-Forwarded-For": "10.0.0.7",
                                              "X-Forwarded-Proto": "gopher"})
    body = await response.json()
    assert (body["remote"], body["scheme"]) == ("127.0.0.1", "http")


async def test_redirect_keeps_ipv6_brackets_and_drops_port_443(aiohttp_client: Any) -> None:
    client = await echo_client(aiohttp_client, [redirect_middleware(8443)])
    response = await client.get("/v2/", headers={"Host": "[::1]:8080"}, allow_redirects=False)
    assert response.headers["Location"] == "https://[::1]:8443/v2/"
    client = await echo_client(aiohttp_client, [redirect_middleware(443)])
    response = await client.get("/v2/x?y=1", headers={"Host": "hub.gw.test"},
                                allow_redirects=False)
    assert (response.status, response.headers["Location"]) == (308, "https://hub.gw.test/v2/x?y=1")


async def test_redirect_refuses_a_host_it_cannot_name(aiohttp_client: Any, tmp_path: Path) -> None:
    config = load_config("routes: {docker.io: {upstream: 'http://127.0.0.1:9'}}\n")
    app = create_app(config, tmp_path / "data", https_port=8443)
    client = await aiohttp_client(GatewayTestServer(app))
    response = await client.get("/v2/", headers={"Host": "hub.gw.test/evil"},
                                allow_redirects=False)
    assert response.status == 400
    assert (await response.json())["errors"][0]["code"] == "UNSUPPORTED"


async def test_gateway_routes_by_the_forwarded_host(aiohttp_client: Any, tmp_path: Path) -> None:
    config = load_config("""
base_domains: [gw.test]
trusted_proxies: [127.0.0.1]
routes:
  docker.io: {upstream: "http://127.0.0.1:9"}
  ghcr.io: {upstream: "http://127.0.0.1:9"}
""")
    client = await aiohttp_client(GatewayTestServer(create_app(config, tmp_path / "data")))
    response = await client.get("/v2/owner/image/manifests/v1",
                                headers={"Host": "hub.gw.test", "X-Forwarded-Host": "ghcr.gw.test"})
    assert response.headers["X-Registry-Route"] == "ghcr.io"
    routes = await (await client.get("/_gateway/routes")).json()
    assert [r["name"] for r in routes["routes"]] == ["docker.io", "ghcr.io"]
    assert "127.0.0.1:9" not in str(routes)  # upstreams are not published


def test_trusted_proxies_config_errors_name_the_line() -> None:
    with pytest.raises(ConfigError, match=r"<config>:2: trusted_proxies\[1\]: 'nope'"):
        load_config("routes: {docker.io: {upstream: 'http://127.0.0.1:9'}}\n"
                    "trusted_proxies: [10.0.0.0/8, nope]\n")
    config = load_config("routes: {docker.io: {upstream: 'http://127.0.0.1:9'}}\n"
                         "trusted_proxies: 192.168.1.10\n")
    assert [str(n) for n in config.trusted_proxies] == ["192.168.1.10/32"]
