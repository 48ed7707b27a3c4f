"""`client docker|containerd --proxy`: the systemd drop-in, where the proxy CA goes for
each daemon, `--root`, and a proxy login kept out of what --dry-run prints."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest
import trustme

from gateway import cli
from gateway.client.plan import Plan
from gateway.client.proxy_mode import containerd_proxy_plan, docker_proxy_plan, proxy_url
from gateway.client.target import ClientConfError, GatewayInfo
from gateway.wire import GatewayListing, RouteListing

INFO = GatewayInfo(GatewayListing((RouteListing("docker.io", "hub"),
                                   RouteListing("ghcr.io", "ghcr"),
                                   RouteListing("registry.k8s.io", "k8s")), (), "docker.io"))
CA = (Path("ca.crt"), b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")


def files(plan: Plan) -> dict[str, bytes]:
    return {str(write.path): write.content for write in plan.writes}


def environment(text: bytes) -> dict[str, str]:
    found = {}
    for line in text.decode().splitlines():
        if line.startswith("Environment="):
            key, _, value = json.loads(line[len("Environment="):]).partition("=")
            found[key] = value
    return found


def test_docker_drop_in_and_ca_places() -> None:
    plan = docker_proxy_plan(INFO, "http://gw.example:3128",
                             systemd_dir=Path("/etc/systemd/system"),
                             certs_dir=Path("/etc/docker/certs.d"),
                             ca_dir=Path("/etc/docker/registry-gateway-proxy-ca"), ca=CA,
                             no_proxy=["localhost", "127.0.0.1", "::1", "registry.internal"])
    written = files(plan)
    env = environment(written["/etc/systemd/system/docker.service.d/http-proxy.conf"])
    assert env == {"HTTPS_PROXY": "http://gw.example:3128",
                   "NO_PROXY": "localhost,127.0.0.1,::1,registry.internal",
                   "SSL_CERT_DIR": "/etc/ssl/certs:/etc/docker/registry-gateway-proxy-ca"}
    assert written["/etc/docker/registry-gateway-proxy-ca/registry-gateway-proxy-ca.crt"] == CA[1]
    # dockerd never reads certs.d for Docker Hub: the SSL_CERT_DIR above covers it.
    certs = {p for p in written if "/certs.d/" in p}
    assert certs == {"/etc/docker/certs.d/ghcr.io/ca.crt",
                     "/etc/docker/certs.d/registry.k8s.io/ca.crt"}
    assert "sudo systemctl daemon-reload && sudo systemctl restart docker" in plan.notes[0]


def test_containerd_hosts_toml_names_the_real_registry_and_the_ca() -> None:
    plan = containerd_proxy_plan(INFO, "http://gw.example:3128",
                                 systemd_dir=Path("/etc/systemd/system"),
                                 config_path=Path("/etc/containerd/certs.d"),
                                 ca_dir=Path("/etc/containerd/registry-gateway-proxy-ca"), ca=CA,
                                 no_proxy=["localhost"])
    written = files(plan)
    hub = tomllib.loads(written["/etc/containerd/certs.d/docker.io/hosts.toml"].decode())
    assert hub == {"server": "https://registry-1.docker.io", "ca": "ca.crt"}
    ghcr = tomllib.loads(written["/etc/containerd/certs.d/ghcr.io/hosts.toml"].decode())
    assert ghcr == {"server": "https://ghcr.io", "ca": "ca.crt"}
    assert written["/etc/containerd/certs.d/ghcr.io/ca.crt"] == CA[1]
    assert environment(written["/etc/systemd/system/containerd.service.d/http-proxy.conf"])[
        "HTTPS_PROXY"] == "http://gw.example:3128"


@pytest.mark.parametrize("text", ["https://gw:3128", "gw:3128", "http://gw:3128/path",
                                  "socks5://gw:1080"])
def test_proxy_url_wants_http_host_port(text: str) -> None:
    with pytest.raises(ClientConfError, match="http://HOST:PORT"):
        proxy_url(text)


def test_cli_writes_under_root_and_hides_a_proxy_password(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    root = tmp_path / "root"
    common = ["client", "docker", "https://gw.example", "--presets", "--proxy",
              "http://alice:s%3Acret@gw.example:3128", "--ca", str(ca_file), "--root", str(root)]

    assert cli.main([*common, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "s%3Acret" not in printed and "alice:***@gw.example:3128" in printed
    assert not root.exists()
    assert cli.main(common) == 0

    drop_in = root / "etc/systemd/system/docker.service.d/http-proxy.conf"
    assert stat.S_IMODE(drop_in.stat().st_mode) == 0o600  # it holds the proxy login
    # systemd expands %-specifiers: the written %% reads back as one %.
    assert 'Environment="HTTPS_PROXY=http://alice:s%%3Acret@gw.example:3128"' in \
        drop_in.read_text()
    assert (root / "etc/docker/certs.d/ghcr.io/ca.crt").read_bytes() == ca_file.read_bytes()
    assert not (root / "etc/docker/certs.d/docker.io").exists()
