"""TLS termination (gateway/tls/): finding certificates in the layouts acme.sh, certbot
and Kubernetes write, choosing one by SNI, protocol rules, reload without restart."""

from __future__ import annotations

import asyncio
import datetime
import re
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.tls import TlsCertificates, TlsError
from gateway.tls.certs import scan_directory
from gateway.tls.table import build_table, load_table

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(directory: Path, leaf: trustme.LeafCert, *, chain_name: str = "fullchain.pem",
               key_name: str = "privkey.pem") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / chain_name).write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    (directory / key_name).write_bytes(leaf.private_key_pem.bytes())
    (directory / key_name).chmod(0o600)


def leaf_names(leaf_pem: bytes) -> list[str]:
    certificate = x509.load_pem_x509_certificates(leaf_pem)[0]
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


# -- finding certificates on disk ------------------------------------------------------


def test_acme_sh_layout_pairs_the_key_with_the_full_chain(tmp_path: Path, ca: trustme.CA) -> None:
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("*.example.com", "example.com")
    directory = tmp_path / "*.example.com_ecc"
    directory.mkdir()
    # What acme.sh --issue leaves: leaf alone, CA bundle, full chain, key.
    (directory / "*.example.com.cer").write_bytes(leaf.cert_chain_pems[0].bytes())
    (directory / "ca.cer").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems[1:]))
    (directory / "fullchain.cer").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    (directory / "*.example.com.key").write_bytes(leaf.private_key_pem.bytes())

    scan = scan_directory(tmp_path)

    assert scan.problems == []
    [found] = scan.certificates
    assert found.chain_path == directory / "fullchain.cer"  # not the leaf-only file
    assert found.key_path == directory / "*.example.com.key"
    assert found.chain_length == 2
    assert set(found.names) == {"*.example.com", "example.com"}


def test_certbot_and_kubernetes_layouts_follow_symlinks(tmp_path: Path, ca: trustme.CA) -> None:
    # certbot: live/<domain>/{fullchain,privkey}.pem are symlinks into archive/.
    certbot = ca.issue_cert("registry.example.org")
    archive = tmp_path / "archive"
    write_pair(archive, certbot, chain_name="fullchain1.pem", key_name="privkey1.pem")
    live = tmp_path / "live" / "registry.example.org"
    live.mkdir(parents=True)
    (live / "fullchain.pem").symlink_to(archive / "fullchain1.pem")
    (live / "privkey.pem").symlink_to(archive / "privkey1.pem")
    # Kubernetes TLS secret volume: tls.crt/tls.key -> ..data/ -> ..<timestamp>/.
    k8s = ca.issue_cert("mirror.k8s.test")
    secret = tmp_path / "secret"
    write_pair(secret / "..2024_01_01", k8s, chain_name="tls.crt", key_name="tls.key")
    (secret / "..data").symlink_to("..2024_01_01")
    (secret / "tls.crt").symlink_to("..data/tls.crt")
    (secret / "tls.key").symlink_to("..data/tls.key")

    scan = scan_directory(tmp_path)

    names = sorted(n for c in scan.certificates for n in c.names)
    # archive/ and live/ both hold the certbot pair; the dot directories are skipped.
    assert names == ["mirror.k8s.test", "registry.example.org", "registry.example.org"]
    table = build_table(scan)
    assert table.covers("registry.example.org") and table.covers("mirror.k8s.test")


def test_combined_pem_and_per_host_files(tmp_path: Path, ca: trustme.CA) -> None:
    one = ca.issue_cert("one.test")
    (tmp_path / "one.pem").write_bytes(one.private_key_and_cert_chain_pem.bytes())
    two = ca.issue_cert("two.test")
    write_pair(tmp_path, two, chain_name="two.test.crt", key_name="two.test.key")

    table = build_table(scan_directory(tmp_path))

    assert {c.chain_path.name for c in table.certificates} == {"one.pem", "two.test.crt"}


def test_problems_are_reported_and_an_empty_directory_is_an_error(tmp_path: Path,
                                                                  ca: trustme.CA) -> None:
    lonely_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "orphan.key").write_bytes(lonely_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "locked.key").write_bytes(lonely_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret-passphrase")))
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem.bytes())  # a CA bundle alone is fine

    scan = scan_directory(tmp_path)

    assert scan.certificates == []
    assert any("orphan.key" in p and "no certificate" in p for p in scan.problems)
    assert any("locked.key" in p and "encrypted" in p for p in scan.problems)
    assert all("secret-passphrase" not in p for p in scan.problems)
    with pytest.raises(TlsError, match=r"fullchain\.pem"):
        load_table(tmp_path)


# -- choosing a certificate ------------------------------------------------------------


def test_sni_selection_exact_wildcard_and_default(tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(tmp_path / "wild", ca.issue_cert("*.gw.test", "gw.test"))
    write_pair(tmp_path / "hub", ca.issue_cert("hub.gw.test"))
    write_pair(tmp_path / "ip", ca.issue_cert("127.0.0.1"))
    table = build_table(scan_directory(tmp_path))
    by_dir = {c.chain_path.parent.name: table.by_chain[c.chain_path] for c in table.certificates}

    assert table.select("hub.gw.test") is by_dir["hub"]  # exact beats wildcard
    assert table.select("HUB.GW.TEST.") is by_dir["hub"]
    assert table.select("ghcr.gw.test") is by_dir["wild"]
    assert table.select("gw.test") is by_dir["wild"]
    # A wildcard covers one label only; unknown names and no SNI get the default, which
    # prefers the certificate with IP addresses (clients connecting by IP send no SNI).
    assert not table.covers("a.b.gw.test")
    assert table.select("a.b.gw.test") is by_dir["ip"]
    assert table.select(None) is by_dir["ip"]


def test_a_valid_certificate_beats_an_expired_one_and_later_expiry_wins(
        tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(tmp_path / "old", ca.issue_cert(
        "hub.gw.test", not_before=NOW - datetime.timedelta(days=100),
        not_after=NOW - datetime.timedelta(days=1)))
    write_pair(tmp_path / "short", ca.issue_cert(
        "hub.gw.test", not_after=NOW + datetime.timedelta(days=10)))
    write_pair(tmp_path / "long", ca.issue_cert(
        "hub.gw.test", not_after=NOW + datetime.timedelta(days=80)))
    table = build_table(scan_directory(tmp_path))
    chosen = table.select("hub.gw.test")
    assert table.by_chain[tmp_path / "long" / "fullchain.pem"] is chosen


def test_a_half_written_renewal_keeps_the_previous_certificate(tmp_path: Path,
                                                               ca: trustme.CA) -> None:
    write_pair(tmp_path, ca.issue_cert("*.gw.test"))
    first = build_table(scan_directory(tmp_path))
    old_context = first.select("hub.gw.test")
    # The renewal has written the new key but not yet the new chain.
    renewed = ca.issue_cert("*.gw.test")
    (tmp_path / "privkey.pem").write_bytes(renewed.private_key_pem.bytes())

    scan = scan_directory(tmp_path)
    second = build_table(scan, first)

    assert scan.problems, "the mismatch is reported"
    assert second.select("hub.gw.test") is old_context
    # Then the chain lands: the new pair is used.
    (tmp_path / "fullchain.pem").write_bytes(b"".join(p.bytes() for p in renewed.cert_chain_pems))
    third = build_table(scan_directory(tmp_path), second)
    assert third.select("hub.gw.test") is not old_context


async def test_every_certificate_is_loaded_off_the_event_loop(
        tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch) -> None:
    write_pair(tmp_path / "wild", ca.issue_cert("*.gw.test"))
    loop_thread = threading.current_thread()
    loaded_in: list[threading.Thread] = []
    load_cert_chain = ssl.SSLContext.load_cert_chain

    def recording(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loaded_in.append(threading.current_thread())
        load_cert_chain(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", recording)
    tls = TlsCertificates(tmp_path)
    with pytest.raises(RuntimeError):
        tls.context  # noqa: B018  # nothing is loaded before start()
    await tls.start()
    try:
        write_pair(tmp_path / "other", ca.issue_cert("registry.other.test"))
        assert await tls.reload(force=True)
    finally:
        await tls.close()
    # The table's (the first certificate at start, the new one on reload: the unchanged one
    # is reused) and the listener's own.
    assert len(loaded_in) == 3
    assert loop_thread not in loaded_in
    assert tls.context.sni_callback is not None


# -- a real TLS listener -----------------------------------------------------------------


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []
    certificates: list[TlsCertificates] = []

    async def start(directory: Path, *, reload_interval: float = 60.0) -> tuple[int, Any]:
        tls = TlsCertificates(directory, reload_interval=reload_interval)
        await tls.start()
        certificates.append(tls)
        app = web.Application()
        app.router.add_get("/", _hello)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        return server.sockets[0].getsockname()[1], tls

    yield start
    for runner in runners:
        await runner.cleanup()
    for tls in certificates:
        await tls.close()


async def handshake(port: int, server_name: str | None, context: ssl.SSLContext
                    ) -> tuple[list[str], ssl.SSLObject, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname=server_name)
    writer.reader = reader  # type: ignore[attr-defined]  # kept for a later request
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    certificate = x509.load_der_x509_certificate(der)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    return names, ssl_object, writer


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_listener_serves_each_host_its_certificate(tmp_path: Path, ca: trustme.CA,
                                                         tls_server: Any) -> None:
    write_pair(tmp_path / "wild", ca.issue_cert("*.gw.test"))
    write_pair(tmp_path / "other", ca.issue_cert("registry.other.test"))
    port, _ = await tls_server(tmp_path)
    context = client_context(ca)

    for server_name, expected in (("hub.gw.test", ["*.gw.test"]),
                                  ("registry.other.test", ["registry.other.test"])):
        names, ssl_object, writer = await handshake(port, server_name, context)
        assert names == expected  # and it verified against the test CA for that name
        assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        assert ssl_object.selected_alpn_protocol() in (None, "http/1.1")
        writer.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
async def test_old_protocols_and_weak_ciphers_are_refused(tmp_path: Path, ca: trustme.CA,
                                                          tls_server: Any) -> None:
    write_pair(tmp_path, ca.issue_cert("*.gw.test"))
    port, _ = await tls_server(tmp_path)

    old = client_context(ca)
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(port, "hub.gw.test", old)

    cbc = client_context(ca)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(port, "hub.gw.test", cbc)

    modern = client_context(ca)
    modern.maximum_version = ssl.TLSVersion.TLSv1_2
    _, ssl_object, writer = await handshake(port, "hub.gw.test", modern)
    assert "GCM" in ssl_object.cipher()[0] or "CHACHA20" in ssl_object.cipher()[0]
    writer.close()


async def test_replaced_certificate_reaches_new_connections_without_restart(
        tmp_path: Path, ca: trustme.CA, tls_server: Any) -> None:
    write_pair(tmp_path, ca.issue_cert("*.gw.test", not_after=NOW + datetime.timedelta(days=5)))
    port, _ = await tls_server(tmp_path, reload_interval=0.1)
    context = client_context(ca)
    _, before, kept = await handshake(port, "hub.gw.test", context)
    old_serial = x509.load_der_x509_certificate(before.getpeercert(binary_form=True)).serial_number

    renewed = ca.issue_cert("*.gw.test", not_after=NOW + datetime.timedelta(days=90))
    staging = tmp_path.parent / "staging"
    write_pair(staging, renewed)
    for name in ("fullchain.pem", "privkey.pem"):  # how renewal hooks install: rename over
        (staging / name).replace(tmp_path / name)

    deadline = asyncio.get_running_loop().time() + 10
    while True:
        _, after, writer = await handshake(port, "hub.gw.test", context)
        serial = x509.load_der_x509_certificate(after.getpeercert(binary_form=True)).serial_number
        writer.close()
        if serial != old_serial:
            break
        assert asyncio.get_running_loop().time() < deadline, "new certificate never served"
        await asyncio.sleep(0.05)
    assert serial == x509.load_pem_x509_certificate(
        renewed.cert_chain_pems[0].bytes()).serial_number
    # The connection made before the renewal still works.
    kept.write(b"GET / HTTP/1.1\r\nHost: hub.gw.test\r\nConnection: close\r\n\r\n")
    assert b"hello" in await asyncio.wait_for(kept.reader.read(), 10)  # type: ignore[attr-defined]
    kept.close()


async def test_start_without_certificates_fails_clearly(tmp_path: Path) -> None:
    tls = TlsCertificates(tmp_path)
    with pytest.raises(TlsError, match=re.escape(str(tmp_path))):
        await tls.start()
