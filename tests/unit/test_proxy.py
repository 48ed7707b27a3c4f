"""The forward proxy's pure parts: the destination rules (which CONNECT is intercepted,
tunnelled or refused), the CA `ca init` makes (its name constraints checked by a real
TLS client: OpenSSL through Python's ssl), the leaf minter's refusals, the
`forward_proxy:` section of routes.yaml, and a tunnel's copying and idle close."""

from __future__ import annotations

import asyncio
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from gateway.cli import main
from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.proxy import Authority, Destinations, permitted_names, write_ca
from gateway.proxy.authority import Minter, NotPermitted, server_context
from gateway.proxy.tunnel import Pipe, splice

ROUTES = """
routes:
  docker.io: {upstream: "http://127.0.0.1:5001"}
  ghcr.io: {upstream: "http://127.0.0.1:5002"}
  registry.k8s.io: {upstream: "http://127.0.0.1:5003"}
  registry.example.com: {upstream: "https://registry.example.com"}
"""


def destinations(extra: str = "", *, intercepting: bool = True) -> Destinations:
    return Destinations(parse_config(ROUTES + extra), intercepting=intercepting)


def test_registry_hosts_are_intercepted_and_their_side_hosts_tunnelled() -> None:
    rules = destinations()
    for host in ("registry-1.docker.io", "docker.io", "index.docker.io", "ghcr.io",
                 "registry.k8s.io", "registry.example.com", "GHCR.IO."):
        decision = rules.decide(host, 443)
        assert decision.mode == "intercept", host
    assert rules.decide("registry-1.docker.io", 443).route.name == "docker.io"  # type: ignore[union-attr]
    for host in ("auth.docker.io", "production.cloudflare.docker.com",
                 "pkg-containers.githubusercontent.com", "us-west1-docker.pkg.dev",
                 "prod-registry-k8s-io-us-east-2.s3.dualstack.us-east-2.amazonaws.com"):
        assert rules.decide(host, 443).mode == "tunnel", host
    assert destinations(intercepting=False).decide("ghcr.io", 443).mode == "tunnel"


def test_everything_else_is_refused() -> None:
    rules = destinations()
    cases = {("example.com", 443): "proxy_host", ("quay.io", 443): "proxy_host",
             ("ghcr.io.evil.example", 443): "proxy_host", ("s3.amazonaws.com", 443): "proxy_host",
             ("ghcr.io", 80): "proxy_port", ("ghcr.io", 8443): "proxy_port",
             ("127.0.0.1", 443): "proxy_address", ("::1", 443): "proxy_address",
             ("140.82.112.34", 443): "proxy_address"}
    for (host, port), reason in cases.items():
        decision = rules.decide(host, port)
        assert (decision.mode, decision.reason) == ("refuse", reason), (host, port)


def test_configured_hosts_ports_addresses_and_connect_to() -> None:
    rules = destinations("""
forward_proxy:
  hosts: [objects.example.net, "*.cdn.example.org"]
  ports: [443, 8443]
  addresses: [10.0.0.0/8]
  connect_to: {registry-1.docker.io: "10.1.2.3:4443"}
""")
    assert rules.decide("objects.example.net", 443).mode == "tunnel"
    assert rules.decide("a.b.cdn.example.org", 8443).mode == "tunnel"
    assert rules.decide("cdn.example.org", 443).mode == "refuse"
    assert rules.decide("10.9.9.9", 443).mode == "tunnel"
    assert rules.decide("11.0.0.1", 443).mode == "refuse"
    assert rules.address("registry-1.docker.io", 443) == ("10.1.2.3", 4443)
    assert rules.address("ghcr.io", 443) == ("ghcr.io", 443)
    # Added hosts are tunnelled, never minted for.
    assert not rules.may_mint("objects.example.net")


@pytest.mark.parametrize("text, message", [
    ("forward_proxy: {hosts: ['*']}", "is not a host name or pattern"),
    ("forward_proxy: {hosts: ['*.com']}", "is not a host name or pattern"),
    ("forward_proxy: {ports: []}", "port numbers"),
    ("forward_proxy: {connect_to: {ghcr.io: nowhere}}", "want ADDRESS:PORT"),
    ("forward_proxy: {bogus: 1}", "unknown key"),
])
def test_forward_proxy_section_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(ROUTES + text)


# -- the CA -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    directory = tmp_path_factory.mktemp("ca")
    write_ca(directory, ["docker.io", "registry-1.docker.io", "ghcr.io"])
    return Authority.load(directory)


def handshake(server: ssl.SSLContext, cafile: Path, server_name: str) -> None:
    """A real TLS handshake over a socket pair; raises what the client's check raises."""
    near, far = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(far, server_side=True):
                pass
        except (ssl.SSLError, OSError) as error:
            errors.append(error)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = ssl.create_default_context(cafile=str(cafile))
        with client.wrap_socket(near, server_hostname=server_name):
            pass
    finally:
        near.close()
        thread.join(10)
        far.close()


def ca_file(authority: Authority, tmp_path: Path) -> Path:
    path = tmp_path / "ca.crt"
    path.write_bytes(authority.pem)
    return path


def test_a_leaf_for_a_permitted_name_verifies(authority: Authority, tmp_path: Path) -> None:
    chain, key, _ = authority.mint("registry-1.docker.io")
    handshake(server_context(chain, key), ca_file(authority, tmp_path), "registry-1.docker.io")


@pytest.mark.parametrize("name", ["evil.example", "ghcr.io.evil.example", "dockerxio.com"])
def test_the_name_constraints_stop_a_leaf_for_any_other_name(
        authority: Authority, tmp_path: Path, name: str) -> None:
    # Minted by hand, past the minter's own refusal: the CA's constraints alone must hold.
    chain, key, _ = authority.mint(name)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"(?i)subtree|name constraint"):
        handshake(server_context(chain, key), ca_file(authority, tmp_path), name)


def test_the_ca_is_constrained_critical_and_excludes_ip_addresses(
        authority: Authority) -> None:
    extension = authority.certificate.extensions.get_extension_for_class(x509.NameConstraints)
    assert extension.critical
    assert set(permitted_names(authority.certificate)) == {
        "docker.io", "registry-1.docker.io", "ghcr.io"}
    excluded = {str(n.value) for n in extension.value.excluded_subtrees or ()}
    assert excluded == {"0.0.0.0/0", "::/0"}
    basic = authority.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0


async def test_the_minter_never_mints_outside_the_allowed_list(authority: Authority) -> None:
    rules = destinations()
    minter = Minter(authority, rules.may_mint)
    try:
        for host in ("auth.docker.io", "evil.example", "production.cloudflare.docker.com",
                     "registry.example.com"):  # the last: a route, but outside the CA's names
            with pytest.raises(NotPermitted):
                await minter.context(host)
        assert minter.minted == 0
        contexts = await asyncio.gather(*(minter.context("ghcr.io") for _ in range(8)))
        assert minter.minted == 1 and all(c is contexts[0] for c in contexts)
    finally:
        await minter.close()


def test_ca_init_permits_the_routes_registry_hosts(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    directory = tmp_path / "proxy-ca"

    assert main(["ca", "init", "--dir", str(directory), "--routes", str(routes),
                 "--permit", "extra.example"]) == 0
    assert main(["ca", "init", "--dir", str(directory), "--routes", str(routes)]) == 1

    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    names = set(permitted_names(Authority.load(directory).certificate))
    assert names == {"docker.io", "registry-1.docker.io", "index.docker.io",
                     "registry.hub.docker.com", "ghcr.io", "registry.k8s.io",
                     "registry.example.com", "extra.example"}
    out = capsys.readouterr()
    assert "forward_proxy:" in out.out and "already holds a CA" in out.err


async def test_a_tunnel_copies_both_ways_and_closes_when_idle() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    destination = await asyncio.start_server(echo, "127.0.0.1", 0)
    accepted: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()
            accepted.set_result(transport)

    loop = asyncio.get_running_loop()
    listener = await loop.create_server(Accept, "127.0.0.1", 0)
    counted: list[int] = []
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", listener.sockets[0].getsockname()[1])
        client = await accepted
        port = destination.sockets[0].getsockname()[1]
        _, far = await loop.create_connection(lambda: Pipe(counted.append), "127.0.0.1", port)
        splice(client, b"early ", far, counted.append, idle=0.3)
        writer.write(b"bytes")
        assert await reader.readexactly(11) == b"early bytes"
        await asyncio.wait_for(far.closed, 5)  # idle: closed by the watchdog
        assert await reader.read() == b""
        assert sum(counted) == 22  # 11 up, 11 down
        writer.close()
    finally:
        listener.close()
        destination.close()
