"""Forward-proxy mode with real clients: dockerd and containerd (ctr), configured by
`registry-gateway client docker|containerd --proxy`, pull images by their real names
(docker.io/library/..., ghcr.io/...) with HTTPS_PROXY pointing at the gateway's proxy
listener and its CA trusted; the routes point those names at local docker-registry
upstreams, so the gateway answers for registry-1.docker.io and ghcr.io itself.

The clients run in the sandbox of tests/support/sandbox.py: no name resolves there and
the only ways out are relays to the gateway's listeners, so a pull that works came
through the proxy and nothing reaches the internet.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway.proxy import write_ca
from tests.support.gateway import Gateway, run_gateway
from tests.support.images import make_image
from tests.support.net import free_port
from tests.support.sandbox import (
    SANDBOX_ADDRESS,
    Containerd,
    Sandbox,
    SandboxDockerd,
    containers_env,
    run_containerd,
    run_sandbox,
)
from tests.support.tls_front import TlsFront
from tests.support.tools import local_tool
from tests.support.upstreams import Upstream, run_upstream, unique_repository
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e


@dataclass
class ProxyWorld:
    hub: Upstream
    ghcr: Upstream
    gateway: Gateway
    proxy_port: int
    ca: Path
    sandbox: Sandbox

    @property
    def gateway_url(self) -> str:
        return f"http://{SANDBOX_ADDRESS}:{self.gateway.port}"  # as seen from the sandbox

    @property
    def proxy_url(self) -> str:
        return f"http://{SANDBOX_ADDRESS}:{self.proxy_port}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, live_logs: Any) -> Iterator[ProxyWorld]:
    root = tmp_path_factory.mktemp("proxy-world")
    with ExitStack() as stack:
        hub = stack.enter_context(run_upstream(root / "hub", "docker.io"))
        ghcr = stack.enter_context(run_upstream(root / "ghcr", "ghcr.io"))
        ca_dir = root / "proxy-ca"
        write_ca(ca_dir, ["docker.io", "ghcr.io"])
        port = free_port()
        routes = {"routes": {"docker.io": {"upstream": hub.url}, "ghcr.io": {"upstream": ghcr.url}},
                  "forward_proxy": {"ca": str(ca_dir)}}
        gateway = stack.enter_context(run_gateway(
            root / "gateway", routes, extra_args=("--proxy-listen", f"127.0.0.1:{port}")))
        stack.enter_context(live_logs.watching("proxy gateway stderr", gateway.log))
        box = stack.enter_context(run_sandbox(()))
        box.forward((SANDBOX_ADDRESS, port), ("127.0.0.1", port))
        box.forward((SANDBOX_ADDRESS, gateway.port), ("127.0.0.1", gateway.port))
        yield ProxyWorld(hub, ghcr, gateway, port, ca_dir / "ca.crt", box)


def drop_in_environment(path: Path) -> dict[str, str]:
    """The Environment= lines of a systemd drop-in, as systemd would set them."""
    found = {}
    for line in path.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = json.loads(line[len("Environment="):]).partition("=")
            found[key] = value.replace("%%", "%")
    return found


@dataclass
class ProxiedDockerd(SandboxDockerd):
    """dockerd in the sandbox with the environment its systemd drop-in gives it."""

    environment: dict[str, str] | None = None

    def start(self) -> None:
        assert self.sandbox is not None and self.environment is not None
        binary = "dockerd"
        self._client = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
        environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                       "HOME": str(self.root), **self.environment}
        self._launch(self.sandbox.command(*self.command(binary, self.config_file)), environment)


def blob_counts(upstream: Upstream, repository: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for seen in upstream.proxy.blob_requests(repository):
        digest = seen.path.rsplit("/", 1)[1]
        counts[digest] = counts.get(digest, 0) + 1
    return counts


def hits_logged(gateway: Gateway, digest: str) -> int:
    return sum(1 for line in gateway.log().splitlines()
               if f"/blobs/{digest}" in line and '"cache": "HIT"' in line)


@pytest.fixture(scope="module")
def dockerd(world: ProxyWorld) -> Iterator[ProxiedDockerd]:
    box = world.sandbox
    systemd = box.root / "systemd"
    box.gateway_cli("client", "docker", world.gateway_url, "--proxy", world.proxy_url,
                    "--systemd-dir", str(systemd))
    # Written where dockerd reads them: /etc/docker is the sandbox's own.
    assert (box.etc_docker / "certs.d" / "ghcr.io" / "ca.crt").read_bytes() == \
        world.ca.read_bytes()
    environment = drop_in_environment(systemd / "docker.service.d" / "http-proxy.conf")
    assert environment["HTTPS_PROXY"] == world.proxy_url
    assert "HTTP_PROXY" not in environment
    daemon = ProxiedDockerd(environment=environment)
    daemon.sandbox = box
    daemon.config_file = daemon.root / "daemon.json"
    daemon.config_file.write_text(json.dumps({"storage-driver": "vfs", "iptables": False,
                                              "ip6tables": False, "bridge": "none"}))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


def test_dockerd_pulls_real_names_through_the_proxy_and_the_second_pull_hits(
        world: ProxyWorld, dockerd: ProxiedDockerd) -> None:
    hub_repository = unique_repository("library")
    hub_image = world.hub.push(hub_repository, make_image())
    ghcr_repository = unique_repository("owner")
    ghcr_image = world.ghcr.push(ghcr_repository, make_image(oci=True))
    name = hub_repository.split("/", 1)[1]

    for reference, image in ((f"docker.io/library/{name}", hub_image),
                             (f"ghcr.io/{ghcr_repository}", ghcr_image)):
        dockerd.pull(reference)
        found = dockerd.inspect_image(f"{reference}:latest")
        assert found["Id"] == image.config.digest
        assert found["RootFS"]["Layers"] == list(image.diff_ids)
    assert blob_counts(world.hub, hub_repository) == {b.digest: 1 for b in hub_image.blobs}
    assert blob_counts(world.ghcr, ghcr_repository) == {b.digest: 1 for b in ghcr_image.blobs}

    dockerd.remove_image(f"docker.io/library/{name}")
    dockerd.pull(f"docker.io/library/{name}")

    assert dockerd.inspect_image(f"{name}:latest")["Id"] == hub_image.config.digest
    assert blob_counts(world.hub, hub_repository) == {b.digest: 1 for b in hub_image.blobs}
    wait_for(lambda: all(hits_logged(world.gateway, b.digest) >= 1 for b in hub_image.layers),
             what="the second pull's layers served as cache HITs")
    log = world.gateway.log()
    assert "proxy CONNECT registry-1.docker.io:443" in log and "intercepted" in log
    assert "proxy CONNECT ghcr.io:443" in log


def test_sixteen_concurrent_proxied_pulls_cost_one_upstream_download(
        world: ProxyWorld, tmp_path: Path) -> None:
    crane = local_tool("crane")
    repository = unique_repository("library")
    image = world.hub.push(repository, make_image(layer_sizes=(2 << 20,)))
    world.hub.proxy.throttle_bytes_per_second = 4 << 20  # the 16 overlap
    # 16 independent Go clients (crane), each its own CONNECT and TLS session.
    environment = {**containers_env(tmp_path), "HTTPS_PROXY": world.proxy_url,
                   "SSL_CERT_FILE": str(world.ca)}
    processes = [subprocess.Popen(
        world.sandbox.command(crane, "pull", f"docker.io/{repository}:latest",
                              str(tmp_path / f"image-{i}.tar")),
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(16)]
    try:
        outputs = [process.communicate(timeout=240) for process in processes]
    finally:
        world.hub.proxy.throttle_bytes_per_second = None
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode(errors="replace")
    assert blob_counts(world.hub, repository) == {b.digest: 1 for b in image.blobs}
    tars = {(tmp_path / f"image-{i}.tar").read_bytes() for i in range(16)}
    assert len(tars) == 1  # every client got the same image


@pytest.fixture
def containerd(world: ProxyWorld) -> Iterator[Containerd]:
    with run_containerd(world.sandbox) as daemon:
        yield daemon


def test_containerd_pulls_real_names_through_the_proxy(
        world: ProxyWorld, containerd: Containerd) -> None:
    box = world.sandbox
    hosts_dir = containerd.root / "certs.d"
    systemd = containerd.root / "systemd"
    box.gateway_cli("client", "containerd", world.gateway_url, "--proxy", world.proxy_url,
                    "--systemd-dir", str(systemd), "--config-path", str(hosts_dir),
                    "--proxy-ca-dir", str(containerd.root / "proxy-ca"))
    hosts_toml = (hosts_dir / "docker.io" / "hosts.toml").read_text()
    assert 'server = "https://registry-1.docker.io"' in hosts_toml and 'ca = "ca.crt"' in hosts_toml
    environment = drop_in_environment(systemd / "containerd.service.d" / "http-proxy.conf")
    # ctr fetches in its own process: the drop-in's proxy goes in its environment; the CA
    # comes from hosts.toml (not SSL_CERT_DIR), which is what CRI reads too.
    ctr_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HTTPS_PROXY": environment["HTTPS_PROXY"], "NO_PROXY": environment["NO_PROXY"]}
    hub_repository = unique_repository("library")
    hub_image = world.hub.push(hub_repository, make_image())
    ghcr_repository = unique_repository("owner")
    ghcr_image = world.ghcr.push(ghcr_repository, make_image(oci=True))

    def ctr(namespace: str, *args: str) -> str:
        return box.run("ctr", "--address", str(containerd.address), "--namespace", namespace,
                       *args, env=ctr_env).stdout

    for reference, image in ((f"docker.io/{hub_repository}:latest", hub_image),
                             (f"ghcr.io/{ghcr_repository}:latest", ghcr_image)):
        ctr("rgw", "images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native",
            reference)
        line = next(x for x in ctr("rgw", "images", "ls").splitlines()
                    if x.startswith(reference))
        assert image.digest in line
    assert blob_counts(world.hub, hub_repository) == {b.digest: 1 for b in hub_image.blobs}
    assert blob_counts(world.ghcr, ghcr_repository) == {b.digest: 1 for b in ghcr_image.blobs}
    # A second containerd pulls the same: everything from the gateway's cache.
    with run_containerd(box) as second:
        box.run("ctr", "--address", str(second.address), "--namespace", "rgw", "images",
                "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native",
                f"docker.io/{hub_repository}:latest", env=ctr_env)
    assert blob_counts(world.hub, hub_repository) == {b.digest: 1 for b in hub_image.blobs}
    wait_for(lambda: all(hits_logged(world.gateway, b.digest) >= 1 for b in hub_image.blobs),
             what="the second containerd's blobs served as cache HITs")


def test_doctor_checks_the_proxy_path(world: ProxyWorld) -> None:
    done = world.sandbox.gateway_cli("doctor", world.gateway_url, "--proxy", world.proxy_url,
                                     "--ca", str(world.ca), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"ok\s+the proxy .* intercepts registry-1\.docker\.io", done.stdout), \
        done.stdout


def test_without_a_ca_a_go_client_pulls_through_a_tunnel_and_nothing_is_cached(
        world: ProxyWorld, tmp_path: Path, live_logs: Any) -> None:
    crane = local_tool("crane")
    # The "real" registry-1.docker.io: TLS with a certificate of its own, in front of hub.
    registry_ca = trustme.CA(organization_name="the registry's own CA")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    registry_ca.issue_cert("registry-1.docker.io", "index.docker.io").configure_cert(context)
    front = TlsFront(context, ("127.0.0.1", world.hub.registry.port))
    ca_file = tmp_path / "registry-ca.pem"
    registry_ca.cert_pem.write_to_path(str(ca_file))
    port = free_port()
    where = f"127.0.0.1:{front.port}"
    routes = {"routes": {"docker.io": {"upstream": world.hub.url},
                         "ghcr.io": {"upstream": world.ghcr.url}},
              "forward_proxy": {"connect_to": {"registry-1.docker.io": where,
                                               "index.docker.io": where}}}
    repository = unique_repository("library")
    image = world.hub.push(repository, make_image())
    with ExitStack() as stack:
        stack.callback(front.stop)
        gateway = stack.enter_context(run_gateway(
            tmp_path / "gateway", routes, extra_args=("--proxy-listen", f"127.0.0.1:{port}")))
        stack.enter_context(live_logs.watching("tunnel gateway stderr", gateway.log))
        world.sandbox.forward((SANDBOX_ADDRESS, port), ("127.0.0.1", port))
        environment = {**containers_env(tmp_path), "SSL_CERT_FILE": str(ca_file),
                       "HTTPS_PROXY": f"http://{SANDBOX_ADDRESS}:{port}"}
        world.sandbox.run(crane, "pull", f"docker.io/{repository}:latest",
                          str(tmp_path / "image.tar"), env=environment)

        assert front.accepted >= 1  # the client talked TLS to the registry itself
        assert not world.hub.proxy.blob_requests(repository)  # the gateway fetched nothing
        layer_digests = {b.digest.split(":", 1)[1] for b in image.layers}
        with tarfile.open(tmp_path / "image.tar") as tar:
            names = " ".join(tar.getnames())
        assert all(digest in names for digest in layer_digests), names
        wait_for(lambda: "tunnelled byte for byte, NOT CACHED" in gateway.log(),
                 what="the log saying the pull was not cached")
        assert not list((gateway.data_dir).rglob("*/blobs/*")), "a tunnel cached something"
