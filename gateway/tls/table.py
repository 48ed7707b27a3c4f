"""The table a TLS handshake reads: one ssl context per certificate, found by server name
(exact, then a one-label wildcard, then a default for clients that send no SNI).

Building a table loads key files (blocking: run it in a worker thread); `CertTable.select`
is a dictionary lookup, safe inside a handshake on the event loop.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .certs import Certificate, Scan, TlsError, scan_directory

# Mozilla "intermediate" (TLS 1.2 part; TLS 1.3 suites are all modern and stay on):
# forward secret AEAD ciphers only, nothing CBC, no RSA key exchange, no DHE.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))

_NO_CERTIFICATE = ("no certificate with its private key found; put the certificate chain "
                   "and key there: fullchain.pem + privkey.pem (certbot), fullchain.cer + "
                   "<domain>.key (acme.sh), or <host>.crt + <host>.key")

Loaded = list[tuple[Certificate, ssl.SSLContext]]


def server_context() -> ssl.SSLContext:
    """A server context with the gateway's protocol rules and no certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # aiohttp speaks HTTP/1.1 only; saying so keeps Go clients from trying h2.
    context.set_alpn_protocols(["http/1.1"])
    return context


def certificate_context(certificate: Certificate) -> ssl.SSLContext:
    """A server context serving `certificate` (reads its files: blocking)."""
    context = server_context()
    context.load_cert_chain(certificate.chain_path, certificate.key_path)
    return context


@dataclass(frozen=True)
class CertTable:
    """Which context (certificate) answers which server name; replaced whole on reload."""

    exact: Mapping[str, ssl.SSLContext]
    wildcard: Mapping[str, ssl.SSLContext]  # "example.com" -> context of *.example.com
    default: ssl.SSLContext
    default_certificate: Certificate
    certificates: tuple[Certificate, ...]
    by_chain: Mapping[Path, ssl.SSLContext]

    def select(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            name = server_name.lower().rstrip(".")
            found = self.exact.get(name)
            if found is not None:
                return found
            # A wildcard covers exactly one label (RFC 6125 6.4.3).
            found = self.wildcard.get(name.partition(".")[2])
            if found is not None:
                return found
        # No SNI (clients that connect by IP address) or an unknown name.
        return self.default

    def covers(self, server_name: str) -> bool:
        name = server_name.lower().rstrip(".")
        return name in self.exact or name.partition(".")[2] in self.wildcard


def _load_contexts(scan: Scan, previous: CertTable | None, now: datetime.datetime) -> Loaded:
    """A context per certificate found, best first (valid now, then the one that lasts
    longest); an unchanged certificate keeps the context it had."""
    loaded: Loaded = []
    reused = previous.by_chain if previous is not None else {}
    prior = {c.chain_path: c for c in previous.certificates} if previous is not None else {}
    for certificate in scan.certificates:
        try:
            if prior.get(certificate.chain_path) == certificate and \
                    certificate.chain_path in reused:
                context = reused[certificate.chain_path]
            else:
                context = certificate_context(certificate)
        except (OSError, ssl.SSLError) as exc:
            # Files replaced between reading and loading: the next pass picks them up.
            scan.problems.append(f"{certificate.chain_path}: cannot load ({exc})")
            continue
        loaded.append((certificate, context))
    loaded.sort(key=lambda item: (not item[0].valid_at(now), -item[0].not_after.timestamp(),
                                  str(item[0].chain_path)))
    return loaded


def _by_name(covering: Loaded) -> tuple[dict[str, ssl.SSLContext], dict[str, ssl.SSLContext]]:
    """Exact and wildcard maps; for each name, the first certificate listing it wins."""
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    for certificate, context in covering:
        for name in (*certificate.names, *certificate.addresses):
            if name.startswith("*."):
                wildcard.setdefault(name[2:], context)
            else:
                exact.setdefault(name, context)
    return exact, wildcard


def build_table(scan: Scan, previous: CertTable | None = None,
                now: datetime.datetime | None = None) -> CertTable:
    """Contexts for what `scan` found. While the directory is inconsistent (a renewal half
    written: a key without its certificate), names it no longer covers keep the
    previous certificate rather than vanish."""
    now = now or datetime.datetime.now(datetime.UTC)
    loaded = _load_contexts(scan, previous, now)
    covering = list(loaded)
    if scan.problems and previous is not None:  # after the new ones: only fills gaps
        covering += [(c, previous.by_chain[c.chain_path]) for c in previous.certificates]
    exact, wildcard = _by_name(covering)
    if not loaded:
        if previous is not None:
            return previous
        raise TlsError(_NO_CERTIFICATE)
    # Clients without SNI get the certificate listing IP addresses, else a wildcard one.
    default_certificate, default_context = min(loaded, key=lambda item: (
        not item[0].addresses, not any(n.startswith("*.") for n in item[0].names),
        not item[0].valid_at(now), str(item[0].chain_path)))
    return CertTable(exact=exact, wildcard=wildcard, default=default_context,
                     default_certificate=default_certificate,
                     certificates=tuple(c for c, _ in loaded),
                     by_chain={c.chain_path: ctx for c, ctx in loaded})


def load_table(root: Path, previous: CertTable | None = None) -> tuple[CertTable, list[str]]:
    """Scan and load (blocking: run it in a thread)."""
    if not root.is_dir():
        raise TlsError(f"{root} is not a directory")
    scan = scan_directory(root)
    table = build_table(scan, previous)
    return table, scan.problems
