"""The systemd path: the unit is hardened and `systemd-analyze verify` accepts it, and
deploy/install.sh run into a fresh root (its own virtualenv, no systemd) installs a tree
whose ExecStartPre and ExecStart lines, run as systemd would run them, end with a gateway
that serves a pull from a loopback docker-registry and survives its ExecReload (SIGHUP).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.client import RegistryClient
from tests.support.images import ACCEPT_ALL_MANIFESTS, make_image, sha256_digest
from tests.support.net import free_port, http_answers, stop_process
from tests.support.tools import require_tool
from tests.support.upstreams import Upstream, unique_repository
from tests.support.wait import wait_for
from tests.support.wheels import REPOSITORY_ROOT, wheelhouse

pytestmark = pytest.mark.integration

UNIT = REPOSITORY_ROOT / "deploy" / "registry-gateway.service"
INSTALL = REPOSITORY_ROOT / "deploy" / "install.sh"


def unit_directives(path: Path) -> dict[str, list[str]]:
    """Every Key=value of a unit file, values of repeated keys in order."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def systemd_words(line: str, environment: dict[str, str]) -> list[str]:
    """An Exec line's words as systemd makes them: `$NAME` alone is split into words,
    `${NAME}` is put in place (systemd.service(5), "Command lines")."""
    words: list[str] = []
    for word in shlex.split(line):
        if word.startswith("$") and word[1:].isidentifier():
            words += environment.get(word[1:], "").split()
        else:
            for name, value in environment.items():
                word = word.replace("${" + name + "}", value)
            words.append(word)
    return words


def environment_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_the_unit_is_hardened() -> None:
    unit = unit_directives(UNIT)
    expected = {
        "ProtectSystem": ["strict"], "ProtectHome": ["yes"], "PrivateTmp": ["yes"],
        "NoNewPrivileges": ["yes"], "StateDirectory": ["registry-gateway"],
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
        "User": ["registry-gateway"],
    }
    for key, value in expected.items():
        assert unit.get(key) == value, key
    assert "ReadWritePaths" not in unit, "only the StateDirectory is writable"
    assert unit["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert "check --config /etc/registry-gateway/routes.yaml" in unit["ExecReload"][0]
    assert "--data-dir /var/lib/registry-gateway" in unit["ExecStart"][0]


@pytest.fixture
def installed(tmp_path: Path, start_upstream: Callable[..., Upstream]
              ) -> Iterator[tuple[Path, Upstream, int]]:
    """install.sh into a fresh root, routes naming a loopback upstream; yields (root,
    upstream, port of the installed listener)."""
    upstream = start_upstream("docker.io")
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"default_route": "docker.io",
                                      "routes": {"docker.io": {"upstream": upstream.url}}}))
    root, port = tmp_path / "root", free_port()
    environment = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    environment.update(PIP_FIND_LINKS=str(wheelhouse()), PIP_NO_INDEX="1")
    done = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--routes", str(routes),
         "--python", sys.executable, "--args", f"--listen 127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    yield root, upstream, port


def test_install_into_a_root_serves_from_its_exec_start(
        installed: tuple[Path, Upstream, int], tmp_path: Path) -> None:
    root, upstream, port = installed
    unit_path = root / "etc/systemd/system/registry-gateway.service"
    verify = subprocess.run([require_tool("systemd-analyze"), "verify", str(unit_path)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr
    assert "registry-gateway" not in verify.stderr, verify.stderr  # no warning about it

    unit = unit_directives(unit_path)
    assert unit["ReadWritePaths"] == [str(root / "var/lib/registry-gateway")]
    environment = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    environment.update(environment_file(root / "etc/registry-gateway/registry-gateway.env"))
    check = subprocess.run(systemd_words(unit["ExecStartPre"][0], environment),
                           capture_output=True, text=True, timeout=60, env=environment)
    assert check.returncode == 0, check.stderr

    repository = unique_repository("team")
    image = upstream.push(repository, make_image(), tags=("1.0",))
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        process = subprocess.Popen(systemd_words(unit["ExecStart"][0], environment),
                                   env=environment, stdout=out, stderr=out,
                                   stdin=subprocess.DEVNULL,
                                   cwd=unit["WorkingDirectory"][0])
    try:
        wait_for(lambda: http_answers("127.0.0.1", port), what="the installed gateway",
                 process=process, diagnostics=log.read_text)
        client = RegistryClient("127.0.0.1", port)
        assert client.request("GET", "/v2/").status == 200
        manifest = client.request("GET", f"/v2/{repository}/manifests/1.0",
                                  headers={"Accept": ACCEPT_ALL_MANIFESTS})
        assert manifest.status == 200 and manifest.body == image.manifest.data
        for blob in image.blobs:
            got = client.request("GET", f"/v2/{repository}/blobs/{blob.digest}")
            assert got.status == 200 and sha256_digest(got.body) == blob.digest
        assert any((root / "var/lib/registry-gateway").rglob("*")), "nothing cached"

        # ExecReload: the check, then SIGHUP; the service keeps serving.
        reload_check = subprocess.run(systemd_words(unit["ExecReload"][0], environment),
                                      capture_output=True, timeout=60, env=environment)
        assert reload_check.returncode == 0
        assert "reloaded" not in log.read_text()
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in log.read_text(), what="the reload log line",
                 process=process, diagnostics=log.read_text)
        assert client.request("GET", "/v2/").status == 200
        assert process.poll() is None
    finally:
        stop_process(process)


def test_install_again_upgrades_and_keeps_the_configuration(
        installed: tuple[Path, Upstream, int]) -> None:
    root, _, _ = installed
    routes = root / "etc/registry-gateway/routes.yaml"
    env_file = root / "etc/registry-gateway/registry-gateway.env"
    edited = routes.read_text() + "# edited by the operator\n"
    routes.write_text(edited)
    environment = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    environment.update(PIP_FIND_LINKS=str(wheelhouse()), PIP_NO_INDEX="1")
    again = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--python",
                            sys.executable, "--args", "--listen 127.0.0.1:1"],
                           capture_output=True, text=True, timeout=300, env=environment)
    assert again.returncode == 0, again.stderr
    assert "keeping" in again.stdout
    assert routes.read_text() == edited
    assert "127.0.0.1:1\n" not in env_file.read_text(), "the env file was replaced"
    version = subprocess.run([str(root / "opt/registry-gateway/bin/registry-gateway"),
                              "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("registry-gateway ")
