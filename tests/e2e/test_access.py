"""Logins and address rules with real clients over real TLS: `docker login` + pull (and
docker's registry-mirrors mode), `podman login`, `skopeo --creds`, and containerd with a
static Authorization header in hosts.toml.

The clients run in the sandbox of tests/support/sandbox.py; each of its ports relays to
the gateway's TLS listener from a different 127.0.0.0/8 source address, so one gateway
sees the same client as an address that may pull anonymously, one that must log in, and
one that is denied.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from tests.support.images import make_image
from tests.support.net import free_port
from tests.support.sandbox import (
    SANDBOX_ADDRESS,
    Sandbox,
    SandboxDockerd,
    containers_env,
    run_containerd,
    run_sandbox,
)
from tests.support.tls_gateway import Pki, TlsGateway, make_pki, run_tls_gateway
from tests.support.tools import require_tool
from tests.support.upstreams import unique_repository
from tests.support.world import World

pytestmark = pytest.mark.e2e

DOMAIN = "gw.test"
NAMES = (f"hub.{DOMAIN}", f"ghcr.{DOMAIN}")
USER, PASSWORD = "alice", "pull-through-pw-7"
SOURCES = {"anonymous": "127.0.0.10", "login": "127.0.0.20", "denied": "127.0.0.30"}


@dataclass
class Access:
    pki: Pki
    gateway: TlsGateway
    sandbox: Sandbox
    ports: dict[str, int]  # inside the sandbox, by kind of client address

    def host(self, kind: str, label: str = "ghcr") -> str:
        return f"{label}.{DOMAIN}:{self.ports[kind]}"


@pytest.fixture(scope="module")
def access(world: World, tmp_path_factory: pytest.TempPathFactory,
           live_logs: Any) -> Iterator[Access]:
    root = tmp_path_factory.mktemp("access-e2e")
    pki = make_pki(root, DOMAIN)
    users = root / "users.htpasswd"
    users.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(5)).decode()}\n")
    routes = {
        "base_domains": [DOMAIN], "default_route": "docker.io",
        "access": {"users": str(users), "anonymous": [SOURCES["anonymous"]],
                   "deny": [SOURCES["denied"]]},
        "routes": {"docker.io": {"upstream": world.hub.url},
                   "ghcr.io": {"upstream": world.ghcr.url,
                               "repositories": {"deny": ["blocked/*"]}}}}
    with run_tls_gateway(root / "gateway", routes, pki.certs, pki.ca_path,
                         server_name=f"hub.{DOMAIN}") as gateway, \
            live_logs.watching("access TLS gateway stderr", gateway.gateway.log), \
            run_sandbox(NAMES) as sandbox:
        ports = {}
        for kind, source in SOURCES.items():
            ports[kind] = free_port()
            sandbox.forward((SANDBOX_ADDRESS, ports[kind]), ("127.0.0.1", gateway.tls_port),
                            source=source)
            for name in NAMES:  # the CA, where docker, podman and skopeo look for it
                for etc in (sandbox.etc_docker, sandbox.etc_containers):
                    directory = etc / "certs.d" / f"{name}:{ports[kind]}"
                    directory.mkdir(parents=True, exist_ok=True)
                    shutil.copy(pki.ca_path, directory / "ca.crt")
        yield Access(pki, gateway, sandbox, ports)


def refused(done: Any, *words: str) -> str:
    """The output of a client command that must have failed, checked for `words`."""
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode != 0, output
    assert any(word in output.lower() for word in words), output
    return output


# -- docker ---------------------------------------------------------------------------------


def test_docker_login_and_pull_by_address(world: World, access: Access) -> None:
    repository = unique_repository()
    image = world.ghcr.push(repository, make_image())
    hub_repository = unique_repository("library")
    hub_image = world.hub.push(hub_repository, make_image())
    blocked = unique_repository("blocked")
    world.ghcr.push(blocked, make_image())
    daemon = SandboxDockerd()
    try:
        daemon.config_file = daemon.root / "daemon.json"
        daemon.config_file.write_text(json.dumps({
            "storage-driver": "vfs", "iptables": False, "ip6tables": False, "bridge": "none",
            "registry-mirrors": [f"https://{access.host('anonymous', 'hub')}"]}))
        daemon.sandbox = access.sandbox
        daemon.start()
        # docker sends no credentials to a mirror: anonymous from an allowed address works
        # although /v2/ asks for a login.
        name = hub_repository.split("/", 1)[1]
        daemon.pull(f"docker.io/library/{name}")
        assert daemon.inspect_image(f"{name}:latest")["Id"] == hub_image.config.digest

        anonymous = f"{access.host('anonymous')}/{repository}"
        daemon.pull(anonymous)
        assert daemon.inspect_image(f"{anonymous}:latest")["Id"] == image.config.digest

        host = access.host("login")
        stranger = f"{host}/{repository}"
        refused(daemon.docker("pull", stranger, check=False), "unauthorized", "credentials")
        refused(daemon.docker("login", "-u", USER, "-p", "wrong", host, check=False),
                "unauthorized", "401")
        done = daemon.docker("login", "-u", USER, "-p", PASSWORD, host)
        assert "Login Succeeded" in done.stdout
        daemon.pull(stranger)
        assert daemon.inspect_image(f"{stranger}:latest")["RootFS"]["Layers"] == \
            list(image.diff_ids)

        denied = access.host("denied")
        daemon.docker("login", "-u", USER, "-p", PASSWORD, denied, check=False)
        refused(daemon.docker("pull", f"{denied}/{repository}", check=False), "denied")
        refused(daemon.docker("pull", f"{access.host('anonymous')}/{blocked}", check=False),
                "denied")
        assert world.ghcr.proxy.requests_for(blocked) == []
    finally:
        daemon.stop()


# -- podman, skopeo ---------------------------------------------------------------------------


def test_podman_login_and_pull(world: World, access: Access) -> None:
    podman = require_tool("podman")
    require_tool("crun")
    repository = unique_repository()
    image = world.ghcr.push(repository, make_image(oci=True))
    root = Path(tempfile.mkdtemp(prefix="rgw-pod-", dir="/tmp"))
    flags = ["--root", str(root / "storage"), "--runroot", str(root / "run"),
             "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
             "--events-backend", "none", "--tmpdir", str(root / "tmp")]
    environment = containers_env(root)
    authfile = str(root / "auth.json")
    sandbox = access.sandbox

    def run(*args: str, check: bool = True) -> Any:
        return sandbox.run(podman, *flags, *args, env=environment, check=check)

    try:
        host = access.host("login")
        reference = f"{host}/{repository}:latest"
        refused(run("pull", reference, check=False), "unauthorized",
                "authentication required")
        refused(run("login", "--authfile", authfile, "-u", USER, "-p", "wrong", host,
                    check=False), "unauthorized", "invalid username/password")
        run("login", "--authfile", authfile, "-u", USER, "-p", PASSWORD, host)
        run("pull", "--quiet", "--authfile", authfile, reference)
        assert json.loads(run("image", "inspect", reference).stdout)[0]["Digest"] == \
            image.digest
        anonymous = f"{access.host('anonymous')}/{repository}:latest"
        run("pull", "--quiet", anonymous)  # no login, from the anonymous address
        refused(run("pull", "--authfile", authfile,
                    f"{access.host('denied')}/{repository}:latest", check=False),
                "denied", "403")
    finally:
        run("system", "reset", "--force", check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_skopeo_with_creds(world: World, access: Access, tmp_path: Path) -> None:
    skopeo = require_tool("skopeo")
    repository = unique_repository()
    image = world.ghcr.push(repository, make_image())
    environment = containers_env(tmp_path)

    def inspect(kind: str, *creds: str) -> Any:
        return access.sandbox.run(skopeo, "inspect", "--raw", *creds,
                                  f"docker://{access.host(kind)}/{repository}:latest",
                                  env=environment, check=False)

    good = inspect("login", "--creds", f"{USER}:{PASSWORD}")
    assert good.returncode == 0, good.stderr
    assert good.stdout.encode() == image.manifest.data
    refused(inspect("login"), "unauthorized", "authentication required")
    refused(inspect("login", "--creds", f"{USER}:wrong"), "unauthorized",
            "authentication required")
    assert inspect("anonymous").stdout.encode() == image.manifest.data
    refused(inspect("denied", "--creds", f"{USER}:{PASSWORD}"), "denied", "403")


# -- containerd ---------------------------------------------------------------------------------


def hosts_dir(root: Path, access: Access, kind: str, header: str | None) -> Path:
    """A hosts.toml for ghcr.io that sends every request to the gateway (with a static
    Authorization header when given): how a kubelet's containerd logs in."""
    host = f"https://{access.host(kind)}"
    lines = ['server = "https://ghcr.io"', f'[host."{host}"]',
             '  capabilities = ["pull", "resolve"]', f'  ca = "{access.pki.ca_path}"']
    if header is not None:
        lines += [f'  [host."{host}".header]', f'    Authorization = ["{header}"]']
    directory = root / "ghcr.io"
    directory.mkdir(parents=True)
    (directory / "hosts.toml").write_text("\n".join(lines) + "\n")
    return root


def test_containerd_with_a_static_authorization_header(world: World, access: Access,
                                                       tmp_path: Path) -> None:
    repository = unique_repository()
    image = world.ghcr.push(repository, make_image())
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with run_containerd(access.sandbox) as containerd:
        reference = f"ghcr.io/{repository}:latest"

        def pull(hosts: Path) -> Any:
            return containerd.ctr("images", "pull", "--hosts-dir", str(hosts),
                                  "--snapshotter", "native", reference, check=False)

        refused(pull(hosts_dir(tmp_path / "none", access, "login", None)), "401",
                "unauthorized")
        refused(pull(hosts_dir(tmp_path / "wrong", access, "login",
                               "Basic " + base64.b64encode(b"alice:nope").decode())),
                "401", "unauthorized")
        done = pull(hosts_dir(tmp_path / "good", access, "login", f"Basic {token}"))
        assert done.returncode == 0, done.stdout + done.stderr
        listed = containerd.ctr("images", "ls").stdout
        assert image.digest in next(line for line in listed.splitlines()
                                    if line.startswith(reference)), listed
        refused(pull(hosts_dir(tmp_path / "denied", access, "denied", f"Basic {token}")),
                "403", "denied")


def test_the_gateway_log_names_users_and_rules_but_no_secret(access: Access) -> None:
    """After the logins above (right and wrong): user and rule in the access log, and
    neither a password, nor a hash, nor an Authorization header anywhere in the log."""
    log = access.gateway.gateway.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"ts"')]
    assert any(line["user"] == USER and line["rule"] == "access.users" for line in lines)
    assert any(line["rule"] == f"access.deny {SOURCES['denied']}/32" for line in lines)
    users = Path(access.pki.ca_path).parent / "users.htpasswd"
    stored = users.read_text().split(":", 1)[1].strip()
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, stored, token, "Basic "):
        assert secret not in log
