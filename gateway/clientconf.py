"""`registry-gateway client`: the configuration each container runtime needs to pull
through the gateway — Docker's daemon.json, containerd's hosts.toml, the containers
registries.conf.d drop-in (podman, skopeo, buildah, CRI-O), k3s/rke2 registries.yaml.

Each writer first builds a `Plan` (pure: files and their bytes), which `--dry-run`
prints and `apply` writes atomically, keeping a backup of a file it replaces. Runs on
client machines: it asks the gateway for its routes (`/_gateway/routes`) and never
needs routes.yaml or any secret.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import ssl
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from cryptography import x509
from yarl import URL

from .config import PRESETS, Config, load_config_file
from .errors import ConfigError

ROUTES_PATH = "/_gateway/routes"
DOCKER_HUB = "docker.io"
DROP_IN_NAME = "50-registry-gateway.conf"
_HOST_RE = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                      r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


class ClientConfError(Exception):
    """A problem the user must fix; the message says how. Nothing was written."""


# ---------------------------------------------------------------- what the gateway serves


@dataclass(frozen=True)
class RouteInfo:
    name: str  # the registry clients name: docker.io, ghcr.io
    label: str | None = None  # <label>.<base domain> picks this route
    hosts: tuple[str, ...] = ()  # exact host names that pick this route


@dataclass(frozen=True)
class GatewayInfo:
    routes: tuple[RouteInfo, ...]
    base_domains: tuple[str, ...] = ()
    default_route: str | None = None
    source: str = "presets"  # where this came from, for messages

    def route(self, name: str) -> RouteInfo | None:
        return next((r for r in self.routes if r.name == name), None)

    @classmethod
    def presets(cls, base_domain: str | None) -> GatewayInfo:
        """Every preset under its standard label, as the example routes.yaml serves them."""
        return cls(tuple(RouteInfo(name, preset.label) for name, preset in PRESETS.items()),
                   (base_domain,) if base_domain else (), DOCKER_HUB,
                   "the preset routes (--presets)")

    @classmethod
    def from_config(cls, config: Config) -> GatewayInfo:
        return cls(tuple(RouteInfo(r.name, r.label, r.hosts) for r in config.routes),
                   config.base_domains, config.default_route, config.source)

    @classmethod
    def from_document(cls, document: Any, source: str) -> GatewayInfo:
        """Parse `/_gateway/routes` (server.gateway_routes) defensively."""
        try:
            routes = tuple(
                RouteInfo(str(r["name"]).lower(), str(r["label"]) if r.get("label") else None,
                          tuple(str(h).lower() for h in r.get("hosts") or ()))
                for r in document["routes"])
            base_domains = tuple(str(d).lower() for d in document.get("base_domains") or ())
            default = document.get("default_route")
        except (KeyError, TypeError, AttributeError):
            raise ClientConfError(f"{source} did not answer with a route list; is it a "
                                  "registry-gateway?") from None
        if not routes:
            raise ClientConfError(f"{source} serves no routes")
        return cls(routes, base_domains, str(default) if default else None, source)


@dataclass(frozen=True)
class Endpoint:
    """Where clients reach one route: a host of its own, or a shared host plus the
    registry name as a path prefix (/v2/ghcr.io/...) or containerd's ns= parameter."""

    route: str
    scheme: str
    host: str
    netloc: str  # host[:port]
    prefix: str = ""  # "" or the registry name

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @property
    def location(self) -> str:
        """host[:port][/prefix]: what an image reference starts with."""
        return f"{self.netloc}/{self.prefix}" if self.prefix else self.netloc


@dataclass(frozen=True)
class Target:
    """The gateway as the user named it: a base domain (`example.com[:port]`, one host per
    route: hub.example.com, ghcr.example.com) or a URL (`https://mirror.example.com`, one
    host for everything)."""

    scheme: str
    host: str
    port: int | None
    base_domain: bool

    def netloc(self, host: str) -> str:
        default = 443 if self.scheme == "https" else 80
        return host if self.port in (None, default) else f"{host}:{self.port}"

    def url(self, host: str | None = None) -> str:
        return f"{self.scheme}://{self.netloc(host or self.host)}"

    def endpoint(self, route: RouteInfo, info: GatewayInfo) -> Endpoint:
        host, prefix = self.host, route.name
        if self.base_domain:
            if route.label and self.host in info.base_domains:
                host, prefix = f"{route.label}.{self.host}", ""
            elif route.hosts:
                host, prefix = route.hosts[0], ""
        return Endpoint(route.name, self.scheme, host, self.netloc(host), prefix)

    def endpoints(self, info: GatewayInfo) -> list[Endpoint]:
        return [self.endpoint(route, info) for route in info.routes]


def parse_target(text: str) -> Target:
    """`example.com`, `example.com:8443` (base domain) or `https://mirror.example.com`."""
    text = text.strip()
    if "://" in text:
        try:
            url = URL(text)
        except ValueError:
            url = URL()
        if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/") \
                or url.query_string or url.fragment or url.user:
            raise ClientConfError(f"{text!r} is not a gateway URL like https://mirror.example.com "
                                  "(no path), nor a base domain like example.com")
        return Target(url.scheme, url.host.lower().rstrip("."), url.explicit_port, False)
    host, port = text.lower(), None
    if ":" in host:
        host, _, port_text = host.rpartition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ClientConfError(f"{text!r}: the port must be a number")
        port = int(port_text)
    host = host.rstrip(".")
    if not _HOST_RE.fullmatch(host) or "." not in host:
        raise ClientConfError(f"{text!r} is not a base domain like example.com (the gateway "
                              "answers on hub.example.com, ghcr.example.com, ...) nor a URL "
                              "like https://mirror.example.com")
    return Target("https", host, port, True)


def check_target(target: Target, info: GatewayInfo) -> None:
    """Refuse targets that would route wrongly, saying what to give instead."""
    if target.base_domain:
        labelled = [r for r in info.routes if r.label]
        if labelled and info.base_domains and target.host not in info.base_domains:
            raise ClientConfError(
                f"{info.source} serves labels under {', '.join(info.base_domains)}, not under "
                f"{target.host}: give one of those base domains, or add {target.host} to "
                "base_domains in the gateway's routes.yaml")
        return
    owner = _route_for_host(target.host, info)
    if owner is not None:
        raise ClientConfError(
            f"{target.host} is a host of the {owner} route, so every request to it goes to "
            f"{owner}. Give the base domain instead ({_suggest_domain(target.host, info)}), or "
            "a URL whose host no route claims (e.g. https://mirror.<your domain>)")


def _route_for_host(host: str, info: GatewayInfo) -> str | None:
    for route in info.routes:
        if host in route.hosts:
            return route.name
        for domain in info.base_domains:
            if route.label and host == f"{route.label}.{domain}":
                return route.name
    return None


def _suggest_domain(host: str, info: GatewayInfo) -> str:
    for domain in info.base_domains:
        if host.endswith("." + domain):
            return domain
    return host.partition(".")[2] or host


def docker_hub_mirror(target: Target, info: GatewayInfo) -> Endpoint | None:
    """The URL for daemon.json registry-mirrors: Docker sends plain /v2/library/... there,
    so it needs a host that picks the docker.io route (or falls to it by default)."""
    hub = info.route(DOCKER_HUB)
    if hub is None:
        return None
    endpoint = target.endpoint(hub, info)
    if not endpoint.prefix:
        return endpoint
    if info.default_route == DOCKER_HUB:
        return Endpoint(DOCKER_HUB, endpoint.scheme, endpoint.host, endpoint.netloc)
    return None


# ---------------------------------------------------------------- plans and writing them


@dataclass(frozen=True)
class FileWrite:
    path: Path
    content: bytes
    mode: int = 0o644
    backup: bool = False  # keep a copy of the file this replaces
    summary: str | None = None  # printed by --dry-run instead of the content


@dataclass
class Plan:
    writes: list[FileWrite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        """What --dry-run prints: each file with its content, then the notes."""
        parts = []
        for write in self.writes:
            body = write.summary or write.content.decode().rstrip("\n")
            parts.append(f"# {write.path}\n{body}\n")
        if self.notes:
            parts.append("\n".join(self.notes) + "\n")
        return "\n".join(parts)


def _ca_writes(ca: tuple[Path, bytes] | None, directory: Path,
               netlocs: list[str]) -> list[FileWrite]:
    if ca is None:
        return []
    source, pem = ca
    return [FileWrite(directory / netloc / "ca.crt", pem,
                      summary=f"(the CA certificate from {source})")
            for netloc in dict.fromkeys(netlocs)]


def _json_document(text: str | None, path: Path) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClientConfError(f"{path} is not valid JSON (line {exc.lineno}, column "
                              f"{exc.colno}: {exc.msg}); fix it first, nothing was "
                              "written") from None
    if not isinstance(document, dict):
        raise ClientConfError(f"{path} must hold a JSON object; nothing was written")
    return document


def _merge_list(document: dict[str, Any], key: str, first: list[str], path: Path,
                normalise: Callable[[str], str]) -> None:
    existing = document.get(key, [])
    if not isinstance(existing, list) or not all(isinstance(v, str) for v in existing):
        raise ClientConfError(f"{path}: {key!r} must be a list of strings; nothing was written")
    ours = {normalise(v) for v in first}
    document[key] = [*first, *(v for v in existing if normalise(v) not in ours)]


def merge_daemon_json(text: str | None, path: Path, mirror: str | None,
                      insecure: list[str]) -> str:
    """daemon.json with the mirror first in registry-mirrors; every other key kept."""
    document = _json_document(text, path)
    if mirror is not None:
        _merge_list(document, "registry-mirrors", [mirror], path, lambda v: v.rstrip("/"))
    if insecure:
        _merge_list(document, "insecure-registries", insecure, path, lambda v: v)
    merged = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if json.loads(merged) != document:  # what Docker will read is what we meant
        raise ClientConfError(f"{path}: the merged document does not read back; nothing written")
    return merged


def docker_plan(info: GatewayInfo, target: Target, *, daemon_json: Path,
                existing: str | None, certs_dir: Path,
                ca: tuple[Path, bytes] | None = None) -> Plan:
    check_target(target, info)
    plan = Plan()
    mirror = docker_hub_mirror(target, info)
    endpoints = [e for e in target.endpoints(info) if e.route != DOCKER_HUB]
    netlocs = ([mirror.netloc] if mirror else []) + [e.netloc for e in endpoints]
    insecure = list(dict.fromkeys(netlocs)) if target.scheme == "http" else []
    merged = merge_daemon_json(existing, daemon_json, mirror.url if mirror else None, insecure)
    plan.writes.append(FileWrite(daemon_json, merged.encode(), backup=True))
    plan.writes += _ca_writes(ca, certs_dir, netlocs)
    if mirror is not None:
        plan.notes += [f"docker.io: pulls go through {mirror.url} (registry-mirrors); Docker",
                       "  still falls back to Docker Hub itself when the mirror fails.",
                       "Apply it: sudo systemctl reload docker  (dockerd re-reads "
                       "registry-mirrors on SIGHUP)"]
    else:
        plan.notes.append(f"docker.io: {info.source} has no docker.io route for "
                          "registry-mirrors; nothing to mirror")
    if endpoints:
        plan.notes.append("Other registries have no mirror setting in Docker: put the "
                          "gateway's host in the image name instead:")
        width = max(len(e.route) for e in endpoints) + len("/OWNER/IMAGE")
        for e in endpoints:
            plan.notes.append(f"  {e.route + '/OWNER/IMAGE':<{width}}  ->  "
                              f"{e.location}/OWNER/IMAGE")
    return plan


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def _containerd_dir(registry: str) -> str:
    # containerd's own spelling for host:port directories (hostDirectory in hosts.go).
    host, sep, port = registry.rpartition(":")
    return f"{host}_{port}_" if sep and port.isdigit() else registry


def _upstream_server(registry: str) -> str:
    return "https://registry-1.docker.io" if registry == DOCKER_HUB else f"https://{registry}"


def hosts_toml(endpoint: Endpoint, *, ca_file: str | None) -> str:
    lines = [f"# registry-gateway: pull {endpoint.route} through the gateway; containerd adds",
             f"# ?ns={endpoint.route} to each request and falls back to `server` if the "
             "gateway fails.",
             f"server = {_toml_string(_upstream_server(endpoint.route))}",
             "",
             f"[host.{_toml_string(endpoint.url)}]",
             '  capabilities = ["pull", "resolve"]']
    if ca_file:
        lines.append(f"  ca = {_toml_string(ca_file)}")
    return "\n".join(lines) + "\n"


def _cri_config_path(config_text: str) -> tuple[str | None, bool]:
    """(config_path, uses the deprecated registry.mirrors) from containerd's config.toml."""
    try:
        document = tomllib.loads(config_text)
    except tomllib.TOMLDecodeError:
        return None, False
    plugins = document.get("plugins", {})
    for plugin in ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"):
        registry = plugins.get(plugin, {}).get("registry", {})
        if registry:
            path = registry.get("config_path")
            return (str(path) if path else None), bool(registry.get("mirrors"))
    return None, False


def containerd_plan(info: GatewayInfo, target: Target, *, config_path: Path,
                    ca: tuple[Path, bytes] | None = None,
                    containerd_config: tuple[Path, str | None] | None = None) -> Plan:
    check_target(target, info)
    plan = Plan()
    for endpoint in target.endpoints(info):
        directory = config_path / _containerd_dir(endpoint.route)
        plan.writes.append(FileWrite(directory / "hosts.toml", hosts_toml(
            endpoint, ca_file="ca.crt" if ca else None).encode()))
        plan.writes += _ca_writes(ca, config_path, [_containerd_dir(endpoint.route)])
    snippet = ['  [plugins."io.containerd.grpc.v1.cri".registry]',
               f"    config_path = {_toml_string(str(config_path))}"]
    current, mirrors = (None, False)
    if containerd_config is not None and containerd_config[1] is not None:
        current, mirrors = _cri_config_path(containerd_config[1])
    where = containerd_config[0] if containerd_config else Path("/etc/containerd/config.toml")
    if current == str(config_path):
        plan.notes.append(f"containerd: {where} already has config_path = {current}; "
                          "hosts.toml files are read at each pull, no restart needed.")
    else:
        plan.notes += [f"containerd reads these files only where its CRI config_path points. "
                       f"In {where} (config version 2) set:", *snippet,
                       "  (containerd 2.x, config version 3: the same under "
                       '[plugins."io.containerd.cri.v1.images".registry])',
                       "then: sudo systemctl restart containerd"]
        if current:
            plan.notes.append(f"  (it points at {current} now)")
    if mirrors:
        plan.notes.append("  and remove the deprecated registry.mirrors / registry.configs "
                          "sections: containerd ignores config_path while they are set")
    plan.notes += [f"ctr: ctr images pull --hosts-dir {config_path} IMAGE",
                   "nerdctl reads /etc/containerd/certs.d by default."]
    return plan


def registries_conf(info: GatewayInfo, target: Target) -> str:
    lines = ["# registry-gateway: pull these registries through the gateway. Mirrors are tried",
             "# first and the registry itself last. Read by podman, buildah, skopeo and CRI-O."]
    for endpoint in target.endpoints(info):
        lines += ["", "[[registry]]", f"prefix = {_toml_string(endpoint.route)}",
                  f"location = {_toml_string(endpoint.route)}", "", "[[registry.mirror]]",
                  f"location = {_toml_string(endpoint.location)}"]
        if endpoint.scheme == "http":
            lines.append("insecure = true")
    return "\n".join(lines) + "\n"


def podman_plan(info: GatewayInfo, target: Target, *, conf_d: Path, certs_dir: Path,
                ca: tuple[Path, bytes] | None = None) -> Plan:
    check_target(target, info)
    endpoints = target.endpoints(info)
    plan = Plan([FileWrite(conf_d / DROP_IN_NAME, registries_conf(info, target).encode())])
    plan.writes += _ca_writes(ca, certs_dir, [e.netloc for e in endpoints])
    plan.notes += ["podman, buildah and skopeo read the drop-in at their next run;",
                   "CRI-O: sudo systemctl reload crio"]
    return plan


def k8s_text(info: GatewayInfo, target: Target, *, ca: Path | None = None,
             command: str = "registry-gateway") -> str:
    check_target(target, info)
    endpoints = target.endpoints(info)
    name = target.host if target.base_domain else target.url()
    ca_option = f" --ca {ca}" if ca else ""
    yaml_lines = ["mirrors:"]
    for endpoint in endpoints:
        yaml_lines += [f"  {_toml_string(endpoint.route)}:", "    endpoint:",
                       f"      - {_toml_string(endpoint.url)}"]
    if ca is not None:
        yaml_lines.append("configs:")
        for netloc in dict.fromkeys(e.netloc for e in endpoints):
            yaml_lines += [f"  {_toml_string(netloc)}:", "    tls:",
                           "      ca_file: /etc/rancher/registry-gateway-ca.crt"]
    copy = [f"  Copy {ca} to /etc/rancher/registry-gateway-ca.crt on each node first."] \
        if ca else []
    return "\n".join([
        "Kubernetes nodes pull with their container runtime: configure it on every node.",
        "",
        "containerd nodes (kubeadm, EKS, GKE, AKS, most distributions):",
        f"  sudo {command} client containerd {name}{ca_option}",
        "  then set the CRI registry config_path it prints and restart containerd.",
        "",
        "k3s and rke2: write this to /etc/rancher/k3s/registries.yaml (rke2: "
        "/etc/rancher/rke2/registries.yaml)",
        "and restart k3s / k3s-agent (rke2-server / rke2-agent):",
        *copy,
        "",
        *yaml_lines,
        "",
        "CRI-O nodes (OpenShift, some kubeadm clusters):",
        f"  sudo {command} client podman {name}{ca_option}  &&  sudo systemctl reload crio",
    ]) + "\n"


def apply(plan: Plan, out: TextIO) -> None:
    """Write the plan: each file atomically (temp file, fsync, rename), keeping the mode
    of a file it replaces and a timestamped backup where the plan asks for one."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for write in plan.writes:
        try:
            current = write.path.read_bytes() if write.path.exists() else None
            if current == write.content:
                print(f"unchanged: {write.path}", file=out)
                continue
            write.path.parent.mkdir(parents=True, exist_ok=True)
            mode = write.path.stat().st_mode & 0o777 if current is not None else write.mode
            backup = None
            if current is not None and write.backup:
                backup = write.path.with_name(f"{write.path.name}.bak-{stamp}")
                backup.write_bytes(current)
                os.chmod(backup, mode)
            temporary = write.path.with_name(f".{write.path.name}.tmp-{os.getpid()}")
            try:
                with open(temporary, "wb") as handle:
                    handle.write(write.content)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(temporary, mode)
                os.replace(temporary, write.path)
            finally:
                temporary.unlink(missing_ok=True)
        except PermissionError as exc:
            raise ClientConfError(f"cannot write {exc.filename or write.path}: permission "
                                  "denied; run it with sudo (or --dry-run to see it)") from None
        except OSError as exc:
            raise ClientConfError(f"cannot write {write.path}: {exc.strerror}") from None
        print(f"wrote {write.path}" + (f" (previous one kept as {backup})" if backup else ""),
              file=out)


# ---------------------------------------------------------------- asking the gateway


def tls_context(ca: Path | None) -> ssl.SSLContext:
    """The system's trust store, plus the gateway's private CA if one is given."""
    context = ssl.create_default_context()
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    return context


def probe_hosts(target: Target) -> list[str]:
    """Where to ask: for a base domain, the Docker Hub host first (its conventional label)."""
    if target.base_domain:
        return [f"{PRESETS[DOCKER_HUB].label}.{target.host}", target.host]
    return [target.host]


def probe_urls(target: Target) -> list[str]:
    return [target.url(host) for host in probe_hosts(target)]


async def fetch_info(target: Target, ca: Path | None, seconds: float) -> GatewayInfo:
    errors = []
    context = tls_context(ca)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds),
                                     trust_env=False) as session:
        for base in probe_urls(target):
            url = base + ROUTES_PATH
            try:
                async with session.get(url, ssl=context, allow_redirects=False) as response:
                    if response.status != 200:
                        errors.append(f"{url}: HTTP {response.status}")
                        continue
                    document = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                errors.append(f"{url}: {exc or type(exc).__name__}")
                continue
            return GatewayInfo.from_document(document, f"the gateway at {base}")
    raise ClientConfError("could not ask the gateway for its routes: " + "; ".join(errors))


class _AnyEnvironment(Mapping[str, str]):
    """routes.yaml on a client machine: *_env secrets resolve to nothing (never used)."""

    def __getitem__(self, key: str) -> str:
        return ""

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def gateway_info(args: argparse.Namespace, target: Target, err: TextIO) -> GatewayInfo:
    if args.routes:
        try:
            return GatewayInfo.from_config(load_config_file(args.routes, _AnyEnvironment()))
        except ConfigError as exc:
            raise ClientConfError(str(exc)) from None
    if args.presets:
        return GatewayInfo.presets(target.host if target.base_domain else None)
    try:
        return asyncio.run(fetch_info(target, args.ca, args.timeout))
    except ClientConfError as exc:
        print(f"warning: {exc}\nwarning: assuming the preset routes; pass --routes "
              "routes.yaml (or fix the problem above; `registry-gateway doctor` helps)",
              file=err)
        return GatewayInfo.presets(target.host if target.base_domain else None)


def read_ca(path: Path | None) -> tuple[Path, bytes] | None:
    if path is None:
        return None
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ClientConfError(f"cannot read the CA file {path}: {exc.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise ClientConfError(f"{path} holds no PEM certificate; --ca wants the CA that "
                              "signed the gateway's certificate")
    if b"PRIVATE KEY" in pem:
        raise ClientConfError(f"{path} contains a private key: give the CA certificate only")
    return path, pem


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ClientConfError(f"cannot read {path}: {exc.strerror}") from None


# ---------------------------------------------------------------- the command line


def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        target = parse_target(args.gateway)
        ca = read_ca(args.ca)
        info = gateway_info(args, target, err)
        if args.runtime == "k8s":
            out.write(k8s_text(info, target, ca=args.ca))
            return 0
        if args.runtime == "docker":
            plan = docker_plan(info, target, daemon_json=args.daemon_json,
                               existing=_read_text(args.daemon_json),
                               certs_dir=args.certs_dir, ca=ca)
        elif args.runtime == "containerd":
            plan = containerd_plan(info, target, config_path=args.config_path, ca=ca,
                                   containerd_config=(args.containerd_config,
                                                      _read_text(args.containerd_config)))
        else:
            plan = podman_plan(info, target, conf_d=args.conf_d, certs_dir=args.certs_dir,
                               ca=ca)
        if args.dry_run:
            out.write(plan.render())
            return 0
        apply(plan, out)
        if plan.notes:
            out.write("\n" + "\n".join(plan.notes) + "\n")
        return 0
    except ClientConfError as exc:
        print(f"registry-gateway client: {exc}", file=err)
        return 1


def add_commands(sub: Any) -> None:
    """`client docker|containerd|podman|k8s` on the CLI's subparsers."""
    client = sub.add_parser("client", help="write a container runtime's configuration for "
                            "pulling through the gateway")
    runtimes = client.add_subparsers(dest="runtime", required=True)

    def common(parser: argparse.ArgumentParser, *, writes: bool = True) -> None:
        parser.add_argument("gateway", help="base domain (example.com, example.com:8443: one "
                            "host per registry) or URL (https://mirror.example.com)")
        parser.add_argument("--ca", type=Path, help="the private CA that signed the gateway's "
                            "certificate (omit for a public CA such as Let's Encrypt)")
        source = parser.add_mutually_exclusive_group()
        source.add_argument("--routes", help="read the routes from this routes.yaml instead of "
                            "asking the gateway")
        source.add_argument("--presets", action="store_true", help="assume every preset "
                            "route under its standard label instead of asking the gateway")
        parser.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
        if writes:
            parser.add_argument("--dry-run", action="store_true",
                                help="print the files instead of writing them")
        parser.set_defaults(run=_run)

    docker = runtimes.add_parser("docker", help="merge registry-mirrors into daemon.json")
    common(docker)
    docker.add_argument("--daemon-json", type=Path, default=Path("/etc/docker/daemon.json"))
    docker.add_argument("--certs-dir", type=Path, default=Path("/etc/docker/certs.d"),
                        help="where dockerd looks for <host:port>/ca.crt")

    containerd = runtimes.add_parser("containerd", help="write hosts.toml per registry")
    common(containerd)
    containerd.add_argument("--config-path", type=Path, default=Path("/etc/containerd/certs.d"),
                            help="the hosts directory (containerd's registry config_path)")
    containerd.add_argument("--containerd-config", type=Path,
                            default=Path("/etc/containerd/config.toml"),
                            help="containerd's config.toml, checked for config_path")

    podman = runtimes.add_parser("podman", help="write a registries.conf.d drop-in (podman, "
                                 "skopeo, buildah, CRI-O)")
    common(podman)
    podman.add_argument("--conf-d", type=Path, default=Path("/etc/containers/registries.conf.d"))
    podman.add_argument("--certs-dir", type=Path, default=Path("/etc/containers/certs.d"))

    k8s = runtimes.add_parser("k8s", help="print what to do on Kubernetes nodes")
    common(k8s, writes=False)
