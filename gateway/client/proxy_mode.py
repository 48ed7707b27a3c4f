"""`client docker|containerd --proxy URL`: the systemd drop-in that points the daemon at
the gateway's forward proxy (HTTPS_PROXY, NO_PROXY) and the proxy CA where each daemon
reads it. Builds a Plan; writes nothing itself.

Where the CA must go, as the daemons read it: dockerd checks Docker Hub against the
system roots only (certs.d is read for other registries), so the drop-in adds a CA
directory to Go's roots with SSL_CERT_DIR and certs.d/<host>/ca.crt covers the rest;
containerd reads the `ca` of each registry's hosts.toml (CRI and `ctr --hosts-dir`).
"""

from __future__ import annotations

from pathlib import Path

from yarl import URL

from .plan import FileWrite, Plan, quoted
from .target import DOCKER_HUB, ClientConfError, GatewayInfo

DROP_IN = "http-proxy.conf"
NO_PROXY = ("localhost", "127.0.0.1", "::1")
SYSTEM_CERT_DIR = "/etc/ssl/certs"  # Go's first default; SSL_CERT_DIR replaces the list
CA_NAME = "registry-gateway-proxy-ca.crt"


def proxy_url(text: str) -> str:
    """`http://HOST:PORT` (a login as http://USER:PASSWORD@HOST:PORT is kept as given)."""
    try:
        url = URL(text.strip())
    except ValueError:
        url = URL()
    if url.scheme != "http" or not url.host or url.path not in ("", "/") or url.query_string:
        raise ClientConfError(f"{text!r}: --proxy wants the gateway's proxy listener as "
                              "http://HOST:PORT (serve --proxy-listen)")
    return str(url.with_path(""))


def registry_hosts(info: GatewayInfo) -> list[str]:
    """The registry host names clients reach through the proxy, per route."""
    hosts: list[str] = []
    for route in info.routes:
        hosts += [route.name, *route.aliases]
        if route.name == DOCKER_HUB:
            hosts.append("registry-1.docker.io")
    return list(dict.fromkeys(h.split(":", 1)[0] for h in hosts))


def _environment(value: str) -> str:
    # systemd expands %-specifiers inside Environment= (a password may hold a %).
    return f"Environment={quoted(value.replace('%', '%%'))}"


def drop_in(proxy: str, no_proxy: list[str], cert_dir: str | None, unit: str) -> bytes:
    lines = [f"# registry-gateway: {unit} pulls through the gateway's forward proxy",
             "# (https only: HTTP_PROXY stays unset; the proxy refuses plain http).",
             "[Service]",
             _environment("HTTPS_PROXY=" + proxy),
             _environment("NO_PROXY=" + ",".join(no_proxy))]
    if cert_dir is not None:
        lines += ["# The gateway's CA next to the system roots, for this daemon only.",
                  _environment(f"SSL_CERT_DIR={SYSTEM_CERT_DIR}:{cert_dir}")]
    return ("\n".join(lines) + "\n").encode()


def _secret_free(proxy: str) -> str:
    url = URL(proxy)
    return str(url.with_password("***")) if url.password else proxy


class _Under:
    """Paths as the daemon sees them, written under `root` (tests, images being built)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def __call__(self, path: Path) -> Path:
        return path if self.root is None else self.root / path.relative_to(path.anchor)


def _daemon_writes(unit: str, proxy: str, no_proxy: list[str], *, systemd_dir: Path,
                   ca_dir: Path, ca: tuple[Path, bytes] | None, under: _Under) -> list[FileWrite]:
    """The unit's drop-in (0600: a proxy login may be in it) and the CA it points at."""
    writes = [FileWrite(under(systemd_dir / f"{unit}.service.d" / DROP_IN), drop_in(
        proxy, no_proxy, str(ca_dir) if ca else None, unit), mode=0o600,
        summary=None if "@" not in proxy else f"(HTTPS_PROXY={_secret_free(proxy)}, ...)")]
    if ca is not None:
        writes.append(FileWrite(under(ca_dir / CA_NAME), ca[1],
                                summary=f"(the CA certificate from {ca[0]})"))
    return writes


def docker_proxy_plan(info: GatewayInfo, proxy: str, *, systemd_dir: Path, certs_dir: Path,
                      ca_dir: Path, ca: tuple[Path, bytes] | None,
                      no_proxy: list[str], root: Path | None = None) -> Plan:
    under = _Under(root)
    plan = Plan(_daemon_writes("docker", proxy, no_proxy, systemd_dir=systemd_dir,
                               ca_dir=ca_dir, ca=ca, under=under))
    hosts = registry_hosts(info)
    if ca is not None:
        source, pem = ca
        # certs.d is read per registry host, but never for Docker Hub (SSL_CERT_DIR covers it).
        plan.writes += [FileWrite(under(certs_dir / host / "ca.crt"), pem,
                                  summary=f"(the CA certificate from {source})")
                        for host in hosts if host not in ("docker.io", "registry-1.docker.io",
                                                          "index.docker.io")]
    plan.notes += _notes("docker", hosts, ca is not None)
    return plan


def containerd_proxy_plan(info: GatewayInfo, proxy: str, *, systemd_dir: Path,
                          config_path: Path, ca_dir: Path, ca: tuple[Path, bytes] | None,
                          no_proxy: list[str], root: Path | None = None) -> Plan:
    under = _Under(root)
    plan = Plan(_daemon_writes("containerd", proxy, no_proxy, systemd_dir=systemd_dir,
                               ca_dir=ca_dir, ca=ca, under=under))
    for route in info.routes:
        server = "https://registry-1.docker.io" if route.name == DOCKER_HUB \
            else f"https://{route.name}"
        lines = [f"# registry-gateway: {route.name} through the gateway's forward proxy "
                 "(HTTPS_PROXY in containerd's environment);",
                 "# the proxy answers for the registry with a certificate from its CA.",
                 f"server = {quoted(server)}"]
        directory = config_path / route.name.replace(":", "_")
        if ca is not None:
            lines.append('ca = "ca.crt"')
            plan.writes.append(FileWrite(under(directory / "ca.crt"), ca[1],
                                         summary=f"(the CA certificate from {ca[0]})"))
        plan.writes.append(FileWrite(under(directory / "hosts.toml"),
                                     ("\n".join(lines) + "\n").encode()))
    plan.notes += _notes("containerd", registry_hosts(info), ca is not None)
    plan.notes.append(f"ctr: HTTPS_PROXY={_secret_free(proxy)} ctr images pull --hosts-dir "
                      f"{config_path} IMAGE")
    return plan


def _notes(unit: str, hosts: list[str], with_ca: bool) -> list[str]:
    notes = [f"Apply it: sudo systemctl daemon-reload && sudo systemctl restart {unit}",
             f"Every HTTPS connection {unit} makes now goes to the proxy, which lets through "
             "only the gateway's registry hosts:", "  " + ", ".join(hosts),
             "Put other hosts the daemon must reach directly in --no-proxy."]
    if not with_ca:
        notes.append("No CA given (--ca): if the gateway has forward_proxy.ca the daemon will "
                     "refuse its certificates; without one, pulls are tunnelled, NOT cached.")
    return notes
