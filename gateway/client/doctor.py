"""`registry-gateway doctor`: from a client machine, check that the gateway answers, that
its TLS certificate verifies, which routes it serves, and whether the local Docker
daemon uses it; every problem is printed with its fix. Reads nothing secret.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import aiohttp

from ..wire import ROUTES_PATH
from .checkup import Checkup, Report
from .doctor_docker import check_docker
from .doctor_tls import check_tls
from .source import info_from_listing, listing_refused, tls_context
from .target import ClientConfError, GatewayInfo, Target, probe_hosts


class Doctor:
    def __init__(self, target: Target, *, ca: Path | None, timeout: float,
                 docker_host: str | None, daemon_json: Path, docker_certs_dir: Path,
                 command: str = "registry-gateway") -> None:
        self.checkup = Checkup(target, ca, timeout, docker_host, daemon_json,
                               docker_certs_dir, command)
        self.target = target
        self.report = Report()
        self._checked: dict[str, str] = {}

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
            await check_docker(self.checkup, self.report, info)
        return self.report

    # -- one host: name, connection, TLS, the registry API ---------------------------

    async def check_host(self, host: str) -> str:
        """ok, unreachable (name or connection), or broken (TLS or the API)."""
        if host not in self._checked:
            self._checked[host] = await self._check_host(host)
        return self._checked[host]

    async def _check_host(self, host: str) -> str:
        port = self.checkup.port
        where = self.target.netloc(host)
        loop = asyncio.get_running_loop()
        try:
            addresses = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self.checkup.timeout)
        except (OSError, TimeoutError) as exc:
            self.report.problem(
                f"{host} does not resolve ({exc})",
                f"point a DNS record at the gateway: {self._dns_hint(host)}, or add "
                f"{host} to /etc/hosts on this machine")
            return "unreachable"
        shown = ", ".join(dict.fromkeys(str(a[4][0]) for a in addresses))
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                               self.checkup.timeout)
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
        if self.target.scheme == "https" and \
                not await check_tls(self.checkup, self.report, host, where):
            return "broken"
        return "ok" if await self._check_api(host) else "broken"

    def _dns_hint(self, host: str) -> str:
        if self.target.base_domain:
            return f"a wildcard *.{self.target.host} (or {host}) A/AAAA record"
        return f"an A/AAAA record for {host}"

    async def _check_api(self, host: str) -> bool:
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
        if status == 403 and version.startswith("registry/2"):
            self.report.problem(f"{url} answered 403: the gateway refuses this machine's "
                                "address", "in the gateway's routes.yaml, add this machine's "
                                "address to access.allow, or take it out of access.deny")
            return False
        if status not in (200, 401) or not version.startswith("registry/2"):
            self.report.problem(f"{url} answered {status} without the registry API header",
                                "something else answers here; if a proxy is in front, it "
                                "must pass /v2/ through to the gateway")
            return False
        self.report.ok(f"{url} answers the registry API")
        return True

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.checkup.timeout),
                                     trust_env=False)

    def _ssl(self) -> ssl.SSLContext | bool:
        return tls_context(self.checkup.ca) if self.target.scheme == "https" else False

    # -- routes --------------------------------------------------------------------------

    async def routes(self, base: str) -> GatewayInfo | None:
        url = base + ROUTES_PATH
        try:
            async with self._session() as session, session.get(
                    url, ssl=self._ssl(), allow_redirects=False) as response:
                if listing_refused(url, response.status) is not None:
                    self.report.problem(
                        f"{url} answered {response.status}: the gateway lists its routes "
                        "only to the addresses in access.admin",
                        "add this machine's address to access.admin in the gateway's "
                        "routes.yaml, or give `registry-gateway client` --routes with a "
                        "copy of that routes.yaml")
                    return None
                if response.status != 200:
                    self.report.problem(f"{url} answered {response.status}",
                                        "update the gateway (it publishes its routes since "
                                        "0.1.0), or check that a proxy passes the path through")
                    return None
                document = await response.json(content_type=None)
            info = info_from_listing(document, f"the gateway at {base}")
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
