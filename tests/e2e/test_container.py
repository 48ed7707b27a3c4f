"""The container image and the compose file, as an operator uses them.

The image is built by a real dockerd (the machine's, or a private one when none runs)
from the repository's Dockerfile, on a Debian bookworm base this test makes with
debootstrap (no container registry is reachable here), with pip pointed at a wheelhouse
in the build context and no network at all during the build. The container then serves
on the host's loopback: its HEALTHCHECK turns healthy, it runs as a non-root user, and
skopeo pulls an image through it from a loopback docker-registry, digests verified. The
compose file is accepted by docker-compose, and its gateway service's settings (command,
read-only root, no capabilities, ports 80/443 as a non-root user) serve TLS as they say.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from tests.support.base_image import PYTHON_VERSION, base_tarball
from tests.support.dockerd import docker_client, run_dockerd
from tests.support.images import make_image
from tests.support.net import free_port
from tests.support.skopeo import DirLayout, Skopeo
from tests.support.tls_gateway import make_pki
from tests.support.tools import require_tool
from tests.support.upstreams import Upstream, unique_repository
from tests.support.wait import wait_for
from tests.support.wheels import REPOSITORY_ROOT, wheelhouse

pytestmark = pytest.mark.e2e

UID = 10001  # the Dockerfile's user


class Docker(Protocol):
    def docker(self, *args: str, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess[str]: ...


class MachineDocker:
    """The machine's own dockerd, through its default socket."""

    def __init__(self, client: str) -> None:
        self.client = client

    def docker(self, *args: str, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([self.client, *args], capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    client = docker_client()
    machine = subprocess.run([client, "info"], capture_output=True, timeout=30)
    if machine.returncode == 0:
        yield MachineDocker(client)
        return
    # overlay2 where it works: vfs copies the whole image for every build step (a build
    # took ~3 minutes on a busy 2-core machine instead of ~20 s).
    with ExitStack() as stack:
        try:
            daemon = stack.enter_context(run_dockerd(storage_driver="overlay2"))
        except (AssertionError, RuntimeError):
            daemon = stack.enter_context(run_dockerd())
        yield daemon


def build_context(destination: Path) -> Path:
    """What an operator's checkout holds (tracked and new files, as git sees them), plus a
    wheelhouse: the Dockerfile's documented offline build."""
    listed = subprocess.run(
        ["git", "-C", str(REPOSITORY_ROOT), "ls-files", "-z", "--cached", "--others",
         "--exclude-standard"], capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPOSITORY_ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    shutil.copytree(wheelhouse(PYTHON_VERSION), destination / "wheels")
    return destination


@pytest.fixture(scope="module")
def image(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway's image, built from the Dockerfile on the self-made base."""
    require_tool("debootstrap")
    tarball, made_in = base_tarball()
    tag = secrets.token_hex(4)
    base, built = f"rgw-test-base:{tag}", f"registry-gateway-test:{tag}"
    context = build_context(tmp_path_factory.mktemp("context"))
    started = time.monotonic()
    docker.docker("import", str(tarball), base, timeout=600)
    docker.docker("build", "--network", "none", "--build-arg", f"BASE={base}",
                  "--build-arg", "PIP_FIND_LINKS=/src/wheels", "--build-arg", "PIP_NO_INDEX=1",
                  "--tag", built, str(context), timeout=900)
    print(f"base made in {made_in:.0f}s (0: cached); import and build took "
          f"{time.monotonic() - started:.0f}s")
    try:
        yield built
    finally:
        docker.docker("image", "rm", "--force", built, base, check=False)


def inspect(docker: Docker, what: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(docker.docker("inspect", what).stdout)
    return found[0]


def wait_healthy(docker: Docker, name: str) -> None:
    """Until the image's HEALTHCHECK reports healthy; fails at once if the container exits."""

    def healthy() -> bool:
        state = inspect(docker, name)["State"]
        assert state["Running"], docker.docker("logs", name, check=False).stderr
        return bool(state.get("Health", {}).get("Status") == "healthy")

    wait_for(healthy, what=f"the health check of {name}", timeout=90, interval=0.5,
             diagnostics=lambda: docker.docker("logs", name, check=False).stderr[-3000:])


@pytest.fixture
def run_container(docker: Docker) -> Iterator[Callable[..., str]]:
    names: list[str] = []

    def run(*args: str) -> str:
        name = f"rgw-test-{secrets.token_hex(4)}"
        names.append(name)
        docker.docker("run", "--detach", "--name", name, *args)
        return name

    yield run
    for name in names:
        docker.docker("rm", "--force", "--volumes", name, check=False)


def test_image_is_small_non_root_and_has_a_health_check(docker: Docker, image: str) -> None:
    config = inspect(docker, image)["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert "/var/lib/registry-gateway" in config["Volumes"]
    assert config["Healthcheck"]["Test"][0] in ("CMD", "CMD-SHELL")
    assert config["Entrypoint"] == ["registry-gateway"]
    version = docker.docker("run", "--rm", "--network", "none", image, "--version").stdout
    assert version.startswith("registry-gateway ")
    # Multi-stage: the runtime stage holds the virtualenv, not the build.
    listing = docker.docker("run", "--rm", "--network", "none", "--entrypoint", "sh", image,
                            "-c", "ls -d /src /dist /opt/registry-gateway/bin/pip 2>&1; "
                            "du -sm /opt/registry-gateway").stdout
    for absent in ("'/src'", "'/dist'", "bin/pip'"):
        assert f"{absent}: No such file" in listing, listing
    venv_mib = int(listing.split()[-2])
    assert venv_mib < 120, f"the virtualenv is {venv_mib} MiB"
    print(f"image {inspect(docker, image)['Size'] / 2**20:.0f} MiB, virtualenv {venv_mib} MiB")


def test_container_turns_healthy_and_serves_a_pull(
        docker: Docker, image: str, run_container: Callable[..., str],
        start_upstream: Callable[..., Upstream], tmp_path: Path) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("team")
    pushed = upstream.push(repository, make_image(layer_sizes=(300 * 1024, 40 * 1024)),
                           tags=("1.0",))
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"default_route": "docker.io",
                                      "routes": {"docker.io": {"upstream": upstream.url}}}))
    routes.chmod(0o644)  # read by the container's own user
    port = free_port()
    name = run_container(
        "--network", "host", "--health-interval", "1s", "--health-start-period", "60s",
        # As docker-compose.yml runs it: read-only root, no capabilities, no privileges.
        "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        "--env", f"HEALTHCHECK_URL=http://127.0.0.1:{port}/healthz",
        "--volume", f"{routes}:/etc/registry-gateway/routes.yaml:ro",
        image, "serve", "--routes", "/etc/registry-gateway/routes.yaml",
        "--data-dir", "/var/lib/registry-gateway", "--listen", f"127.0.0.1:{port}")

    wait_healthy(docker, name)
    assert docker.docker("exec", name, "id", "-u").stdout.strip() == str(UID)
    owner = docker.docker("exec", name, "stat", "-c", "%u", "/var/lib/registry-gateway").stdout
    assert owner.strip() == str(UID)

    skopeo = Skopeo(tmp_path / "skopeo")
    out = tmp_path / "pulled"
    skopeo.copy(f"127.0.0.1:{port}/{repository}:1.0", f"dir:{out}", "--preserve-digests")
    layout = DirLayout(out)
    assert layout.manifest() == pushed.manifest.data
    blobs = layout.blob_digests()
    assert set(blobs) == {blob.digest for blob in pushed.blobs}
    assert all(name_ == content for name_, content in blobs.items()), blobs
    assert upstream.proxy.blob_requests(repository), "the container never asked the upstream"
    # Cached under the volume by the unprivileged user.
    stored = docker.docker("exec", name, "find", "/var/lib/registry-gateway", "-type", "f",
                           "-user", str(UID)).stdout
    assert stored.strip(), "nothing cached in the data volume"


def test_compose_file_is_accepted(tmp_path: Path) -> None:
    compose = require_tool("docker-compose")
    for profile in ((), ("--profile", "monitoring")):
        done = subprocess.run([compose, "--project-directory", str(REPOSITORY_ROOT),
                               "--file", str(REPOSITORY_ROOT / "docker-compose.yml"),
                               *profile, "config"], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        document = yaml.safe_load(done.stdout)
        gateway = document["services"]["gateway"]
        targets = [v if isinstance(v, str) else v.get("target") for v in gateway["volumes"]]
        assert any("/var/lib/registry-gateway" in str(v) for v in targets), targets
        assert {"published": 443, "target": 443} in gateway["ports"], gateway["ports"]
    services = document["services"]
    assert {"gateway", "prometheus", "grafana"} <= set(services)


_PROBE = """
import http.client, ssl, sys
context = ssl.create_default_context(cafile="/etc/registry-gateway/ca.pem")
https = http.client.HTTPSConnection("127.0.0.1", 443, context=context, timeout=10)
https.sock = context.wrap_socket(__import__("socket").create_connection(("127.0.0.1", 443)),
                                 server_hostname="hub.gw.test")
statuses = []
for path in ("/v2/", "/readyz", "/_gateway/"):
    https.request("GET", path, headers={"Host": "hub.gw.test"})
    answer = https.getresponse()
    answer.read()
    statuses.append(str(answer.status))
secure = ",".join(statuses)
plain = http.client.HTTPConnection("127.0.0.1", 80, timeout=10)
plain.request("GET", "/v2/", headers={"Host": "hub.gw.test"})
answer = plain.getresponse()
print(secure, answer.status, answer.getheader("Location"))
"""


def compose_service(project: Path) -> dict[str, Any]:
    done = subprocess.run([require_tool("docker-compose"), "--project-directory", str(project),
                           "--file", str(project / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, timeout=60, cwd=project)
    assert done.returncode == 0, done.stderr
    service: dict[str, Any] = yaml.safe_load(done.stdout)["services"]["gateway"]
    return service


def run_arguments(service: dict[str, Any]) -> list[str]:
    """`docker run` options for what the compose file asks of the gateway's container,
    except its published ports: the test's dockerd has no bridge, so --network none."""
    args = ["--network", "none", *(["--init"] if service.get("init") else []),
            *(["--read-only"] if service.get("read_only") else [])]
    for mount in service.get("tmpfs", []):
        args += ["--tmpfs", mount]
    for capability in service.get("cap_drop", []):
        args += ["--cap-drop", capability]
    for option in service.get("security_opt", []):
        args += ["--security-opt", option]
    for key, value in service.get("sysctls", {}).items():
        args += ["--sysctl", f"{key}={value}"]
    for key, value in service.get("environment", {}).items():
        args += ["--env", f"{key}={value}"]
    for name, limit in service.get("ulimits", {}).items():
        args += ["--ulimit", f"{name}={limit['soft']}:{limit['hard']}"]
    for volume in service["volumes"]:
        source, target, *_mode = volume.split(":")
        # A named volume becomes an anonymous one (removed with the container).
        args += ["--volume", target if not source.startswith("/") else volume]
    return args


def test_the_compose_settings_serve_tls_on_443_as_non_root(
        docker: Docker, image: str, run_container: Callable[..., str], tmp_path: Path) -> None:
    """The gateway service exactly as docker-compose.yml runs it (command, read-only root,
    no capabilities, the sysctl for ports below 1024, the directory mounted as
    /etc/registry-gateway, the health-check URL), with an acme.sh wildcard in certs/."""
    project = tmp_path / "srv"
    project.mkdir()
    shutil.copy(REPOSITORY_ROOT / "docker-compose.yml", project)
    done = subprocess.run([sys.executable, "-m", "gateway", "init", "--domain", "gw.test",
                           "--output", str(project / "routes.yaml")], cwd=REPOSITORY_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pki = make_pki(project, "gw.test")  # certs/gw.test_ecc/, and ca.pem beside
    for path in [project, *project.rglob("*")]:
        os.chown(path, UID, UID)  # what the printed --reloadcmd "chown 10001 ..." does
    service = compose_service(project)
    assert pki.certs == project / "certs"
    name = run_container(*run_arguments(service), "--health-interval", "1s", image,
                         *service["command"])

    wait_healthy(docker, name)
    secure, plain, location = docker.docker("exec", name, "python3", "-c",
                                            _PROBE).stdout.split()
    # /v2/, /readyz and the status page (its files ship in the wheel) over TLS.
    assert (secure, plain) == ("200,200,200", "308")
    assert location == "https://hub.gw.test/v2/", location
    assert docker.docker("exec", name, "id", "-u").stdout.strip() == str(UID)
    status = docker.docker("exec", name, "sh", "-c", "grep ^Cap /proc/1/status").stdout
    assert "CapEff:\t0000000000000000" in status, status
