"""The edge: TLS for many host names (certificates by SNI, reloaded from disk) and what
a trusted proxy in front says about the request (X-Forwarded-*), plus HTTP→HTTPS.

Certificates are read in worker threads and swapped in whole; a handshake only looks
one up. Private keys are never logged; a half-written renewal never takes a host away.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.hashes import SHA256

from .config import Network
from .errors import RegistryError

log = logging.getLogger("gateway.tls")

# Mozilla "intermediate" (TLS 1.2 part; TLS 1.3 suites are all modern and stay on):
# forward secret AEAD ciphers only, nothing CBC, no RSA key exchange, no DHE.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
RELOAD_INTERVAL = 5.0
EXPIRY_WARNING = datetime.timedelta(days=14)
_SUFFIXES = (".pem", ".crt", ".cer", ".key")
_MAX_PEM_BYTES = 1 << 20
_MAX_DEPTH = 3  # certs/, certs/<domain>/ (acme.sh), certs/live/<domain>/ (certbot)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | \
    ed448.Ed448PrivateKey


class TlsError(Exception):
    """No usable certificate: the message says what the directory must hold."""


def server_context() -> ssl.SSLContext:
    """A server context with the gateway's protocol rules and no certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # aiohttp speaks HTTP/1.1 only; saying so keeps Go clients from trying h2.
    context.set_alpn_protocols(["http/1.1"])
    return context


# ---------------------------------------------------------------- finding certificates


@dataclass(frozen=True)
class Certificate:
    """One certificate chain with its key, as found on disk."""

    chain_path: Path
    key_path: Path
    names: tuple[str, ...]  # DNS names from subjectAltName, lower case ("*.example.com")
    addresses: tuple[str, ...]  # IP addresses from subjectAltName
    not_before: datetime.datetime
    not_after: datetime.datetime
    chain_length: int
    fingerprint: str  # sha256 of the leaf: a renewal changes it even at the same path

    def valid_at(self, now: datetime.datetime) -> bool:
        return self.not_before <= now <= self.not_after

    def describe(self) -> str:
        names = ", ".join((*self.names, *self.addresses)) or "(no subjectAltName)"
        return f"{names} from {self.chain_path} (until {self.not_after:%Y-%m-%d})"


@dataclass
class Scan:
    """What a pass over the certificate directory found."""

    certificates: list[Certificate] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class _PemFile:
    path: Path
    chain: list[x509.Certificate]
    key: PrivateKey | None


def candidate_files(root: Path) -> list[Path]:
    """PEM-looking files under `root` (a few levels deep, symlinks followed, dot names
    skipped: Kubernetes secret volumes keep their real files under `..data`)."""
    found: list[Path] = []

    def walk(directory: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    if depth < _MAX_DEPTH:
                        walk(Path(entry.path), depth + 1)
                elif entry.is_file() and entry.name.lower().endswith(_SUFFIXES):
                    found.append(Path(entry.path))
            except OSError:
                continue

    walk(root, 0)
    return found


def fingerprint(root: Path) -> tuple[tuple[str, int, int, int], ...]:
    """Cheap identity of the directory's certificate files: changes when any is replaced."""
    marks = []
    for path in candidate_files(root):
        try:
            st = path.stat()
        except OSError:
            continue
        marks.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(marks)


def _spki(key: Any) -> bytes:
    data: bytes = key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def _read_pem(path: Path, problems: list[str]) -> _PemFile | None:
    try:
        status = path.stat()
        if status.st_size > _MAX_PEM_BYTES:
            return None
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: cannot read ({exc.strerror})")
        return None
    chain: list[x509.Certificate] = []
    key: PrivateKey | None = None
    if b"CERTIFICATE-----" in data:
        try:
            chain = x509.load_pem_x509_certificates(data)
        except ValueError:
            problems.append(f"{path}: not a valid PEM certificate")
    if b"PRIVATE KEY-----" in data:
        if b"ENCRYPTED PRIVATE KEY" in data or b"Proc-Type: 4,ENCRYPTED" in data:
            problems.append(f"{path}: the private key is encrypted; the gateway needs it "
                            "unencrypted (and readable only by its user: chmod 600)")
        else:
            try:
                loaded = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError):
                problems.append(f"{path}: not a usable private key")
            else:
                if isinstance(loaded, PrivateKey):
                    key = loaded
                else:
                    problems.append(f"{path}: unsupported private key type")
            if key is not None and status.st_mode & 0o004:
                log.warning("private key %s is readable by every user; chmod 600 it", path)
    if not chain and key is None:
        return None
    return _PemFile(path, chain, key)


def _subject_names(leaf: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    names = tuple(n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName))
    addresses = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    return names, addresses


def scan_directory(root: Path) -> Scan:
    """Pair every private key with the certificate chain next to it that holds its public
    key (the longest such chain: acme.sh's fullchain.cer over <domain>.cer)."""
    scan = Scan()
    by_directory: dict[Path, list[_PemFile]] = {}
    for path in candidate_files(root):
        pem = _read_pem(path, scan.problems)
        if pem is not None:
            by_directory.setdefault(path.parent, []).append(pem)
    for files in by_directory.values():
        for key_file in (f for f in files if f.key is not None):
            assert key_file.key is not None
            wanted = _spki(key_file.key.public_key())
            matches = [f for f in files if f.chain and _spki(f.chain[0].public_key()) == wanted]
            if not matches:
                scan.problems.append(f"{key_file.path}: no certificate next to this key "
                                     "holds its public key")
                continue
            # Longest chain first; a file holding key and chain together wins a tie.
            best = max(matches, key=lambda f: (len(f.chain), f is key_file))
            leaf = best.chain[0]
            names, addresses = _subject_names(leaf)
            if not names and not addresses:
                scan.problems.append(f"{best.path}: the certificate has no subjectAltName; "
                                     "clients will refuse it")
                continue
            scan.certificates.append(Certificate(
                chain_path=best.path, key_path=key_file.path, names=names, addresses=addresses,
                not_before=leaf.not_valid_before_utc, not_after=leaf.not_valid_after_utc,
                chain_length=len(best.chain), fingerprint=leaf.fingerprint(SHA256()).hex()))
    return scan


# ---------------------------------------------------------------- the table a handshake reads


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


def _context_for(certificate: Certificate) -> ssl.SSLContext:
    context = server_context()
    context.load_cert_chain(certificate.chain_path, certificate.key_path)
    return context


def build_table(scan: Scan, previous: CertTable | None = None,
                now: datetime.datetime | None = None) -> CertTable:
    """Contexts for what `scan` found. While the directory is inconsistent (a renewal half
    written: a key without its certificate), names it no longer covers keep the
    previous certificate rather than vanish."""
    now = now or datetime.datetime.now(datetime.UTC)
    loaded: list[tuple[Certificate, ssl.SSLContext]] = []
    reused = previous.by_chain if previous is not None else {}
    prior = {c.chain_path: c for c in previous.certificates} if previous is not None else {}
    for certificate in scan.certificates:
        try:
            if prior.get(certificate.chain_path) == certificate and \
                    certificate.chain_path in reused:
                context = reused[certificate.chain_path]
            else:
                context = _context_for(certificate)
        except (OSError, ssl.SSLError) as exc:
            # Files replaced between reading and loading: the next pass picks them up.
            scan.problems.append(f"{certificate.chain_path}: cannot load ({exc})")
            continue
        loaded.append((certificate, context))
    # Best first: valid now, then the one that lasts longest.
    loaded.sort(key=lambda item: (not item[0].valid_at(now), -item[0].not_after.timestamp(),
                                  str(item[0].chain_path)))
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    covering = list(loaded)
    if scan.problems and previous is not None:  # after the new ones: only fills gaps
        covering += [(c, previous.by_chain[c.chain_path]) for c in previous.certificates]
    for certificate, context in covering:
        for name in (*certificate.names, *certificate.addresses):
            if name.startswith("*."):
                wildcard.setdefault(name[2:], context)
            else:
                exact.setdefault(name, context)
    if not loaded:
        if previous is not None:
            return previous
        raise TlsError("no certificate with its private key found; put the certificate chain "
                       "and key there: fullchain.pem + privkey.pem (certbot), fullchain.cer + "
                       "<domain>.key (acme.sh), or <host>.crt + <host>.key")
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


class TlsCertificates:
    """The certificates of every TLS listener, reloaded when the files change.

    `context` is what the listeners use; its SNI callback picks the certificate from the
    current table, so a replaced certificate is served to the next new connection after
    the next check (every `reload_interval` seconds, or at once on `reload_soon()`).
    """

    def __init__(self, directory: Path, *, reload_interval: float = RELOAD_INTERVAL) -> None:
        self.directory = Path(directory)
        self.reload_interval = reload_interval
        self._table: CertTable | None = None
        self._fingerprint: tuple[tuple[str, int, int, int], ...] = ()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._problems: list[str] = []
        self.context = server_context()
        self.context.sni_callback = self._on_server_name

    @property
    def table(self) -> CertTable:
        if self._table is None:
            raise RuntimeError("certificates are not loaded yet")
        return self._table

    def _on_server_name(self, connection: ssl.SSLObject, server_name: str | None,
                        context: ssl.SSLContext) -> None:
        # Runs on the event loop inside the handshake: a dictionary lookup, nothing more.
        if self._table is not None:
            connection.context = self._table.select(server_name)

    async def start(self) -> None:
        """Load the certificates (raising `TlsError` if there are none) and watch them."""
        await self.reload(force=True)
        # The listener's own certificate only matters if a handshake skips the callback.
        default = self.table.default_certificate
        await asyncio.to_thread(self.context.load_cert_chain, default.chain_path,
                                default.key_path)
        self._task = asyncio.create_task(self._watch(), name="tls-reload")

    def reload_soon(self) -> None:
        """Check the directory now (SIGHUP) instead of at the next interval."""
        self._wake.set()

    async def reload(self, *, force: bool = False) -> bool:
        """Load the directory again if it changed; True when a new table is in place."""
        mark = await asyncio.to_thread(fingerprint, self.directory)
        if not force and mark == self._fingerprint:
            return False
        try:
            table, problems = await asyncio.to_thread(load_table, self.directory, self._table)
        except TlsError as exc:
            if self._table is None:
                raise TlsError(f"{self.directory}: {exc}") from None
            log.warning("certificates in %s: %s; still serving the previous ones",
                        self.directory, exc)
            return False
        self._fingerprint = mark
        if problems != self._problems:
            for problem in problems:
                log.warning("certificate problem: %s", problem)
            self._problems = problems
        changed = table is not self._table
        self._table = table
        if changed:
            self._log_table(table)
        return changed

    def _log_table(self, table: CertTable) -> None:
        now = datetime.datetime.now(datetime.UTC)
        for certificate in table.certificates:
            log.info("tls certificate: %s", certificate.describe())
            if certificate.not_after < now:
                log.warning("certificate %s has EXPIRED", certificate.chain_path)
            elif certificate.not_after - now < EXPIRY_WARNING:
                log.warning("certificate %s expires on %s: renew it", certificate.chain_path,
                            certificate.not_after.date())

    async def _watch(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.reload_interval)
            except TimeoutError:
                forced = False
            else:
                forced = True
            self._wake.clear()
            try:
                await self.reload(force=forced)
            except Exception:  # a bad pass must not stop the watcher
                log.exception("reloading certificates from %s failed", self.directory)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# ---------------------------------------------------------------- behind a proxy; plain HTTP

_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
                      r"|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


def _is_trusted(address: str | None, networks: Iterable[Network]) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _last_value(values: list[str]) -> str | None:
    """The value the nearest proxy set: the last item of the (comma-joined) headers."""
    items = [item.strip() for value in values for item in value.split(",") if item.strip()]
    return items[-1] if items else None


def _client_address(values: list[str], networks: tuple[Network, ...]) -> str | None:
    """X-Forwarded-For read right to left, skipping our own proxies: the first address
    no trusted proxy owns is the client (anything further left is the client's claim)."""
    items = [item.strip() for value in values for item in value.split(",") if item.strip()]
    for item in reversed(items):
        candidate = item[1:].split("]", 1)[0] if item.startswith("[") else item
        if candidate.count(":") == 1:  # IPv4 with a port
            candidate = candidate.split(":", 1)[0]
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            return None
        if not _is_trusted(candidate, networks):
            return candidate
    return None


def forwarded_middleware(networks: tuple[Network, ...]) -> Any:
    """Believe `X-Forwarded-Host/-Proto/-For` only from `networks` (the configured proxies):
    from anyone else they are ignored, so a client cannot pick a route by header."""

    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not networks or not _is_trusted(request.remote, networks):
            return await handler(request)
        changes: dict[str, str] = {}
        host = _last_value(request.headers.getall("X-Forwarded-Host", []))
        if host and len(host) <= 255 and _HOST_RE.fullmatch(host):
            changes["host"] = host
        proto = _last_value(request.headers.getall("X-Forwarded-Proto", []))
        if proto and proto.lower() in ("http", "https"):
            changes["scheme"] = proto.lower()
        client = _client_address(request.headers.getall("X-Forwarded-For", []), networks)
        if client:
            changes["remote"] = client
        if changes:
            request = request.clone(**changes)  # type: ignore[arg-type]
        return await handler(request)

    return forwarded


def redirect_middleware(https_port: int) -> Any:
    """Answer plain-HTTP requests with a redirect to the same URL over HTTPS (health
    checks and metrics scrapes excepted). Requests a trusted proxy marks as https are
    served as they are."""

    @web.middleware
    async def redirect(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.scheme == "https" or request.path in ("/healthz", "/metrics"):
            return await handler(request)
        host = request.host
        if not host or len(host) > 255 or not _HOST_RE.fullmatch(host):
            raise RegistryError("UNSUPPORTED", "this gateway answers on https:// only", 400)
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") and ":" in host else host
        port = "" if https_port == 443 else f":{https_port}"
        location = f"https://{hostname}{port}{request.raw_path}"
        return web.Response(status=308, headers={"Location": location})

    return redirect
