"""The forward proxy (`serve --proxy-listen`) against real upstream registries: a client
with the gateway as its HTTPS proxy and the gateway's CA reaches registry-1.docker.io and
ghcr.io by their real names, and the gateway answers them from its cache (routes point
those names at local docker-registry upstreams; nothing leaves loopback).

Also what the proxy refuses (hosts no route names, IP literals, other ports, other
methods) with a listener that counts accepts to prove no connection was made, logins by
Proxy-Authorization, and tunnel mode without a CA (bytes through, nothing cached).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import trustme

from gateway.proxy import write_ca
from tests.support.gateway import Gateway
from tests.support.images import Image, make_image
from tests.support.net import free_port
from tests.support.tls_front import AcceptCounter, TlsFront
from tests.support.upstreams import Upstream, unique_repository
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

HUB, GHCR = "registry-1.docker.io", "ghcr.io"


class Proxied:
    """A gateway with a forward-proxy listener, and the CA its clients trust."""

    def __init__(self, gateway: Gateway, proxy_port: int, ca: Path | None) -> None:
        self.gateway = gateway
        self.proxy_port = proxy_port
        self.ca = ca

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def context(self, cafile: Path | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(cafile or self.ca))


def proxy_routes(hub: Upstream, ghcr: Upstream, **forward_proxy: Any) -> dict[str, Any]:
    routes: dict[str, Any] = {"routes": {"docker.io": {"upstream": hub.url},
                                         "ghcr.io": {"upstream": ghcr.url}}}
    if forward_proxy:
        routes["forward_proxy"] = forward_proxy
    return routes


@pytest.fixture
def upstreams(start_upstream: Callable[..., Upstream]) -> tuple[Upstream, Upstream]:
    return start_upstream("docker.io"), start_upstream("ghcr.io")


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "proxy-ca"
    write_ca(directory, ["docker.io", HUB, "index.docker.io", GHCR])
    return directory


def start_proxied(start_gateway: Callable[..., Gateway], routes: dict[str, Any],
                  ca: Path | None, *, workers: int = 1, **kwargs: Any) -> Proxied:
    port = free_port()
    gateway = start_gateway(routes, extra_args=("--proxy-listen", f"127.0.0.1:{port}",
                                                "--workers", str(workers)), **kwargs)
    wait_for(lambda: _accepts(port), what="proxy listener", process=gateway.process)
    return Proxied(gateway, port, ca)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def proxied(start_gateway: Callable[..., Gateway], upstreams: tuple[Upstream, Upstream],
            ca_dir: Path) -> Proxied:
    return start_proxied(start_gateway, proxy_routes(*upstreams, ca=str(ca_dir)),
                         ca_dir / "ca.crt")


async def fetch(session: aiohttp.ClientSession, proxied: Proxied, url: str,
                context: ssl.SSLContext | None = None,
                **kwargs: Any) -> tuple[int, bytes, dict[str, str]]:
    async with session.get(url, proxy=proxied.url, ssl=context or proxied.context(),
                           **kwargs) as response:
        return response.status, await response.read(), dict(response.headers)


def connect(port: int, target: str, *, extra: str = "") -> bytes:
    """Send one CONNECT (or any request line) and return the proxy's answer head."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{target}\r\nHost: x\r\n{extra}\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json, " \
    "application/vnd.docker.distribution.manifest.v2+json"


async def pull(session: aiohttp.ClientSession, proxied: Proxied, host: str, repository: str,
               image: Image) -> list[str]:
    """Manifest and blobs by the registry's real name; returns the X-Cache values."""
    status, body, headers = await fetch(
        session, proxied, f"https://{host}/v2/{repository}/manifests/latest",
        headers={"Accept": MANIFEST_TYPES})
    assert status == 200, body[:300]
    assert body == image.manifest.data
    caches = [headers.get("X-Cache", "")]
    for blob in image.blobs:
        status, data, headers = await fetch(
            session, proxied, f"https://{host}/v2/{repository}/blobs/{blob.digest}")
        assert status == 200 and data == blob.data
        caches.append(headers.get("X-Cache", ""))
    return caches


async def test_intercepted_pulls_by_real_names_are_cached(
        proxied: Proxied, upstreams: tuple[Upstream, Upstream],
        http: aiohttp.ClientSession) -> None:
    hub, ghcr = upstreams
    hub_repository = unique_repository("library")
    hub_image = hub.push(hub_repository, make_image())
    ghcr_repository = unique_repository("owner")
    ghcr_image = ghcr.push(ghcr_repository, make_image(oci=True))

    first = await pull(http, proxied, HUB, hub_repository, hub_image)
    await pull(http, proxied, GHCR, ghcr_repository, ghcr_image)
    second = await pull(http, proxied, HUB, hub_repository, hub_image)

    assert all(c == "MISS" for c in first[1:]), first
    assert all(c == "HIT" for c in second[1:]), second
    for upstream, repository, image in ((hub, hub_repository, hub_image),
                                        (ghcr, ghcr_repository, ghcr_image)):
        for blob in image.blobs:
            assert upstream.proxy.blob_fetches(repository, digest=blob.digest) == 1
    # Docker Hub's library/ rule applies to the short name as it does for a mirror.
    name = hub_repository.split("/", 1)[1]
    status, body, _ = await fetch(http, proxied, f"https://{HUB}/v2/{name}/manifests/latest",
                                  headers={"Accept": MANIFEST_TYPES})
    assert status == 200 and body == hub_image.manifest.data
    async with http.get(proxied.gateway.url() + "/metrics") as response:
        metrics = await response.text()
    assert 'gateway_proxy_connects_total{outcome="intercepted"}' in metrics
    assert "gateway_proxy_leaf_certificates_total 2.0" in metrics


async def test_sixteen_concurrent_proxied_pulls_cost_one_upstream_download(
        proxied: Proxied, upstreams: tuple[Upstream, Upstream]) -> None:
    hub, _ = upstreams
    repository = unique_repository("library")
    image = hub.push(repository, make_image(layer_sizes=(4 << 20,)))
    layer = image.layers[0]
    hub.proxy.throttle_bytes_per_second = 8 << 20  # long enough for all 16 to overlap

    async def one() -> bytes:
        # A session each: 16 CONNECTs, 16 TLS connections, like 16 nodes.
        async with aiohttp.ClientSession(trust_env=False) as session:
            status, data, _ = await fetch(
                session, proxied, f"https://{HUB}/v2/{repository}/blobs/{layer.digest}")
            assert status == 200
            return data

    bodies = await asyncio.gather(*(one() for _ in range(16)))

    assert all(body == layer.data for body in bodies)
    assert hub.proxy.blob_fetches(repository, digest=layer.digest) == 1
    assert hub.proxy.blob_bytes(repository, digest=layer.digest) == layer.size  # once each


async def test_with_workers_every_worker_proxies_and_one_download_is_made(
        start_gateway: Callable[..., Gateway], upstreams: tuple[Upstream, Upstream],
        ca_dir: Path) -> None:
    """`--workers 2 --proxy-listen`: the supervisor binds the proxy's sockets for both
    workers, CONNECTs land on both, and single flight holds across them."""
    hub, ghcr = upstreams
    proxied = start_proxied(start_gateway, proxy_routes(hub, ghcr, ca=str(ca_dir)),
                            ca_dir / "ca.crt", workers=2)
    repository = unique_repository("library")
    image = hub.push(repository, make_image(layer_sizes=(4 << 20,)))
    layer = image.layers[0]
    hub.proxy.throttle_bytes_per_second = 8 << 20

    async def one() -> tuple[bytes, str]:
        async with aiohttp.ClientSession(trust_env=False) as session:
            status, data, headers = await fetch(
                session, proxied, f"https://{HUB}/v2/{repository}/blobs/{layer.digest}")
            assert status == 200
            return data, headers.get("X-Gateway-Worker", "")

    answers = await asyncio.gather(*(one() for _ in range(16)))

    assert all(data == layer.data for data, _ in answers)
    assert len({worker for _, worker in answers} - {""}) == 2, "both workers answered"
    assert hub.proxy.blob_fetches(repository, digest=layer.digest) == 1
    assert hub.proxy.blob_bytes(repository, digest=layer.digest) == layer.size  # once each


@pytest.fixture
def counter() -> Iterator[AcceptCounter]:
    listener = AcceptCounter()
    yield listener
    listener.stop()


def test_refused_destinations_make_no_connection(
        start_gateway: Callable[..., Gateway], upstreams: tuple[Upstream, Upstream],
        ca_dir: Path, counter: AcceptCounter) -> None:
    where = f"127.0.0.1:{counter.port}"
    # Were the proxy to connect for any of these, it would land on the counter.
    routes = proxy_routes(*upstreams, ca=str(ca_dir), connect_to={
        "evil.example": where, HUB: where, "auth.docker.io": where})
    running = start_proxied(start_gateway, routes, ca_dir / "ca.crt")

    for target in ("CONNECT evil.example:443 HTTP/1.1", f"CONNECT {where} HTTP/1.1",
                   "CONNECT [::1]:443 HTTP/1.1", "CONNECT 127.0.0.1:443 HTTP/1.1",
                   f"CONNECT {HUB}:8443 HTTP/1.1", "CONNECT auth.docker.io:80 HTTP/1.1"):
        answer = connect(running.proxy_port, target)
        assert answer.startswith(b"HTTP/1.1 403 "), (target, answer)
    plain = connect(running.proxy_port, f"GET http://{HUB}/v2/ HTTP/1.1")
    assert plain.startswith(b"HTTP/1.1 405 "), plain
    assert counter.accepted == 0
    wanted = ("refused 403 (proxy_host)", "refused 403 (proxy_address)",
              "refused 403 (proxy_port)", "refused 405 (proxy_method)")
    wait_for(lambda: all(w in running.gateway.log() for w in wanted), what="refusals logged")


def test_ip_literals_and_other_ports_when_configured(
        start_gateway: Callable[..., Gateway], upstreams: tuple[Upstream, Upstream],
        counter: AcceptCounter) -> None:
    routes = proxy_routes(*upstreams, addresses=["127.0.0.1/32"], ports=[443, counter.port])
    running = start_proxied(start_gateway, routes, None)

    answer = connect(running.proxy_port, f"CONNECT 127.0.0.1:{counter.port} HTTP/1.1")

    assert answer.startswith(b"HTTP/1.1 200 "), answer
    wait_for(lambda: counter.accepted == 1, what="the tunnelled connection")
    assert connect(running.proxy_port, "CONNECT 127.0.0.2:443 HTTP/1.1").startswith(
        b"HTTP/1.1 403 ")


@pytest.fixture
def registry_tls(tmp_path: Path) -> trustme.CA:
    return trustme.CA(organization_name="tunnel test CA")


async def test_without_a_ca_allowed_hosts_are_tunnelled_and_not_cached(
        start_gateway: Callable[..., Gateway], upstreams: tuple[Upstream, Upstream],
        registry_tls: trustme.CA, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    hub, ghcr = upstreams
    # What the real registry-1.docker.io looks like: TLS with its own certificate.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    registry_tls.issue_cert(HUB).configure_cert(context)
    front = TlsFront(context, ("127.0.0.1", hub.registry.port))
    try:
        routes = proxy_routes(hub, ghcr, connect_to={HUB: f"127.0.0.1:{front.port}"})
        ca_file = tmp_path / "registry-ca.pem"
        registry_tls.cert_pem.write_to_path(str(ca_file))
        running = start_proxied(start_gateway, routes, ca_file)
        repository = unique_repository("library")
        image = hub.push(repository, make_image())

        caches = await pull(http, running, HUB, repository, image)

        assert caches == [""] * len(caches)  # the registry answered, not the gateway
        assert front.accepted >= 1
        assert not hub.proxy.blob_requests(repository)  # the gateway fetched nothing
        wanted = ("NOTHING IS CACHED",
                  f"proxy CONNECT {HUB}:443 from 127.0.0.1: tunnelled byte for byte, NOT CACHED")
        wait_for(lambda: all(w in running.gateway.log() for w in wanted),
                 what="the log saying it was not cached")
        async with http.get(running.gateway.url() + "/metrics") as response:
            metrics = await response.text()
        assert 'gateway_proxy_connects_total{outcome="tunnelled"}' in metrics
        assert 'gateway_proxy_tunnelled_bytes_total{direction="down"}' in metrics
    finally:
        front.stop()


async def test_proxy_logins_use_the_gateways_htpasswd(
        start_gateway: Callable[..., Gateway], upstreams: tuple[Upstream, Upstream],
        ca_dir: Path, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    hub, _ = upstreams
    users = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=5)).decode()
    users.write_text(f"puller:{hashed}\n")
    routes = {**proxy_routes(*upstreams, ca=str(ca_dir)),
              "access": {"users": str(users), "anonymous": "none"}}
    running = start_proxied(start_gateway, routes, ca_dir / "ca.crt")
    repository = unique_repository("library")
    image = hub.push(repository, make_image())

    for login in ("", f"Proxy-Authorization: Basic {_basic('puller', 'wrong')}\r\n"):
        answer = connect(running.proxy_port, f"CONNECT {HUB}:443 HTTP/1.1", extra=login)
        assert answer.startswith(b"HTTP/1.1 407 "), answer
        assert b"Proxy-Authenticate: Basic" in answer
    with pytest.raises(aiohttp.ClientHttpProxyError):
        await fetch(http, running, f"https://{HUB}/v2/")

    login = {"Proxy-Authorization": f"Basic {_basic('puller', 's3cret')}"}
    status, body, _ = await fetch(http, running, f"https://{HUB}/v2/{repository}/manifests/"
                                  "latest", headers={"Accept": MANIFEST_TYPES},
                                  proxy_headers=login)
    assert status == 200 and body == image.manifest.data
    wait_for(lambda: "user=puller" in running.gateway.log(), what="the login logged")
    assert "s3cret" not in running.gateway.log()


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_ca_certificate_is_served(proxied: Proxied, http: aiohttp.ClientSession,
                                        ca_dir: Path) -> None:
    async with http.get(proxied.gateway.url() + "/_gateway/ca.crt") as response:
        assert response.status == 200
        assert await response.read() == (ca_dir / "ca.crt").read_bytes()


async def test_side_hosts_are_tunnelled_and_never_get_a_leaf(
        start_gateway: Callable[..., Gateway], upstreams: tuple[Upstream, Upstream],
        ca_dir: Path, counter: AcceptCounter, http: aiohttp.ClientSession) -> None:
    # auth.docker.io is allowed (the docker.io preset lists it) but is no route's registry:
    # even with a CA it is tunnelled to where it really is, and no certificate is minted.
    routes = proxy_routes(*upstreams, ca=str(ca_dir),
                          connect_to={"auth.docker.io": f"127.0.0.1:{counter.port}"})
    running = start_proxied(start_gateway, routes, ca_dir / "ca.crt")

    answer = connect(running.proxy_port, "CONNECT auth.docker.io:443 HTTP/1.1")

    assert answer.startswith(b"HTTP/1.1 200 "), answer
    wait_for(lambda: counter.accepted == 1, what="the tunnel to auth.docker.io")
    async with http.get(running.gateway.url() + "/metrics") as response:
        metrics = await response.text()
    assert "gateway_proxy_leaf_certificates_total 0.0" in metrics
    wait_for(lambda: "auth.docker.io:443 from 127.0.0.1: tunnelled byte for byte, NOT CACHED "
             "(not a registry route)" in running.gateway.log(), what="the tunnel logged")


def test_denied_addresses_are_refused_before_anything_else(
        start_gateway: Callable[..., Gateway], upstreams: tuple[Upstream, Upstream],
        ca_dir: Path) -> None:
    routes = {**proxy_routes(*upstreams, ca=str(ca_dir)), "access": {"deny": ["127.0.0.2/32"]}}
    running = start_proxied(start_gateway, routes, ca_dir / "ca.crt")

    with socket.create_connection(("127.0.0.1", running.proxy_port), timeout=10,
                                  source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(f"CONNECT {HUB}:443 HTTP/1.1\r\nHost: {HUB}:443\r\n\r\n".encode())
        answer = sock.recv(4096)

    assert answer.startswith(b"HTTP/1.1 403 "), answer
    assert connect(running.proxy_port, f"CONNECT {HUB}:443 HTTP/1.1").startswith(
        b"HTTP/1.1 200 ")
