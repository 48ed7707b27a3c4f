"""`client k8s`: what to run on each Kubernetes node, and a k3s/rke2 registries.yaml.
Prints text only: nodes are configured with the containerd or podman commands."""

from __future__ import annotations

from pathlib import Path

from .plan import quoted
from .target import GatewayInfo, Target, check_target


def k8s_text(info: GatewayInfo, target: Target, *, ca: Path | None = None,
             command: str = "registry-gateway") -> str:
    check_target(target, info)
    endpoints = target.endpoints(info)
    name = target.host if target.base_domain else target.url()
    ca_option = f" --ca {ca}" if ca else ""
    yaml_lines = ["mirrors:"]
    for endpoint in endpoints:
        yaml_lines += [f"  {quoted(endpoint.route)}:", "    endpoint:",
                       f"      - {quoted(endpoint.url)}"]
    if ca is not None:
        yaml_lines.append("configs:")
        for netloc in dict.fromkeys(e.netloc for e in endpoints):
            yaml_lines += [f"  {quoted(netloc)}:", "    tls:",
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
