"""`registry-gateway doctor`: from a client machine, check that the gateway answers, that
its TLS certificate verifies, which routes it serves, and whether the local Docker
daemon uses it; every problem is printed with its fix. Reads nothing secret.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import socket
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from cryptography import x509
from cryptography.x509.oid import NameOID

from .clientconf import (
    DOCKER_HUB,
    ROUTES_PATH,
    ClientConfError,
    GatewayInfo,
    Target,
    docker_hub_mirror,
    parse_target,
    probe_hosts,
    probe_urls,
    read_ca,
    tls_context,
)

# OpenSSL verify codes (x509_vfy.h) that mean "signed by a CA this machine does not trust".
_UNTRUSTED = {2, 18, 19, 20, 21, 27}
_EXPIRED, _NOT_YET_VALID, _HOSTNAME_MISMATCH = 10, 9, 62


@dataclass
class Finding:
    ok: bool
    message: str
    fix: str = ""


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def ok(self, message: str) -> None:
        self.findings.append(Finding(True, message))

    def problem(self, message: str, fix: str) -> None:
        self.findings.append(Finding(False, message, fix))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def render(self) -> str:
        lines = []
        for finding in self.findings:
            lines.append(f"  {'ok' if finding.ok else 'PROBLEM':<8} {finding.message}")
            for number, line in enumerate(finding.fix.splitlines()):
                lines.append(f"  {'':<8} {'fix:' if number == 0 else '':<4} {line}")
        count = len(self.problems)
        lines.append(f"{count} problem{'s' if count != 1 else ''} found." if count
                     else "No problems found.")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PeerCertificate:
    names: tuple[str, ...]
    issuer: str
    not_after: datetime.datetime


def _describe_certificate(der: bytes) -> PeerCertificate:
    certificate = x509.load_der_x509_certificate(der)
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName)) + tuple(
            str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        names = ()
    issuer_names = certificate.issuer.get_attributes_for_oid(NameOID.COMMON_NAME) or \
        certificate.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    issuer = str(issuer_names[0].value) if issuer_names else certificate.issuer.rfc4514_string()
    return PeerCertificate(names, issuer, certificate.not_valid_after_utc)


class Doctor:
    def __init__(self, target: Target, *, ca: Path | None, timeout: float,
                 docker_host: str | None, daemon_json: Path, docker_certs_dir: Path,
                 command: str = "registry-gateway") -> None:
        self.target = target
        self.ca = ca
        self.timeout = timeout
        self.docker_host = docker_host
        self.daemon_json = daemon_json
        self.docker_certs_dir = docker_certs_dir
        self.command = command
        self.report = Report()
        self._checked: dict[str, str] = {}

    @property
    def _name(self) -> str:
        """The gateway as `client` wants it."""
        if self.target.base_domain:
            return self.target.netloc(self.target.host)
        return self.target.url()

    @property
    def _ca_option(self) -> str:
        return f" --ca {self.ca}" if self.ca else ""

    async def run(self) -> Report:
        for host in probe_hosts(self.target):
            outcome = await self.check_host(host)
            if outcome == "ok":
                break
            if outcome != "unreachable":  # the next host would say the same
                return self.report
        else:
            return self.report
        info = await self.routes(self.target.url(host))
        if info is not None:
            for endpoint in self.target.endpoints(info):
                await self.check_host(endpoint.host)
            await self.docker(info)
        return self.report

    # -- one host: name, connection, TLS, the registry API ---------------------------

    async def check_host(self, host: str) -> str:
        """ok, unreachable (name or connection), or broken (TLS or the API)."""
        if host not in self._checked:
            self._checked[host] = await self._check_host(host)
        return self._checked[host]

    def _port(self) -> int:
        return self.target.port or (443 if self.target.scheme == "https" else 80)

    async def _check_host(self, host: str) -> str:
        port = self._port()
        where = self.target.netloc(host)
        loop = asyncio.get_running_loop()
        try:
            addresses = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self.timeout)
        except (OSError, TimeoutError) as exc:
            self.report.problem(
                f"{host} does not resolve ({exc})",
                f"point a DNS record at the gateway: {self._dns_hint(host)}, or add "
                f"{host} to /etc/hosts on this machine")
            return "unreachable"
        shown = ", ".join(dict.fromkeys(str(a[4][0]) for a in addresses))
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                               self.timeout)
            writer.close()
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else \
                "connection refused" if isinstance(exc, ConnectionRefusedError) else \
                (exc.strerror or str(exc))
            self.report.problem(
                f"cannot connect to {where} ({shown}): {reason}",
                f"check that the gateway runs and listens there (registry-gateway serve "
                f"--tls-listen 0.0.0.0:{port} ...), and that firewalls let port {port} through")
            return "unreachable"
        if self.target.scheme == "https" and not await self._check_tls(host, port, where):
            return "broken"
        return "ok" if await self._check_api(host, where) else "broken"

    def _dns_hint(self, host: str) -> str:
        if self.target.base_domain:
            return f"a wildcard *.{self.target.host} (or {host}) A/AAAA record"
        return f"an A/AAAA record for {host}"

    async def _peer_certificate(self, host: str, port: int) -> PeerCertificate | None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(
                host, port, ssl=context, server_hostname=host), self.timeout)
        except (OSError, TimeoutError, ssl.SSLError):
            return None
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            return _describe_certificate(der) if der else None
        finally:
            writer.close()

    async def _check_tls(self, host: str, port: int, where: str) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(
                host, port, ssl=tls_context(self.ca), server_hostname=host), self.timeout)
        except ssl.SSLCertVerificationError as exc:
            peer = await self._peer_certificate(host, port)
            self._tls_problem(host, where, exc, peer)
            return False
        except ssl.SSLError as exc:
            self.report.problem(
                f"{where} does not complete a TLS handshake ({exc.reason or exc})",
                "if it serves plain HTTP, use http:// (Docker only allows that for "
                "localhost); otherwise serve TLS with --tls-listen and a certificate in certs/")
            return False
        except (OSError, TimeoutError) as exc:
            self.report.problem(f"TLS handshake with {where} failed: {exc or 'timed out'}",
                                "check that the port is the gateway's TLS listener")
            return False
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        writer.close()
        if der:
            peer = _describe_certificate(der)
            days = (peer.not_after - datetime.datetime.now(datetime.UTC)).days
            self.report.ok(f"{where}: TLS verifies (certificate for {', '.join(peer.names)}, "
                           f"issued by {peer.issuer}, valid {days} more days)")
            if days < 14:
                self.report.problem(
                    f"the certificate of {where} expires in {days} days",
                    "renew it (acme.sh --renew / certbot renew); the gateway picks up the "
                    "new files from certs/ without a restart")
        return True

    def _tls_problem(self, host: str, where: str, exc: ssl.SSLCertVerificationError,
                     peer: PeerCertificate | None) -> None:
        code = exc.verify_code
        detail = f" (it names {', '.join(peer.names) or 'nothing'}; issued by " \
                 f"{peer.issuer})" if peer else ""
        if code in _UNTRUSTED:
            trusted = f"the CA in {self.ca}" if self.ca else "a CA this machine trusts"
            fix = (f"if the gateway uses a private CA, give it here: --ca ca.crt, and to the "
                   f"runtimes: {self.command} client docker {self._name} --ca ca.crt "
                   f"(writes {self.docker_certs_dir}/{where}/ca.crt)")
            if self.ca:
                fix = (f"{self.ca} is not the CA that signed the gateway's certificate: use "
                       "the CA certificate that issued the files in the gateway's certs/ "
                       "directory (the ca.cer/chain of your issuer), or issue a certificate "
                       "from that CA")
            if peer is not None and peer.issuer and not self.ca:
                fix += ("\nif it should be publicly trusted, check that the gateway's certs/ "
                        "holds the full chain (fullchain.pem / fullchain.cer), not the "
                        "certificate alone")
            self.report.problem(f"{where}: the certificate is not signed by {trusted}"
                                f"{detail}", fix)
        elif code == _HOSTNAME_MISMATCH:
            domain = self.target.host if self.target.base_domain else host.partition(".")[2]
            self.report.problem(
                f"{where}: the certificate does not cover {host}{detail}",
                f"issue one for {domain} and *.{domain} (acme.sh --issue --dns ... -d {domain} "
                f"-d '*.{domain}') and put it in the gateway's certs/ directory; it is "
                "picked up without a restart")
        elif code in (_EXPIRED, _NOT_YET_VALID):
            self.report.problem(
                f"{where}: the certificate is {'expired' if code == _EXPIRED else 'not yet valid'}"
                f"{detail}",
                "renew it and replace the files in the gateway's certs/ directory (no restart "
                "needed); check this machine's clock too")
        else:
            self.report.problem(f"{where}: the certificate does not verify: "
                                f"{exc.verify_message}{detail}",
                                "serve a certificate from a trusted CA for this host name")

    async def _check_api(self, host: str, where: str) -> bool:
        url = f"{self.target.url(host)}/v2/"
        try:
            async with self._session() as session, session.get(
                    url, ssl=self._ssl(), allow_redirects=False) as response:
                status = response.status
                version = response.headers.get("Docker-Distribution-API-Version", "")
                location = response.headers.get("Location", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.report.problem(f"GET {url} failed: {exc or 'timed out'}",
                                "check the gateway's log for this request")
            return False
        if status in (301, 302, 307, 308):
            self.report.problem(f"{url} redirects to {location}",
                                f"use the address it redirects to (e.g. https://{host})")
            return False
        if status not in (200, 401) or not version.startswith("registry/2"):
            self.report.problem(f"{url} answered {status} without the registry API header",
                                "something else answers here; if a proxy is in front, it "
                                "must pass /v2/ through to the gateway")
            return False
        self.report.ok(f"{url} answers the registry API")
        return True

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                     trust_env=False)

    def _ssl(self) -> ssl.SSLContext | bool:
        return tls_context(self.ca) if self.target.scheme == "https" else False

    # -- routes --------------------------------------------------------------------------

    async def routes(self, base: str) -> GatewayInfo | None:
        url = base + ROUTES_PATH
        try:
            async with self._session() as session, session.get(
                    url, ssl=self._ssl(), allow_redirects=False) as response:
                if response.status != 200:
                    self.report.problem(f"{url} answered {response.status}",
                                        "update the gateway (it publishes its routes since "
                                        "0.1.0), or check that a proxy passes the path through")
                    return None
                document = await response.json(content_type=None)
            info = GatewayInfo.from_document(document, f"the gateway at {base}")
        except (aiohttp.ClientError, TimeoutError, ValueError, ClientConfError) as exc:
            self.report.problem(f"cannot read the gateway's routes from {url}: {exc}",
                                "check the gateway's log for this request")
            return None
        shown = []
        for endpoint in self.target.endpoints(info):
            shown.append(f"{endpoint.route} -> {endpoint.location}")
        self.report.ok(f"{len(info.routes)} routes: " + "; ".join(shown))
        if self.target.base_domain and info.base_domains and \
                self.target.host not in info.base_domains:
            self.report.problem(
                f"the gateway routes labels under {', '.join(info.base_domains)}, not "
                f"{self.target.host}",
                f"use one of those domains, or add {self.target.host} to base_domains in the "
                "gateway's routes.yaml")
        return info

    # -- the local Docker daemon ---------------------------------------------------------

    async def docker(self, info: GatewayInfo) -> None:
        mirror = docker_hub_mirror(self.target, info)
        if mirror is None or self.docker_host is None:
            return
        if not self.docker_host.startswith("unix://"):
            self.report.ok(f"Docker daemon at {self.docker_host}: not checked (only unix:// "
                           "sockets are)")
            return
        path = self.docker_host[len("unix://"):]
        try:
            connector = aiohttp.UnixConnector(path=path)
            async with aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as session, session.get("http://docker/info") as response:
                document = await response.json(content_type=None)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, FileNotFoundError | ConnectionRefusedError):
                self.report.ok(f"no Docker daemon at {path}: skipped")
                return
            self.report.problem(f"cannot ask the Docker daemon at {path}: {exc.os_error}",
                                "run doctor as a user in the docker group (or with sudo)")
            return
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            self.report.problem(f"cannot ask the Docker daemon at {path}: {exc}",
                                "run doctor as a user in the docker group (or with sudo)")
            return
        mirrors = [str(m).rstrip("/") for m in
                   (document.get("RegistryConfig") or {}).get("Mirrors") or []]
        fix_command = f"sudo {self.command} client docker {self._name}{self._ca_option}"
        if mirror.url in mirrors:
            position = mirrors.index(mirror.url)
            self.report.ok(f"the Docker daemon uses {mirror.url} as its docker.io mirror" +
                           (f" (after {', '.join(mirrors[:position])})" if position else ""))
        elif mirror.url in await asyncio.to_thread(self._daemon_json_mirrors):
            self.report.problem(f"{self.daemon_json} lists {mirror.url} but the running "
                                "Docker daemon does not use it yet",
                                "sudo systemctl reload docker")
        else:
            shown = ", ".join(mirrors) or "none"
            self.report.problem(f"the Docker daemon does not use the gateway for docker.io "
                                f"(its registry-mirrors: {shown})",
                                f"{fix_command} && sudo systemctl reload docker")
        if self.ca is not None:
            netlocs = dict.fromkeys([mirror.netloc] + [
                e.netloc for e in self.target.endpoints(info) if e.route != DOCKER_HUB])
            missing = await asyncio.to_thread(lambda: [
                n for n in netlocs if not (self.docker_certs_dir / n / "ca.crt").exists()])
            if missing:
                self.report.problem(
                    "Docker does not trust the gateway's CA for "
                    f"{', '.join(missing)} (no ca.crt in {self.docker_certs_dir})",
                    fix_command)

    def _daemon_json_mirrors(self) -> list[str]:
        try:
            document: Any = json.loads(self.daemon_json.read_text())
            return [str(m).rstrip("/") for m in document.get("registry-mirrors", [])]
        except (OSError, ValueError, AttributeError, TypeError):
            return []


def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    out: TextIO = sys.stdout
    try:
        target = parse_target(args.gateway)
        read_ca(args.ca)
    except ClientConfError as exc:
        print(f"registry-gateway doctor: {exc}", file=sys.stderr)
        return 2
    docker_host = args.docker_host or env.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    doctor = Doctor(target, ca=args.ca, timeout=args.timeout, docker_host=docker_host,
                    daemon_json=args.daemon_json, docker_certs_dir=args.docker_certs_dir)
    print(f"registry-gateway doctor: checking {probe_urls(target)[0]} from this machine",
          file=out)
    report = asyncio.run(doctor.run())
    out.write(report.render())
    return 1 if report.problems else 0


def add_command(sub: Any) -> None:
    doctor = sub.add_parser("doctor", help="check from a client machine that the gateway "
                            "works and that this machine uses it")
    doctor.add_argument("gateway", help="base domain (example.com) or URL "
                        "(https://mirror.example.com), as given to `client`")
    doctor.add_argument("--ca", type=Path, help="the gateway's private CA, if it uses one")
    doctor.add_argument("--timeout", type=float, default=5.0, help="seconds per check")
    doctor.add_argument("--docker-host", help="Docker daemon socket (default: $DOCKER_HOST "
                        "or unix:///var/run/docker.sock)")
    doctor.add_argument("--daemon-json", type=Path, default=Path("/etc/docker/daemon.json"))
    doctor.add_argument("--docker-certs-dir", type=Path, default=Path("/etc/docker/certs.d"))
    doctor.set_defaults(run=_run)
