"""Access rules on real sockets: clients at different 127.0.0.0/8 source addresses, a
real upstream behind a counting proxy, and the client-machine tools refused the route
listing (a message, never a traceback). Real clients over TLS: tests/e2e/test_access.py.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from gateway import cli
from tests.support.gateway import Gateway, run_gateway
from tests.support.images import make_image
from tests.support.upstreams import unique_repository
from tests.support.world import World

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-pull-password"
ANONYMOUS = "127.0.0.10"  # may pull without a login
STRANGER = "127.0.0.20"  # must log in
DENIED = "127.0.0.30"  # access.deny: refused whatever it sends
ADMIN = "127.0.0.5"  # the only access.admin address (not 127.0.0.1: the tools are refused)


@pytest.fixture(scope="module")
def gateway(world: World, tmp_path_factory: pytest.TempPathFactory,
            live_logs: Any) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("access-gateway")
    users = workdir / "users.htpasswd"
    users.write_text(f"alice:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(5)).decode()}\n")
    routes = {
        "access": {"users": str(users), "anonymous": [f"{ANONYMOUS}/32"],
                   "deny": [DENIED], "admin": [ADMIN]},
        "default_route": "ghcr.io",
        "routes": {"ghcr.io": {"upstream": world.ghcr.url,
                               "repositories": {"deny": ["blocked/*"]}}},
    }
    with run_gateway(workdir, routes) as running, \
            live_logs.watching("access gateway stderr", running.log):
        yield running


def get(gateway: Gateway, path: str, source: str,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET from the loopback address `source` (the address the rules see)."""
    connection = http.client.HTTPConnection(gateway.host, gateway.port, timeout=10,
                                            source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def error_code(body: bytes) -> str:
    (error,) = json.loads(body)["errors"]
    return str(error["code"])


def login(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_rules_follow_the_real_client_address(world: World, gateway: Gateway) -> None:
    repository = unique_repository()
    image = world.ghcr.push(repository, make_image())
    path = f"/v2/{repository}/manifests/latest"

    status, _, body = get(gateway, path, ANONYMOUS)
    assert status == 200 and body == image.manifest.data
    status, headers, body = get(gateway, path, STRANGER)
    assert status == 401 and error_code(body) == "UNAUTHORIZED"
    assert headers["WWW-Authenticate"].startswith('Basic realm="registry-gateway"')
    status, _, body = get(gateway, path, STRANGER, login("alice", "wrong"))
    assert status == 401 and error_code(body) == "UNAUTHORIZED"
    status, _, body = get(gateway, path, STRANGER, login("alice", PASSWORD))
    assert status == 200 and body == image.manifest.data
    for headers_sent in ({}, login("alice", PASSWORD)):  # deny beats a good login
        status, _, body = get(gateway, path, DENIED, headers_sent)
        assert status == 403 and error_code(body) == "DENIED"
    assert len(world.ghcr.proxy.manifest_requests(repository)) == 1  # refusals never go up


def test_a_denied_repository_never_reaches_the_upstream(world: World,
                                                        gateway: Gateway) -> None:
    repository = unique_repository("blocked")
    image = world.ghcr.push(repository, make_image())
    for path in (f"/v2/{repository}/manifests/latest", f"/v2/{repository}/tags/list",
                 f"/v2/{repository}/blobs/{image.layers[0].digest}"):
        status, _, body = get(gateway, path, ANONYMOUS)
        assert status == 403 and error_code(body) == "DENIED", path
        status, _, _ = get(gateway, path, STRANGER, login("alice", PASSWORD))
        assert status == 403, path
    assert world.ghcr.proxy.requests_for(repository) == []


@pytest.mark.parametrize("path", ["/metrics", "/_gateway/routes"])
def test_operator_endpoints_answer_admin_addresses_only(gateway: Gateway, path: str) -> None:
    for source in (STRANGER, ANONYMOUS, "127.0.0.1"):
        status, _, body = get(gateway, path, source, login("alice", PASSWORD))
        assert status == 403 and error_code(body) == "DENIED", source
    status, _, body = get(gateway, path, ADMIN)
    assert status == 200 and body
    assert get(gateway, "/healthz", DENIED)[0] == 200  # load balancers' checks stay open


def test_refusals_are_counted_by_route_and_reason(gateway: Gateway) -> None:
    get(gateway, "/v2/ghcr.io/blocked/x/manifests/v1", ANONYMOUS)
    _, _, body = get(gateway, "/metrics", ADMIN)
    text = body.decode()
    assert 'gateway_refusals_total{reason="denied_repository",route="ghcr.io"}' in text
    assert 'gateway_refusals_total{reason="admin_only",route="-"}' in text
    assert PASSWORD not in text


def test_the_client_tools_say_how_to_get_the_routes_when_refused(
        gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = gateway.url()
    daemon_json = tmp_path / "daemon.json"
    assert cli.main(["client", "docker", url, "--dry-run", "--daemon-json",
                     str(daemon_json)]) == 0
    captured = capsys.readouterr()
    assert "access.admin" in captured.err and "--routes" in captured.err
    assert "Traceback" not in captured.err + captured.out

    assert cli.main(["doctor", url, "--docker-host", "unix:///nonexistent.sock",
                     "--daemon-json", str(daemon_json), "--timeout", "5"]) == 1
    report = capsys.readouterr().out
    assert "lists its routes only to the addresses in access.admin" in report
    assert "add this machine's address to access.admin" in report
