"""`registry-gateway init --domain`: the routes.yaml it writes passes `check`, routes every
preset's mirror host (hub.example.com -> docker.io, ...), is served as such by a running
gateway, and is never written over without --force; the next steps come in both languages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import load_config_file
from gateway.routing import Router
from tests.support.net import free_port, http_answers, stop_process
from tests.support.wait import wait_for

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
HOSTS = {"hub": "docker.io", "gcr": "gcr.io", "ghcr": "ghcr.io", "quay": "quay.io",
         "k8s": "registry.k8s.io", "k8s-gcr": "k8s.gcr.io", "mcr": "mcr.microsoft.com",
         "nvcr": "nvcr.io", "elastic": "docker.elastic.co"}


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPOSITORY_ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "srv" / "routes.yaml"
    path.parent.mkdir()
    done = gateway("init", "--domain", "Example.COM", "--output", str(path))
    assert done.returncode == 0, done.stderr
    return path, done.stdout


def test_init_output_passes_check_and_routes_every_mirror_host(
        written: tuple[Path, str]) -> None:
    path, _ = written
    checked = gateway("check", str(path))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.rstrip().endswith("is valid")
    lines = checked.stdout.splitlines()
    for label, registry in HOSTS.items():
        line = next(line for line in lines if line.strip().startswith(registry + " "))
        assert f"hosts: {label}.example.com " in line, line
    hub = next(line for line in lines if line.strip().startswith("docker.io "))
    assert "-> https://registry-1.docker.io " in hub

    router = Router(load_config_file(path))
    for label, registry in HOSTS.items():
        route = router.by_host(f"{label}.example.com")
        assert route is not None and route.name == registry, label
    assert router.by_host("nope.example.com") is None
    assert "# " in path.read_text(), "the file is commented"


def test_init_prints_the_next_steps_in_english_and_chinese(written: tuple[Path, str]) -> None:
    path, steps = written
    english, _, chinese = steps.partition("下一步")
    for expected in ("*.example.com.   A", "acme.sh --issue --dns dns_cf -d example.com "
                     "-d '*.example.com'", f"--fullchain-file {path.parent}/certs/fullchain.pem",
                     f"--key-file       {path.parent}/certs/privkey.pem",
                     "docker-compose up -d", "deploy/install.sh",
                     "registry-gateway client docker example.com",
                     "registry-gateway client containerd example.com",
                     "registry-gateway client k8s example.com"):
        assert expected in english, expected
    for expected in ("泛解析", "acme.sh --issue --dns dns_cf", "泛域名证书", "启动网关",
                     "registry-gateway client podman example.com"):
        assert expected in chinese, expected


def test_init_never_replaces_a_file_without_force(written: tuple[Path, str]) -> None:
    path, _ = written
    path.write_text("# mine\n")
    refused = gateway("init", "--domain", "example.org", "--output", str(path))
    assert refused.returncode == 1
    assert "exists" in refused.stderr and "--force" in refused.stderr
    assert path.read_text() == "# mine\n"
    forced = gateway("init", "--domain", "example.org", "--output", str(path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "base_domains:\n  - example.org\n" in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["routes.yaml"], "no temporary left"


@pytest.mark.parametrize("domain", ["*.example.com", "https://example.com", "example",
                                    "exa mple.com", "-bad.example.com"])
def test_init_refuses_what_is_not_a_base_domain(tmp_path: Path, domain: str) -> None:
    done = gateway("init", f"--domain={domain}", "--output", str(tmp_path / "routes.yaml"))
    assert done.returncode == 2
    assert "not a domain name" in done.stderr
    assert not (tmp_path / "routes.yaml").exists()


def test_init_to_stdout_prints_the_same_table(written: tuple[Path, str]) -> None:
    path, _ = written
    printed = gateway("init", "--domain", "example.com", "--output", "-")
    assert printed.returncode == 0
    assert printed.stdout == path.read_text()
    assert "下一步" in printed.stderr


@pytest.fixture
def serving(written: tuple[Path, str], tmp_path: Path) -> Iterator[int]:
    """The written table served as is (nothing is pulled: no upstream is ever asked)."""
    path, _ = written
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with (tmp_path / "gateway.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--routes", str(path), "--data-dir",
             str(tmp_path / "data"), "--listen", f"127.0.0.1:{port}"], cwd=REPOSITORY_ROOT,
            env=environment, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: http_answers("127.0.0.1", port, "/healthz"), what="gateway",
                 process=process, diagnostics=(tmp_path / "gateway.log").read_text)
        yield port
    finally:
        stop_process(process)


def test_a_gateway_serving_the_table_lists_hub_example_com_as_docker_hub(serving: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{serving}/_gateway/routes",
                                timeout=10) as response:
        listing = json.load(response)
    assert listing["base_domains"] == ["example.com"]
    assert listing["default_route"] == "docker.io"
    labels = {route["name"]: route["label"] for route in listing["routes"]}
    assert labels == {registry: label for label, registry in HOSTS.items()}
