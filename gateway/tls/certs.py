"""Finding and reading certificates: the PEM files under the certificate directory (the
layouts acme.sh, certbot and Kubernetes write), each private key paired with its chain.

Blocking file reads only (callers run it in a worker thread); no ssl contexts, no event
loop. Private keys are never logged, nor their passphrases.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.hashes import SHA256

log = logging.getLogger("gateway.tls")

_SUFFIXES = (".pem", ".crt", ".cer", ".key")
_MAX_PEM_BYTES = 1 << 20
_MAX_DEPTH = 3  # certs/, certs/<domain>/ (acme.sh), certs/live/<domain>/ (certbot)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | \
    ed448.Ed448PrivateKey
Fingerprint = tuple[tuple[str, int, int, int], ...]


class TlsError(Exception):
    """No usable certificate: the message says what the directory must hold."""


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


def fingerprint(root: Path) -> Fingerprint:
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


def _load_key(path: Path, data: bytes, mode: int, problems: list[str]) -> PrivateKey | None:
    if b"ENCRYPTED PRIVATE KEY" in data or b"Proc-Type: 4,ENCRYPTED" in data:
        problems.append(f"{path}: the private key is encrypted; the gateway needs it "
                        "unencrypted (and readable only by its user: chmod 600)")
        return None
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        problems.append(f"{path}: not a usable private key")
        return None
    if not isinstance(loaded, PrivateKey):
        problems.append(f"{path}: unsupported private key type")
        return None
    if mode & 0o004:
        log.warning("private key %s is readable by every user; chmod 600 it", path)
    return loaded


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
    if b"CERTIFICATE-----" in data:
        try:
            chain = x509.load_pem_x509_certificates(data)
        except ValueError:
            problems.append(f"{path}: not a valid PEM certificate")
    key = None
    if b"PRIVATE KEY-----" in data:
        key = _load_key(path, data, status.st_mode, problems)
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


def _pair(key_file: _PemFile, key: PrivateKey, files: list[_PemFile],
          problems: list[str]) -> Certificate | None:
    """The certificate for `key` among the files of its directory, if one holds it."""
    wanted = _spki(key.public_key())
    matches = [f for f in files if f.chain and _spki(f.chain[0].public_key()) == wanted]
    if not matches:
        problems.append(f"{key_file.path}: no certificate next to this key holds its public key")
        return None
    # Longest chain first; a file holding key and chain together wins a tie.
    best = max(matches, key=lambda f: (len(f.chain), f is key_file))
    leaf = best.chain[0]
    names, addresses = _subject_names(leaf)
    if not names and not addresses:
        problems.append(f"{best.path}: the certificate has no subjectAltName; "
                        "clients will refuse it")
        return None
    return Certificate(
        chain_path=best.path, key_path=key_file.path, names=names, addresses=addresses,
        not_before=leaf.not_valid_before_utc, not_after=leaf.not_valid_after_utc,
        chain_length=len(best.chain), fingerprint=leaf.fingerprint(SHA256()).hex())


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
        for key_file in files:
            if key_file.key is not None:
                found = _pair(key_file, key_file.key, files, scan.problems)
                if found is not None:
                    scan.certificates.append(found)
    return scan
