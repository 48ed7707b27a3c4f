"""`client containerd`: one hosts.toml per route under containerd's registry config_path, and
what containerd's config.toml still needs. Builds a Plan; writes nothing itself."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .plan import FileWrite, Plan, ca_writes, quoted
from .target import DOCKER_HUB, Endpoint, GatewayInfo, Target, check_target


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
             f"server = {quoted(_upstream_server(endpoint.route))}",
             "",
             f"[host.{quoted(endpoint.url)}]",
             '  capabilities = ["pull", "resolve"]']
    if ca_file:
        lines.append(f"  ca = {quoted(ca_file)}")
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
        plan.writes += ca_writes(ca, config_path, [_containerd_dir(endpoint.route)])
    snippet = ['  [plugins."io.containerd.grpc.v1.cri".registry]',
               f"    config_path = {quoted(str(config_path))}"]
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
