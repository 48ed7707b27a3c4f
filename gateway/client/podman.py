"""`client podman`: a registries.conf.d drop-in that mirrors every route, read by podman,
buildah, skopeo and CRI-O. Builds a Plan; writes nothing itself."""

from __future__ import annotations

from pathlib import Path

from .plan import FileWrite, Plan, ca_writes, quoted
from .target import GatewayInfo, Target, check_target

DROP_IN_NAME = "50-registry-gateway.conf"


def registries_conf(info: GatewayInfo, target: Target) -> str:
    lines = ["# registry-gateway: pull these registries through the gateway. Mirrors are tried",
             "# first and the registry itself last. Read by podman, buildah, skopeo and CRI-O."]
    for endpoint in target.endpoints(info):
        lines += ["", "[[registry]]", f"prefix = {quoted(endpoint.route)}",
                  f"location = {quoted(endpoint.route)}", "", "[[registry.mirror]]",
                  f"location = {quoted(endpoint.location)}"]
        if endpoint.scheme == "http":
            lines.append("insecure = true")
    return "\n".join(lines) + "\n"


def podman_plan(info: GatewayInfo, target: Target, *, conf_d: Path, certs_dir: Path,
                ca: tuple[Path, bytes] | None = None) -> Plan:
    check_target(target, info)
    endpoints = target.endpoints(info)
    plan = Plan([FileWrite(conf_d / DROP_IN_NAME, registries_conf(info, target).encode())])
    plan.writes += ca_writes(ca, certs_dir, [e.netloc for e in endpoints])
    plan.notes += ["podman, buildah and skopeo read the drop-in at their next run;",
                   "CRI-O: sudo systemctl reload crio"]
    return plan
