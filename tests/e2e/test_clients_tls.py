"""Real clients over real TLS, each configured by `registry-gateway client`: dockerd,
containerd (ctr), podman, skopeo and crane pull through a gateway that terminates TLS
with a certificate from a CA made here, for host names that route by label
(hub.gw.test, ghcr.gw.test, ...); plus certificate reload and `registry-gateway doctor`.

The clients run in the sandbox of tests/support/sandbox.py (a network and mount
namespace where these names resolve to an address whose only way out is a relay to the
gateway), so a pull that works came through the gateway and nothing reaches the
internet.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.images import make_image
from tests.support.net import free_port
from tests.support.registry import run_registry
from tests.support.sandbox import (
    SANDBOX_ADDRESS,
    Containerd,
    Sandbox,
    SandboxDockerd,
    containers_env,
    run_containerd,
    run_sandbox,
)
from tests.support.tls_gateway import (
    NamedHTTPSConnection,
    Pki,
    TlsGateway,
    leaf_serial,
    make_pki,
    peer_serial,
    run_tls_gateway,
)
from tests.support.tools import local_tool, require_tool
from tests.support.upstreams import unique_repository
from tests.support.wait import wait_for
from tests.support.world import World

pytestmark = pytest.mark.e2e

DOMAIN = "gw.test"
NAMES = (DOMAIN, f"hub.{DOMAIN}", f"ghcr.{DOMAIN}", f"quay.{DOMAIN}", f"mirror.{DOMAIN}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), DOMAIN)


def gw_routes(world: World) -> dict[str, Any]:
    return {"base_domains": [DOMAIN], "default_route": "docker.io", "routes": {
        "docker.io": {"upstream": world.hub.url},
        "ghcr.io": {"upstream": world.ghcr.url},
        "quay.io": {"upstream": world.quay.url}}}


@pytest.fixture(scope="module")
def tls_gateway(world: World, pki: Pki, tmp_path_factory: pytest.TempPathFactory,
                live_logs: Any) -> Iterator[TlsGateway]:
    workdir = tmp_path_factory.mktemp("tls-gateway")
    with run_tls_gateway(workdir, gw_routes(world), pki.certs, pki.ca_path,
                         server_name=f"hub.{DOMAIN}") as running, \
            live_logs.watching("TLS gateway stderr", running.gateway.log):
        yield running


@pytest.fixture(scope="module")
def sandbox(tls_gateway: TlsGateway) -> Iterator[Sandbox]:
    with run_sandbox(NAMES) as box:
        box.forward((SANDBOX_ADDRESS, tls_gateway.tls_port), ("127.0.0.1", tls_gateway.tls_port))
        yield box


def gateway_name(tls_gateway: TlsGateway) -> str:
    """What a user types: the base domain and the gateway's HTTPS port."""
    return f"{DOMAIN}:{tls_gateway.tls_port}"


# -- docker ------------------------------------------------------------------------------------


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


@pytest.fixture
def containerd(sandbox: Sandbox) -> Iterator[Containerd]:
    with run_containerd(sandbox) as daemon:
        yield daemon


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
    crane = local_tool("crane")
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
                         "--tls-reload", interval, server_name=f"hub.{DOMAIN}") as running:
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

        wait_for(lambda: peer_serial(port, ca_path, f"hub.{DOMAIN}") == leaf_serial(renewed),
                 what="the renewed certificate to be served", timeout=15, interval=0.1)
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

