"""Real clients over real TLS, each configured by `registry-gateway client`: dockerd,
containerd (ctr), podman, skopeo and crane pull through a gateway that terminates TLS
with a certificate from a CA made here, for host names that route by label
(hub.gw.test, ghcr.gw.test, ...); plus certificate reload and `registry-gateway doctor`.

The clients run in a sandbox: a network and mount namespace of their own, where the
gateway's names resolve (through a private /etc/hosts) to 198.18.0.2, an address on
the namespace's loopback that a relay connects to the gateway on 127.0.0.1. There is
no other route out of it, so a pull that works came through the gateway, and a client
falling back to the real docker.io or ghcr.io cannot reach the internet. The address is
not in 127.0.0.0/8 on purpose: dockerd treats registries there as insecure and skips
certificate checks, which would hide a wrong CA setup. /etc/docker and /etc/containers
are private directories inside the sandbox, so the commands write their default paths
without touching the machine's.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from support.dockerd import Dockerd, _docker_client
from support.gateway import REPOSITORY_ROOT, Gateway, run_gateway
from support.images import make_image
from support.net import free_port, stop_process, wait_for
from support.registry import run_registry
from support.tools import require_tool
from support.upstreams import unique_repository
from support.world import World

pytestmark = pytest.mark.e2e

DOMAIN = "gw.test"
SANDBOX_ADDRESS = "198.18.0.2"  # RFC 2544 test range; exists only inside the sandbox
NAMES = (DOMAIN, f"hub.{DOMAIN}", f"ghcr.{DOMAIN}", f"quay.{DOMAIN}", f"mirror.{DOMAIN}")
CLONE_NEWNET = 0x40000000
TOOLS = REPOSITORY_ROOT / ".tools" / "bin"


def tool(name: str) -> str:
    """A command from ./.tools/bin (crane), else from PATH; fails under CI when missing."""
    local = TOOLS / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return require_tool(name)


def require_root() -> None:
    if os.geteuid() != 0:
        message = "namespaces for the client sandbox need root"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


# -- the sandbox ----------------------------------------------------------------------------


def _listening_socket_in(netns: str, address: tuple[str, int]) -> socket.socket:
    """A listening socket created inside another network namespace: a thread moves into
    it (setns only affects that thread), binds, and ends; the socket stays there."""
    made: dict[str, Any] = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns into the sandbox failed")
            finally:
                os.close(fd)
            made["socket"] = socket.create_server(address, reuse_port=False)
        except BaseException as error:  # handed to the caller's thread
            made["error"] = error

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    listening: socket.socket = made["socket"]
    return listening


class Relay:
    """Accepts inside the sandbox on `listen`, connects to `target` on this machine's
    loopback, and copies bytes both ways (TLS passes through untouched)."""

    def __init__(self, netns: str, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self.listener = _listening_socket_in(netns, listen)
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with self._lock:
                if source in self._sockets:
                    self._sockets.discard(source)
                    with contextlib.suppress(OSError):
                        source.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(10)
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            self._sockets.clear()


@dataclass
class Sandbox:
    """A holder process owning a new network + mount namespace, and what runs in it."""

    root: Path
    holder: subprocess.Popen[bytes] | None = None
    relays: list[Relay] = field(default_factory=list)

    @property
    def etc_docker(self) -> Path:
        return self.root / "etc-docker"  # is /etc/docker inside

    @property
    def etc_containers(self) -> Path:
        return self.root / "etc-containers"  # is /etc/containers inside

    @property
    def pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    def start(self) -> None:
        for name in ("unshare", "nsenter", "ip", "mount"):
            require_tool(name)
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "--",
             "sleep", "infinity"], stdin=subprocess.DEVNULL, start_new_session=True)
        ours = os.readlink("/proc/self/ns/net")
        wait_for(lambda: Path(f"/proc/{self.pid}/comm").read_text().strip() == "sleep"
                 and os.readlink(self.netns) != ours, what="sandbox namespaces",
                 timeout=10, process=self.holder)
        self.run("ip", "link", "set", "lo", "up")
        self.run("ip", "addr", "add", f"{SANDBOX_ADDRESS}/32", "dev", "lo")
        (self.root / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{SANDBOX_ADDRESS} {n}\n" for n in NAMES))
        (self.root / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        self.etc_docker.mkdir()
        shutil.copytree("/etc/containers", self.etc_containers, symlinks=True)
        for source, target in ((self.root / "hosts", "/etc/hosts"),
                               (self.root / "resolv.conf", "/etc/resolv.conf"),
                               (self.etc_docker, "/etc/docker"),
                               (self.etc_containers, "/etc/containers")):
            self.run("mount", "--bind", str(source), target, mount_only=True)
        # Never write through to the machine's files: check the binds took.
        marker = self.etc_docker / ".sandbox"
        marker.write_text("ok")
        assert self.run("cat", "/etc/docker/.sandbox").stdout == "ok"
        assert not Path("/etc/docker/.sandbox").exists()

    def command(self, *argv: str, mount_only: bool = False) -> list[str]:
        namespaces = ["-m"] if mount_only else ["-m", "-n"]
        # Entering a mount namespace moves to its /: start where the checkout is.
        return ["nsenter", "-t", str(self.pid), *namespaces, f"--wd={REPOSITORY_ROOT}", "--",
                *argv]

    def run(self, *argv: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 300, mount_only: bool = False) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.command(*argv, mount_only=mount_only), capture_output=True,
                              text=True, env=env, timeout=timeout, cwd=REPOSITORY_ROOT)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {done.returncode}\n"
                                 f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
        return done

    def gateway_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`registry-gateway ...` as a user on a client machine runs it."""
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root)}
        return self.run(sys.executable, "-m", "gateway", *args, env=environment, check=check)

    def forward(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.relays.append(Relay(self.netns, listen, target))

    def stop(self) -> None:
        for relay in self.relays:
            relay.stop()
        self.relays.clear()
        if self.holder is not None:
            stop_process(self.holder, grace=5)  # the namespaces die with their last process
            self.holder = None


# -- certificates and the gateway under test --------------------------------------------------


@dataclass
class Pki:
    ca: trustme.CA
    ca_path: Path
    certs: Path  # the gateway's certs/ directory


def install_acme_sh_layout(certs: Path, leaf: trustme.LeafCert, domain: str) -> Path:
    """What `acme.sh --issue -d gw.test -d '*.gw.test'` leaves: <dir>/fullchain.cer and
    <domain>.key (plus the leaf alone and the CA bundle, which must not confuse us)."""
    directory = certs / f"{domain}_ecc"
    directory.mkdir(parents=True, exist_ok=True)
    chain = [pem.bytes() for pem in leaf.cert_chain_pems]
    (directory / f"{domain}.cer").write_bytes(chain[0])
    (directory / "ca.cer").write_bytes(b"".join(chain[1:]))
    (directory / "fullchain.cer").write_bytes(b"".join(chain))
    key = directory / f"{domain}.key"
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA(organization_name="registry-gateway test CA")
    intermediate = ca.create_child_ca()
    install_acme_sh_layout(root / "certs", intermediate.issue_cert(DOMAIN, f"*.{DOMAIN}"),
                           DOMAIN)
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    return Pki(ca, root / "ca.pem", root / "certs")


def tls_answers(port: int, ca_path: Path, server_name: str = f"hub.{DOMAIN}") -> bool:
    context = ssl.create_default_context(cafile=str(ca_path))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname=server_name):
            return True
    except OSError:
        return False


@dataclass
class TlsGateway:
    gateway: Gateway
    tls_port: int

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.gateway.process is not None
        return self.gateway.process


@contextlib.contextmanager
def run_tls_gateway(workdir: Path, routes: dict[str, Any], certs: Path, ca_path: Path,
                    *extra: str) -> Iterator[TlsGateway]:
    """The gateway with a TLS listener (and a plain one that redirects to it)."""
    tls_port = free_port()
    args = ("--tls-listen", f"127.0.0.1:{tls_port}", "--certs", str(certs),
            "--redirect-http", *extra)
    with run_gateway(workdir, routes, extra_args=args) as gateway:
        wait_for(lambda: tls_answers(tls_port, ca_path), what="gateway TLS listener",
                 process=gateway.process, diagnostics=gateway.log)
        yield TlsGateway(gateway, tls_port)


def gw_routes(world: World) -> dict[str, Any]:
    return {"base_domains": [DOMAIN], "default_route": "docker.io", "routes": {
        "docker.io": {"upstream": world.hub.url},
        "ghcr.io": {"upstream": world.ghcr.url},
        "quay.io": {"upstream": world.quay.url}}}


@pytest.fixture(scope="module")
def tls_gateway(world: World, pki: Pki, tmp_path_factory: pytest.TempPathFactory,
                live_logs: Any) -> Iterator[TlsGateway]:
    workdir = tmp_path_factory.mktemp("tls-gateway")
    with run_tls_gateway(workdir, gw_routes(world), pki.certs, pki.ca_path) as running, \
            live_logs.watching("TLS gateway stderr", running.gateway.log):
        yield running


@pytest.fixture(scope="module")
def sandbox(tls_gateway: TlsGateway) -> Iterator[Sandbox]:
    require_root()
    root = Path(tempfile.mkdtemp(prefix="rgw-sbx-", dir="/tmp"))
    box = Sandbox(root)
    try:
        box.start()
        box.forward((SANDBOX_ADDRESS, tls_gateway.tls_port), ("127.0.0.1", tls_gateway.tls_port))
        yield box
    finally:
        box.stop()
        shutil.rmtree(root, ignore_errors=True)


def gateway_name(tls_gateway: TlsGateway) -> str:
    """What a user types: the base domain and the gateway's HTTPS port."""
    return f"{DOMAIN}:{tls_gateway.tls_port}"


# -- docker ------------------------------------------------------------------------------------


@dataclass
class SandboxDockerd(Dockerd):
    """dockerd inside the sandbox, started with the daemon.json given (--config-file)."""

    config_file: Path = Path()
    sandbox: Sandbox | None = None

    def start(self) -> None:
        binary = require_tool("dockerd")
        require_tool("containerd")
        self._client = _docker_client()
        assert self.sandbox is not None
        environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                       "HOME": str(self.root)}
        self._launch(self.sandbox.command(*self.command(binary, self.config_file)), environment)


def test_docker_pulls_through_the_mirror_and_by_explicit_host(
        world: World, pki: Pki, tls_gateway: TlsGateway, sandbox: Sandbox) -> None:
    hub_repository = unique_repository("library")
    hub_image = world.hub.push(hub_repository, make_image())
    ghcr_repository = unique_repository("owner")
    ghcr_image = world.ghcr.push(ghcr_repository, make_image(oci=True))
    daemon = SandboxDockerd()  # its directory exists from here on: stop() removes it
    try:
        run_docker_scenario(world, pki, tls_gateway, sandbox, daemon, hub_repository,
                            hub_image, ghcr_repository, ghcr_image)
    finally:
        daemon.stop()


def run_docker_scenario(world: World, pki: Pki, tls_gateway: TlsGateway, sandbox: Sandbox,
                        daemon: SandboxDockerd, hub_repository: str, hub_image: Any,
                        ghcr_repository: str, ghcr_image: Any) -> None:
    port = tls_gateway.tls_port
    existing = {"storage-driver": "vfs", "iptables": False, "ip6tables": False,
                "bridge": "none", "labels": ["rgw-test=kept"], "debug": True,
                "registry-mirrors": ["https://mirror.invalid"]}
    daemon.config_file = daemon.root / "daemon.json"
    daemon.config_file.write_text(json.dumps(existing, indent=4))
    daemon.sandbox = sandbox

    done = sandbox.gateway_cli("client", "docker", gateway_name(tls_gateway),
                               "--ca", str(pki.ca_path), "--daemon-json", str(daemon.config_file))

    written = json.loads(daemon.config_file.read_text())
    assert written == {**existing, "registry-mirrors": [f"https://hub.{DOMAIN}:{port}",
                                                        "https://mirror.invalid"]}
    [backup] = daemon.root.glob("daemon.json.bak-*")
    assert json.loads(backup.read_text()) == existing
    for host in (f"hub.{DOMAIN}:{port}", f"ghcr.{DOMAIN}:{port}"):
        assert (sandbox.etc_docker / "certs.d" / host / "ca.crt").read_bytes() == \
            pki.ca_path.read_bytes()
    assert f"ghcr.io/OWNER/IMAGE  ->  ghcr.{DOMAIN}:{port}/OWNER/IMAGE" in done.stdout

    daemon.start()
    info = json.loads(daemon.docker("info", "--format", "{{json .}}").stdout)
    assert f"https://hub.{DOMAIN}:{port}/" in info["RegistryConfig"]["Mirrors"]
    assert "rgw-test=kept" in info["Labels"] and info["Driver"] == "vfs"

    name = hub_repository.split("/", 1)[1]
    daemon.pull(f"docker.io/library/{name}")
    found = daemon.inspect_image(f"{name}:latest")
    assert found["Id"] == hub_image.config.digest
    assert f"{name}@{hub_image.digest}" in found["RepoDigests"]
    fetched = {s.path.rsplit("/", 1)[1] for s in world.hub.proxy.blob_requests(hub_repository)}
    assert fetched == {b.digest for b in hub_image.blobs}

    explicit = f"ghcr.{DOMAIN}:{port}/{ghcr_repository}"
    daemon.pull(explicit)
    found = daemon.inspect_image(f"{explicit}:latest")
    assert found["Id"] == ghcr_image.config.digest
    assert found["RootFS"]["Layers"] == list(ghcr_image.diff_ids)

    report = sandbox.gateway_cli("doctor", gateway_name(tls_gateway), "--ca",
                                 str(pki.ca_path), "--docker-host",
                                 f"unix://{daemon.socket_path}", "--daemon-json",
                                 str(daemon.config_file), check=False)
    assert report.returncode == 0, report.stdout + report.stderr
    assert f"the Docker daemon uses https://hub.{DOMAIN}:{port} as its docker.io mirror" \
        in report.stdout

    # The CA really matters: dockerd verifies the certificate (the sandbox address is
    # not loopback), so a host whose certs.d lost its ca.crt is refused.
    (sandbox.etc_docker / "certs.d" / f"quay.{DOMAIN}:{port}" / "ca.crt").unlink()
    refused = daemon.docker("pull", f"quay.{DOMAIN}:{port}/owner/anything", check=False)
    assert refused.returncode != 0
    assert "x509" in refused.stderr or "certificate" in refused.stderr, refused.stderr


# -- containerd ---------------------------------------------------------------------------------


@dataclass
class Containerd:
    root: Path
    sandbox: Sandbox
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "containerd.log"

    def start(self) -> None:
        binary = require_tool("containerd")
        require_tool("ctr")
        config = self.root / "config.toml"
        config.write_text("\n".join([
            "version = 2",
            f'root = "{self.root / "root"}"',
            f'state = "{self.root / "state"}"',
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            # Keep everything under our directory (the opt plugin defaults to /opt/containerd).
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{self.root / "opt"}"',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.root / "ttrpc.sock"}"',
            "[debug]",
            '  level = "debug"',
        ]) + "\n")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.sandbox.command(binary, "--config", str(config)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: self.ctr("version", check=False).returncode == 0, what="containerd",
                 process=self.process, timeout=30,
                 diagnostics=lambda: self.log_path.read_text(errors="replace")[-3000:])

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run("ctr", "--address", str(self.address), "--namespace", "rgw",
                                *args, check=check)

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            stop_process(self.process, grace=15)
            self.process = None


@pytest.fixture
def containerd(sandbox: Sandbox) -> Iterator[Containerd]:
    root = Path(tempfile.mkdtemp(prefix="rgw-ctd-", dir="/tmp"))
    daemon = Containerd(root, sandbox)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_containerd_pulls_two_registries_through_one_url_by_ns(
        world: World, pki: Pki, tls_gateway: TlsGateway, sandbox: Sandbox,
        containerd: Containerd) -> None:
    repository = unique_repository("owner")
    # Same repository name on both upstreams, different bytes: only ns= tells them apart.
    ghcr_image = world.ghcr.push(repository, make_image())
    quay_image = world.quay.push(repository, make_image(oci=True))
    hosts_dir = containerd.root / "certs.d"
    # One URL whose host no route claims: the gateway routes by containerd's ?ns=.
    url = f"https://mirror.{DOMAIN}:{tls_gateway.tls_port}"

    done = sandbox.gateway_cli("client", "containerd", url, "--ca", str(pki.ca_path),
                               "--config-path", str(hosts_dir), "--containerd-config",
                               str(containerd.root / "config.toml"))
    assert "config_path" in done.stdout
    assert (hosts_dir / "ghcr.io" / "ca.crt").read_bytes() == pki.ca_path.read_bytes()

    for registry, image in (("ghcr.io", ghcr_image), ("quay.io", quay_image)):
        reference = f"{registry}/{repository}:latest"
        containerd.ctr("images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter",
                       "native", reference)
        listed = containerd.ctr("images", "ls").stdout
        line = next(line for line in listed.splitlines() if line.startswith(reference))
        assert image.digest in line, listed
    for upstream, image in ((world.ghcr, ghcr_image), (world.quay, quay_image)):
        fetched = {s.path.rsplit("/", 1)[1] for s in upstream.proxy.blob_requests(repository)}
        assert fetched == {b.digest for b in image.blobs}


# -- podman, skopeo, crane -------------------------------------------------------------------------


def containers_env(root: Path) -> dict[str, str]:
    home = root / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(home)}


@pytest.fixture(scope="module")
def podman_configured(pki: Pki, tls_gateway: TlsGateway, sandbox: Sandbox) -> Path:
    """`registry-gateway client podman` with its default paths (the sandbox's own
    /etc/containers): returns the drop-in it wrote."""
    sandbox.gateway_cli("client", "podman", gateway_name(tls_gateway), "--ca", str(pki.ca_path))
    drop_in = sandbox.etc_containers / "registries.conf.d" / "50-registry-gateway.conf"
    assert drop_in.is_file()
    port = tls_gateway.tls_port
    assert f'location = "hub.{DOMAIN}:{port}"' in drop_in.read_text()
    assert (sandbox.etc_containers / "certs.d" / f"ghcr.{DOMAIN}:{port}" / "ca.crt").is_file()
    return drop_in


def test_podman_pulls_through_the_drop_in(world: World, sandbox: Sandbox,
                                         podman_configured: Path) -> None:
    podman = require_tool("podman")
    require_tool("crun")
    hub_repository = unique_repository("library")
    hub_image = world.hub.push(hub_repository, make_image())
    ghcr_repository = unique_repository("owner")
    ghcr_image = world.ghcr.push(ghcr_repository, make_image(oci=True))
    root = Path(tempfile.mkdtemp(prefix="rgw-pod-", dir="/tmp"))
    flags = ["--root", str(root / "storage"), "--runroot", str(root / "run"),
             "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
             "--events-backend", "none", "--tmpdir", str(root / "tmp")]
    environment = containers_env(root)
    try:
        for reference, image in ((f"docker.io/library/{hub_repository.split('/', 1)[1]}",
                                  hub_image), (f"ghcr.io/{ghcr_repository}", ghcr_image)):
            sandbox.run(podman, *flags, "pull", "--quiet", f"{reference}:latest",
                        env=environment)
            inspected = json.loads(sandbox.run(podman, *flags, "image", "inspect",
                                               f"{reference}:latest", env=environment).stdout)
            assert inspected[0]["Digest"] == image.digest
            assert inspected[0]["RootFS"]["Layers"] == list(image.diff_ids)
    finally:
        sandbox.run(podman, *flags, "system", "reset", "--force", env=environment, check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_skopeo_copies_through_the_drop_in(world: World, sandbox: Sandbox,
                                          podman_configured: Path, tmp_path: Path) -> None:
    skopeo = require_tool("skopeo")
    repository = unique_repository("owner")
    image = world.quay.push(repository, make_image())
    destination = tmp_path / "copied"

    sandbox.run(skopeo, "copy", f"docker://quay.io/{repository}:latest", f"dir:{destination}",
                env=containers_env(tmp_path))

    assert (destination / "manifest.json").read_bytes() == image.manifest.data
    for blob in image.blobs:
        assert (destination / blob.digest.split(":", 1)[1]).read_bytes() == blob.data
    assert {s.path.rsplit("/", 1)[1] for s in world.quay.proxy.blob_requests(repository)} == \
        {b.digest for b in image.blobs}


def test_crane_copies_by_explicit_host(world: World, pki: Pki, tls_gateway: TlsGateway,
                                       sandbox: Sandbox, tmp_path: Path) -> None:
    crane = tool("crane")
    repository = unique_repository("owner")
    image = world.ghcr.push(repository, make_image())
    with run_registry(tmp_path / "destination", name="crane destination") as destination:
        # crane talks plain HTTP to 127.0.0.1; inside the sandbox that port leads here.
        sandbox.forward(("127.0.0.1", destination.port), ("127.0.0.1", destination.port))
        environment = {**containers_env(tmp_path), "SSL_CERT_FILE": str(pki.ca_path),
                       "DOCKER_CONFIG": str(tmp_path / "docker-config")}
        source = f"ghcr.{DOMAIN}:{tls_gateway.tls_port}/{repository}:latest"

        digest = sandbox.run(crane, "digest", source, env=environment).stdout.strip()
        sandbox.run(crane, "copy", source, f"127.0.0.1:{destination.port}/copied/image:v1",
                    env=environment)

        assert digest == image.digest
        copied = destination.client().get("/v2/copied/image/manifests/v1",
                                          accept=image.manifest.media_type)
        assert copied.status == 200 and copied.body == image.manifest.data


# -- certificates replaced on disk ----------------------------------------------------------------


def peer_serial(port: int, ca_path: Path, server_name: str) -> int:
    context = ssl.create_default_context(cafile=str(ca_path))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as wrapped:
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 with the SNI and certificate check of a gateway host name."""

    def __init__(self, port: int, server_name: str, ca_path: Path) -> None:
        super().__init__("127.0.0.1", port, timeout=10)
        self.server_name = server_name
        self.tls = ssl.create_default_context(cafile=str(ca_path))

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(raw, server_hostname=self.server_name)

    def putrequest(self, method: str, url: str, skip_host: bool = False,
                   skip_accept_encoding: bool = False) -> None:
        super().putrequest(method, url, skip_host=True, skip_accept_encoding=True)
        self.putheader("Host", f"{self.server_name}:{self.port}")


def leaf_serial(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


@pytest.mark.parametrize("trigger", ["poll", "sighup"])
def test_replaced_certificate_is_served_to_new_connections_without_restart(
        world: World, tmp_path: Path, trigger: str) -> None:
    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    certs = tmp_path / "certs"
    now = datetime.datetime.now(datetime.UTC)
    first = ca.issue_cert(f"*.{DOMAIN}", not_after=now + datetime.timedelta(days=3))
    directory = certs / "live" / DOMAIN  # certbot's layout this time
    directory.mkdir(parents=True)
    for name, pem in (("fullchain.pem", first.cert_chain_pems[0]),
                      ("privkey.pem", first.private_key_pem)):
        pem.write_to_path(str(directory / name))
    interval = "0.5" if trigger == "poll" else "3600"
    with run_tls_gateway(tmp_path / "gw", gw_routes(world), certs, ca_path,
                         "--tls-reload", interval) as running:
        port = running.tls_port
        assert peer_serial(port, ca_path, f"hub.{DOMAIN}") == leaf_serial(first)
        # A client connection that stays open across the renewal.
        kept = NamedHTTPSConnection(port, f"hub.{DOMAIN}", ca_path)
        kept.request("GET", "/v2/")
        assert kept.getresponse().read() == b"{}"

        renewed = ca.issue_cert(f"*.{DOMAIN}", not_after=now + datetime.timedelta(days=90))
        staging = tmp_path / "staging"
        staging.mkdir()
        for name, pem in (("fullchain.pem", renewed.cert_chain_pems[0]),
                          ("privkey.pem", renewed.private_key_pem)):
            pem.write_to_path(str(staging / name))
            os.replace(staging / name, directory / name)  # as renewal hooks install files
        if trigger == "sighup":
            running.process.send_signal(signal.SIGHUP)

        deadline = time.monotonic() + 15
        while peer_serial(port, ca_path, f"hub.{DOMAIN}") != leaf_serial(renewed):
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            time.sleep(0.1)
        assert running.process.poll() is None  # the same process, never restarted
        kept.request("GET", "/v2/")
        assert kept.getresponse().read() == b"{}"
        kept.close()


def test_plain_http_listener_redirects_to_https(tls_gateway: TlsGateway) -> None:
    gateway = tls_gateway.gateway
    connection = http.client.HTTPConnection(gateway.host, gateway.port, timeout=10)
    connection.request("GET", "/v2/library/alpine/manifests/3",
                       headers={"Host": f"hub.{DOMAIN}:{gateway.port}"})
    response = connection.getresponse()
    assert response.status == 308
    assert response.getheader("Location") == \
        f"https://hub.{DOMAIN}:{tls_gateway.tls_port}/v2/library/alpine/manifests/3"
    connection.close()


# -- doctor ----------------------------------------------------------------------------------------


def test_doctor_reports_a_wrong_ca_and_an_unreachable_gateway_with_fixes(
        pki: Pki, tls_gateway: TlsGateway, sandbox: Sandbox, tmp_path: Path) -> None:
    name = gateway_name(tls_gateway)
    healthy = sandbox.gateway_cli("doctor", name, "--ca", str(pki.ca_path), "--docker-host",
                                  "unix:///nonexistent.sock", check=False)
    assert healthy.returncode == 0, healthy.stdout
    assert f"TLS verifies (certificate for {DOMAIN}, *.{DOMAIN}" in healthy.stdout
    assert f"ghcr.io -> ghcr.{name}" in healthy.stdout

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    wrong = sandbox.gateway_cli("doctor", name, "--ca", str(other_ca), check=False)
    assert wrong.returncode == 1
    assert f"hub.{name}: the certificate is not signed by the CA in {other_ca}" in wrong.stdout
    assert "fix:" in wrong.stdout and "is not the CA that signed" in wrong.stdout

    untrusted = sandbox.gateway_cli("doctor", name, check=False)
    assert untrusted.returncode == 1
    assert "not signed by a CA this machine trusts" in untrusted.stdout
    assert f"client docker {DOMAIN}:{tls_gateway.tls_port} --ca ca.crt" in untrusted.stdout

    closed = free_port()
    unreachable = sandbox.gateway_cli("doctor", f"{DOMAIN}:{closed}", check=False)
    assert unreachable.returncode == 1
    assert f"cannot connect to hub.{DOMAIN}:{closed}" in unreachable.stdout
    assert "connection refused" in unreachable.stdout
    assert f"--tls-listen 0.0.0.0:{closed}" in unreachable.stdout

    unknown = sandbox.gateway_cli("doctor", "nowhere.test", check=False)
    assert unknown.returncode == 1
    assert "hub.nowhere.test does not resolve" in unknown.stdout
    assert "wildcard *.nowhere.test" in unknown.stdout

