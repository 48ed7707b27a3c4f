"""The gateway under test with TLS: a test PKI whose certificates sit where ACME clients
leave them, a launcher that returns once the TLS listener answers, and TLS probes that
check what a client would (the chain, the name, the serial). Loopback only.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509

from .gateway import Gateway, run_gateway
from .net import ensure_loopback, free_port
from .wait import wait_for


@dataclass
class Pki:
    ca: trustme.CA
    ca_path: Path
    certs: Path  # the gateway's certs/ directory


def make_pki(root: Path, domain: str) -> Pki:
    """A CA and an intermediate that issued one certificate for `domain` and `*.domain`,
    installed in acme.sh's layout under root/certs; the CA at root/ca.pem."""
    ca = trustme.CA(organization_name="registry-gateway test CA")
    intermediate = ca.create_child_ca()
    install_acme_sh_layout(root / "certs", intermediate.issue_cert(domain, f"*.{domain}"),
                           domain)
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    return Pki(ca, root / "ca.pem", root / "certs")


def install_acme_sh_layout(certs: Path, leaf: trustme.LeafCert, domain: str) -> Path:
    """What `acme.sh --issue -d gw.test -d '*.gw.test'` leaves: <dir>/fullchain.cer and
    <domain>.key (plus the leaf alone and the CA bundle, which must not confuse us)."""
    directory = certs / f"{domain}_ecc"
    directory.mkdir(parents=True, exist_ok=True)
    chain = [pem.bytes() for pem in leaf.cert_chain_pems]
    (directory / f"{domain}.cer").write_bytes(chain[0])
    (directory / "ca.cer").write_bytes(b"".join(chain[1:]))
    (directory / "fullchain.cer").write_bytes(b"".join(chain))
    key = directory / f"{domain}.key"
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    return directory


def tls_answers(port: int, ca_path: Path, server_name: str, *,
                host: str = "127.0.0.1") -> bool:
    """True when host:port completes a TLS handshake that verifies against `ca_path` for
    `server_name` (a host name, sent as SNI, or an IP address, checked but not sent)."""
    ensure_loopback(host)
    context = ssl.create_default_context(cafile=str(ca_path))
    try:
        with socket.create_connection((host, port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname=server_name):
            return True
    except OSError:
        return False


@dataclass
class TlsGateway:
    gateway: Gateway
    tls_port: int

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.gateway.process is not None
        return self.gateway.process


@contextlib.contextmanager
def run_tls_gateway(workdir: Path, routes: dict[str, Any], certs: Path, ca_path: Path,
                    *extra: str, server_name: str) -> Iterator[TlsGateway]:
    """The gateway with a TLS listener on 127.0.0.1 (and a plain one that redirects to
    it), returned once a handshake for `server_name` verifies."""
    tls_port = free_port()
    args = ("--tls-listen", f"127.0.0.1:{tls_port}", "--certs", str(certs),
            "--redirect-http", *extra)
    with run_gateway(workdir, routes, extra_args=args) as gateway:
        wait_for(lambda: tls_answers(tls_port, ca_path, server_name),
                 what="gateway TLS listener", process=gateway.process,
                 diagnostics=gateway.log)
        yield TlsGateway(gateway, tls_port)


def peer_serial(port: int, ca_path: Path, server_name: str) -> int:
    """The serial number of the certificate 127.0.0.1:port serves for `server_name`."""
    context = ssl.create_default_context(cafile=str(ca_path))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as wrapped:
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 with the SNI and certificate check of a gateway host name."""

    def __init__(self, port: int, server_name: str, ca_path: Path) -> None:
        super().__init__("127.0.0.1", port, timeout=10)
        self.server_name = server_name
        self.tls = ssl.create_default_context(cafile=str(ca_path))

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(raw, server_hostname=self.server_name)

    def putrequest(self, method: str, url: str, skip_host: bool = False,
                   skip_accept_encoding: bool = False) -> None:
        super().putrequest(method, url, skip_host=True, skip_accept_encoding=True)
        self.putheader("Host", f"{self.server_name}:{self.port}")


def leaf_serial(leaf: trustme.LeafCert) -> int:
    """The serial number of a certificate trustme issued."""
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
