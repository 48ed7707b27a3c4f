"""The forward proxy's certificate authority: `ca init` (a CA whose NameConstraints permit
only registry host names, critical, and exclude every IP address) and the leaf
certificates minted from it per intercepted host, kept in a bounded cache.

Never mints for a host the caller's allow-list refuses; the CA key stays in memory and
in its 0600 file, never in a log or an error.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..singleflight import SharedCalls

CA_CERT, CA_KEY = "ca.crt", "ca.key"
CA_DAYS = 3650
LEAF_DAYS = 30
LEAF_RENEW = datetime.timedelta(days=7)  # a cached leaf this close to its end is re-minted
LEAF_CACHE = 256  # hosts whose TLS context is kept (the routes' registry hosts fit)


class AuthorityError(Exception):
    """A CA that cannot be made or read; the message says why, never shows the key."""


class NotPermitted(Exception):
    """A leaf was asked for a host outside the allow-list: none is minted."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(names: Iterable[str], *, common_name: str = "registry-gateway proxy CA",
            days: int = CA_DAYS) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a new CA limited to `names` and their subdomains."""
    permitted = sorted({n.lower().rstrip(".") for n in names if n})
    if not permitted:
        raise AuthorityError("no registry host names to permit: give routes or --permit")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "registry-gateway")])
    now = _now()
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(n) for n in permitted],
        # With only DNS names permitted, IP SANs would be unconstrained (RFC 5280 4.2.1.10).
        excluded_subtrees=[x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
                           x509.IPAddress(ipaddress.ip_network("::/0"))])
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(constraints, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def write_ca(directory: Path, names: Iterable[str], *, force: bool = False) -> Path:
    """`ca init`: the CA into `directory` (ca.crt 0644, ca.key 0600); returns ca.crt."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not force and (cert_path.exists() or key_path.exists()):
        raise AuthorityError(f"{directory} already holds a CA; --force replaces it (clients "
                             "must then trust the new one)")
    cert_pem, key_pem = make_ca(names)
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key_pem)
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert_pem)
    return cert_path


def permitted_names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(n.value) for n in constraints.value.permitted_subtrees or ()
                 if isinstance(n, x509.DNSName))


@dataclass(frozen=True)
class Authority:
    """A CA read from its directory."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: bytes  # the certificate, as /_gateway/ca.crt serves it

    @classmethod
    def load(cls, directory: Path) -> Authority:
        """Blocking (reads files): call it off the loop."""
        try:
            pem = (directory / CA_CERT).read_bytes()
            key_bytes = (directory / CA_KEY).read_bytes()
        except OSError as exc:
            raise AuthorityError(f"cannot read the proxy CA in {directory}: {exc.strerror} "
                                 "(make one with `registry-gateway ca init`)") from None
        try:
            certificate = x509.load_pem_x509_certificate(pem)
            key = serialization.load_pem_private_key(key_bytes, password=None)
        except ValueError:
            raise AuthorityError(f"{directory}: {CA_CERT} or {CA_KEY} is not a PEM "
                                 "certificate and unencrypted key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AuthorityError(f"{directory}/{CA_KEY}: want the EC key `ca init` writes")
        return cls(certificate, key, pem)

    def permits(self, host: str) -> bool:
        """Whether the CA's own name constraints cover `host` (no point minting otherwise)."""
        names = permitted_names(self.certificate)
        return not names or any(host == n or host.endswith("." + n) for n in names)

    def mint(self, host: str) -> tuple[bytes, bytes, datetime.datetime]:
        """(leaf PEM + CA PEM, key PEM, not-after) for `host`. CPU work: off the loop."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        until = now + datetime.timedelta(days=LEAF_DAYS)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self.pem
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return chain, key_pem, until


def server_context(chain: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server-side context for one leaf (blocking: ssl loads chains from files only)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # the app speaks HTTP/1.1; Go would ask for h2
    with tempfile.TemporaryDirectory(prefix="rgw-leaf-") as scratch:
        chain_path, key_path = Path(scratch) / "chain.pem", Path(scratch) / "key.pem"
        chain_path.write_bytes(chain)
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key_pem)
        context.load_cert_chain(chain_path, key_path)
    return context


class Minter:
    """TLS contexts with a leaf per intercepted host: minted once (concurrent CONNECTs to
    a cold host share one mint), cached up to LEAF_CACHE hosts, re-minted near expiry."""

    def __init__(self, authority: Authority, allowed: Callable[[str], bool], *,
                 on_mint: Callable[[], None] = lambda: None) -> None:
        self.authority = authority
        self._on_mint = on_mint
        self._allowed = allowed  # the running allow-list (it changes on reload)
        self._cache: LRUCache[str, tuple[ssl.SSLContext, datetime.datetime]] = \
            LRUCache(maxsize=LEAF_CACHE)
        self._calls: SharedCalls[str, tuple[ssl.SSLContext, datetime.datetime]] = \
            SharedCalls("leaf")
        self.minted = 0

    async def context(self, host: str) -> ssl.SSLContext:
        host = host.lower().rstrip(".")
        if not self._allowed(host) or not self.authority.permits(host):
            raise NotPermitted(host)
        cached = self._cache.get(host)
        if cached is not None and cached[1] - _now() > LEAF_RENEW:
            return cached[0]
        made, _ = await self._calls.call(host, lambda: self._mint(host))
        self._cache[host] = made
        return made[0]

    async def _mint(self, host: str) -> tuple[ssl.SSLContext, datetime.datetime]:
        def work() -> tuple[ssl.SSLContext, datetime.datetime]:
            chain, key_pem, until = self.authority.mint(host)
            return server_context(chain, key_pem), until

        made = await asyncio.to_thread(work)
        self.minted += 1
        self._on_mint()
        return made

    async def close(self) -> None:
        await self._calls.close()
