"""`registry-gateway client` (gateway/client/): targets, per-route endpoints, the files each
runtime gets (parsed back with the runtime's own format), safe writing, the routes it reads
(the gateway's listing, routes.yaml), and docs/clients.md showing exactly what it writes."""

from __future__ import annotations

import ast
import io
import json
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from gateway import cli
from gateway.client.containerd import containerd_plan
from gateway.client.docker import docker_plan, merge_daemon_json
from gateway.client.k8s import k8s_text
from gateway.client.plan import FileWrite, Plan, apply
from gateway.client.podman import DROP_IN_NAME, podman_plan, registries_conf
from gateway.client.routes_file import read_routes_file
from gateway.client.source import info_from_listing
from gateway.client.target import (
    ClientConfError,
    GatewayInfo,
    Target,
    docker_hub_mirror,
    parse_target,
)
from gateway.config import load_config
from gateway.server import create_app
from gateway.wire import GatewayListing, RouteListing
from tests.support.served import GatewayTestServer

DOCS = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
CA_PEM = trustme.CA().cert_pem.bytes()


def info(**overrides: Any) -> GatewayInfo:
    base: dict[str, Any] = {
        "routes": (RouteListing("docker.io", "hub"), RouteListing("ghcr.io", "ghcr"),
                   RouteListing("quay.io", None, ("quay-mirror.corp.test",)),
                   RouteListing("private.registry.test:5000")),
        "base_domains": ("gw.test",), "default_route": "docker.io"}
    base.update(overrides)
    return GatewayInfo(GatewayListing(**base), "test")


# -- targets and endpoints ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("gw.test", Target("https", "gw.test", None, True)),
    ("GW.Test.:8443", Target("https", "gw.test", 8443, True)),
    ("https://mirror.gw.test", Target("https", "mirror.gw.test", None, False)),
    ("https://mirror.gw.test:8443/", Target("https", "mirror.gw.test", 8443, False)),
    ("http://127.0.0.1:5000", Target("http", "127.0.0.1", 5000, False)),
])
def test_parse_target(text: str, expected: Target) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["ftp://x.test", "https://x.test/v2/", "localhost",
                                  "gw.test:99999", "https://user:pw@x.test", "exa mple.com"])
def test_parse_target_refuses_what_would_not_work(text: str) -> None:
    with pytest.raises(ClientConfError):
        parse_target(text)


def test_endpoints_for_a_base_domain_and_for_one_url() -> None:
    by_domain = {e.route: e.location for e in parse_target("gw.test:8443").endpoints(info())}
    assert by_domain == {
        "docker.io": "hub.gw.test:8443", "ghcr.io": "ghcr.gw.test:8443",
        "quay.io": "quay-mirror.corp.test:8443",  # no label: its exact host
        "private.registry.test:5000": "gw.test:8443/private.registry.test:5000"}
    by_url = {e.route: e.location for e in parse_target("https://mirror.gw.test").endpoints(info())}
    assert by_url["ghcr.io"] == "mirror.gw.test/ghcr.io"
    mirror = docker_hub_mirror(parse_target("https://mirror.gw.test"), info())
    assert mirror is not None and mirror.url == "https://mirror.gw.test"  # the default route
    assert docker_hub_mirror(parse_target("https://mirror.gw.test"),
                             info(default_route="ghcr.io")) is None


def test_targets_that_would_route_wrongly_are_refused_with_the_fix() -> None:
    with pytest.raises(ClientConfError, match=r"host of the docker\.io route.*gw\.test"):
        docker_plan(info(), parse_target("https://hub.gw.test"), daemon_json=Path("d.json"),
                    existing=None, certs_dir=Path("c"))
    with pytest.raises(ClientConfError, match=r"labels under gw\.test, not under other\.test"):
        podman_plan(info(), parse_target("other.test"), conf_d=Path("d"), certs_dir=Path("c"))


# -- docker ------------------------------------------------------------------------------------


def test_daemon_json_merge_keeps_every_other_key_and_puts_the_mirror_first() -> None:
    existing = json.dumps({"log-driver": "journald", "storage-driver": "overlay2",
                           "registry-mirrors": ["https://old.example/", "https://hub.gw.test/"],
                           "features": {"buildkit": True}}, indent=4)
    merged = json.loads(merge_daemon_json(existing, Path("daemon.json"),
                                          "https://hub.gw.test", []))
    assert merged == {"log-driver": "journald", "storage-driver": "overlay2",
                      "registry-mirrors": ["https://hub.gw.test", "https://old.example/"],
                      "features": {"buildkit": True}}
    assert list(merged) == ["log-driver", "storage-driver", "registry-mirrors", "features"]


@pytest.mark.parametrize(("existing", "message"), [
    ('{"debug": true,}', r"not valid JSON \(line 1, column 16"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"registry-mirrors": "https://x"}', "must be a list of strings"),
])
def test_daemon_json_that_cannot_be_merged_is_left_alone(tmp_path: Path, existing: str,
                                                         message: str) -> None:
    daemon_json = tmp_path / "daemon.json"
    daemon_json.write_text(existing)
    code = cli.main(["client", "docker", "gw.test", "--presets", "--daemon-json",
                     str(daemon_json), "--certs-dir", str(tmp_path / "certs.d")])
    assert code == 1
    assert daemon_json.read_text() == existing
    assert list(tmp_path.iterdir()) == [daemon_json]  # no backup, no half-written file
    with pytest.raises(ClientConfError, match=message):
        merge_daemon_json(existing, daemon_json, "https://hub.gw.test", [])


def test_client_docker_writes_with_a_backup_and_is_idempotent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    daemon_json = tmp_path / "etc" / "daemon.json"
    daemon_json.parent.mkdir()
    original = '{\n  "data-root": "/srv/docker"\n}\n'
    daemon_json.write_text(original)
    daemon_json.chmod(0o600)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(CA_PEM)
    routes = tmp_path / "routes.yaml"
    routes.write_text("base_domains: [gw.test]\nroutes:\n"
                      "  docker.io: {upstream: 'http://127.0.0.1:9'}\n"
                      "  ghcr.io: {upstream: 'http://127.0.0.1:9'}\n")
    argv = ["client", "docker", "gw.test:8443", "--routes", str(routes), "--ca", str(ca),
            "--daemon-json", str(daemon_json), "--certs-dir", str(tmp_path / "certs.d")]

    assert cli.main(argv) == 0
    out = capsys.readouterr().out

    assert json.loads(daemon_json.read_text()) == {
        "data-root": "/srv/docker", "registry-mirrors": ["https://hub.gw.test:8443"]}
    assert stat.S_IMODE(daemon_json.stat().st_mode) == 0o600
    [backup] = daemon_json.parent.glob("daemon.json.bak-*")
    assert backup.read_text() == original
    for host in ("hub.gw.test:8443", "ghcr.gw.test:8443"):
        assert (tmp_path / "certs.d" / host / "ca.crt").read_bytes() == CA_PEM
    assert "ghcr.io/OWNER/IMAGE  ->  ghcr.gw.test:8443/OWNER/IMAGE" in out
    assert "systemctl reload docker" in out

    assert cli.main(argv) == 0  # nothing changes the second time: no second backup
    assert "unchanged:" in capsys.readouterr().out
    assert len(list(daemon_json.parent.glob("daemon.json.bak-*"))) == 1


def test_dry_run_prints_and_writes_nothing(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    daemon_json = tmp_path / "daemon.json"
    assert cli.main(["client", "docker", "gw.test", "--presets", "--dry-run",
                     "--daemon-json", str(daemon_json)]) == 0
    out = capsys.readouterr().out
    assert f"# {daemon_json}\n{{\n  \"registry-mirrors\": [\n    \"https://hub.gw.test\"" in out
    assert not daemon_json.exists()


def test_plain_http_gateway_is_added_to_insecure_registries() -> None:
    plan = docker_plan(info(), parse_target("http://10.1.2.3:5000"),
                       daemon_json=Path("daemon.json"), existing=None, certs_dir=Path("c"))
    document = json.loads(plan.writes[0].content)
    assert document["registry-mirrors"] == ["http://10.1.2.3:5000"]
    assert document["insecure-registries"] == ["10.1.2.3:5000"]


# -- containerd, podman, k8s ------------------------------------------------------------------


def test_containerd_hosts_toml_per_registry(tmp_path: Path) -> None:
    plan = containerd_plan(info(), parse_target("https://mirror.gw.test:8443"),
                           config_path=tmp_path, ca=(Path("ca.pem"), CA_PEM))
    files = {str(w.path.relative_to(tmp_path)): w.content for w in plan.writes}
    assert set(files) == {f"{d}/{f}" for d in ("docker.io", "ghcr.io", "quay.io",
                                               "private.registry.test_5000_")
                          for f in ("hosts.toml", "ca.crt")}
    ghcr = tomllib.loads(files["ghcr.io/hosts.toml"].decode())
    assert ghcr == {"server": "https://ghcr.io", "host": {"https://mirror.gw.test:8443": {
        "capabilities": ["pull", "resolve"], "ca": "ca.crt"}}}
    hub = tomllib.loads(files["docker.io/hosts.toml"].decode())
    assert hub["server"] == "https://registry-1.docker.io"
    assert files["ghcr.io/ca.crt"] == CA_PEM


@pytest.mark.parametrize(("config", "expected"), [
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
     'config_path = "/etc/containerd/certs.d"\n', "already has config_path"),
    ("version = 2\n", 'config_path = "/etc/containerd/certs.d"'),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
     'endpoint = ["https://x"]\n', "remove the deprecated registry.mirrors"),
])
def test_containerd_says_what_config_path_needs(config: str, expected: str) -> None:
    plan = containerd_plan(info(), parse_target("gw.test"),
                           config_path=Path("/etc/containerd/certs.d"),
                           containerd_config=(Path("/etc/containerd/config.toml"), config))
    assert expected in "\n".join(plan.notes)


def test_podman_drop_in_mirrors_every_route() -> None:
    for target, locations in (
            ("gw.test", {"docker.io": "hub.gw.test", "ghcr.io": "ghcr.gw.test"}),
            ("https://mirror.gw.test", {"docker.io": "mirror.gw.test/docker.io",
                                        "ghcr.io": "mirror.gw.test/ghcr.io"})):
        document = tomllib.loads(registries_conf(info(), parse_target(target)))
        found = {r["prefix"]: r["mirror"][0]["location"] for r in document["registry"]}
        assert {k: found[k] for k in locations} == locations
        assert all(r["location"] == r["prefix"] for r in document["registry"])
    insecure = tomllib.loads(registries_conf(info(), parse_target("http://127.0.0.1:5000")))
    assert all(r["mirror"][0]["insecure"] is True for r in insecure["registry"])
    plan = podman_plan(info(), parse_target("gw.test"), conf_d=Path("/c"),
                       certs_dir=Path("/certs"), ca=(Path("ca.pem"), CA_PEM))
    assert plan.writes[0].path == Path("/c") / DROP_IN_NAME
    assert Path("/certs/hub.gw.test/ca.crt") in {w.path for w in plan.writes}


def test_k8s_prints_a_valid_registries_yaml() -> None:
    text = k8s_text(info(), parse_target("gw.test"), ca=Path("ca.crt"))
    body = text.split("\n\nmirrors:", 1)[1].split("\n\nCRI-O", 1)[0]
    document = yaml.safe_load("mirrors:" + body)
    assert document["mirrors"]["ghcr.io"] == {"endpoint": ["https://ghcr.gw.test"]}
    assert document["configs"]["hub.gw.test"]["tls"]["ca_file"] == \
        "/etc/rancher/registry-gateway-ca.crt"
    assert "client containerd gw.test --ca ca.crt" in text


# -- writing -------------------------------------------------------------------------------


def test_apply_writes_atomically_and_reports_what_it_cannot_write(tmp_path: Path) -> None:
    out = io.StringIO()
    target = tmp_path / "new" / "dir" / "hosts.toml"
    apply(Plan([FileWrite(target, b"server = 1\n")]), out)
    assert target.read_bytes() == b"server = 1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["hosts.toml"]  # no temp file left
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ClientConfError, match=r"cannot write .*file/x"):
        apply(Plan([FileWrite(blocker / "x", b"")]), out)


# -- the gateway's route document --------------------------------------------------------------


ROUTES_YAML = """
base_domains: [GW.test.]
routes:
  docker.io: {upstream: "http://127.0.0.1:9", hosts: [127.0.0.2]}
  ghcr.io: {label: null, hosts: Ghcr-Mirror.corp.test}
  quay.io:
    upstream: "http://127.0.0.1:9"
    credentials: {username: someone, password_env: QUAY_PASSWORD_NOT_SET}
  my.registry.test: {upstream: "http://127.0.0.1:9", label: mine}
"""


async def test_the_client_reads_the_gateways_listing_as_the_gateway_serves_it(
        aiohttp_client: Any, tmp_path: Path) -> None:
    config = load_config(ROUTES_YAML, env={"QUAY_PASSWORD_NOT_SET": "x"})
    client = await aiohttp_client(GatewayTestServer(create_app(config, tmp_path / "data")))
    document = await (await client.get("/_gateway/routes")).json()
    parsed = info_from_listing(document, "test")
    assert parsed.routes == tuple(RouteListing(r.name, r.label, r.hosts, r.aliases)
                                  for r in config.routes)
    assert parsed.base_domains == ("gw.test",) and parsed.default_route == "docker.io"
    assert parsed.listing.to_json() == document  # the wire shape, key for key
    with pytest.raises(ClientConfError, match="did not answer with a route list"):
        info_from_listing({"errors": []}, "test")
    with pytest.raises(ClientConfError, match="serves no routes"):
        info_from_listing({"routes": []}, "test")


def test_routes_yaml_gives_the_routes_the_gateway_would_list(tmp_path: Path) -> None:
    """--routes on a client machine: the same names, labels, hosts, base domains and
    default route as the server's config, without resolving any secret."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES_YAML)
    config = load_config(ROUTES_YAML, env={"QUAY_PASSWORD_NOT_SET": "x"})
    listing = read_routes_file(routes)
    assert listing.routes == tuple(RouteListing(r.name, r.label, r.hosts) for r in config.routes)
    assert listing.base_domains == config.base_domains == ("gw.test",)
    assert listing.default_route == config.default_route == "docker.io"
    assert read_routes_file(_write(tmp_path, "routes: {ghcr.io: {}}\n")).default_route is None


@pytest.mark.parametrize(("text", "message"), [
    (None, r"missing\.yaml: cannot read: No such file"),
    ("routes: [\n", r"bad\.yaml:2: not valid YAML"),
    ("- docker.io\n", "top level must be a mapping"),
    ("base_domains: [gw.test]\n", "routes: want a mapping of registry names"),
    ("routes: {docker.io: [x]}\n", r"routes\.docker\.io: a route is a mapping"),
    ("routes: {docker.io: {hosts: {a: b}}}\n", r"routes\.docker\.io\.hosts: want a list"),
    ("default_route: quay.io\nroutes: {docker.io: {}}\n", "default_route: 'quay.io' is not"),
])
def test_a_routes_yaml_the_client_cannot_use_is_refused_with_the_place(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None,
        message: str) -> None:
    path = tmp_path / "missing.yaml" if text is None else _write(tmp_path, text)
    assert cli.main(["client", "podman", "gw.test", "--routes", str(path), "--dry-run"]) == 1
    assert re.search(message, capsys.readouterr().err)


def _write(directory: Path, text: str) -> Path:
    path = directory / "bad.yaml"
    path.write_text(text)
    return path


# -- the docs show exactly what the command writes ---------------------------------------------


def _docs_blocks() -> list[str]:
    return [m.group(1) for m in re.finditer(r"```[a-z]*\n(.*?)```", DOCS.read_text(), re.S)]


def test_docs_snippets_are_what_the_command_writes() -> None:
    presets = GatewayInfo.presets("example.com")
    target = parse_target("example.com")
    snippets = {
        "docker daemon.json": docker_plan(presets, target, daemon_json=Path("daemon.json"),
                                          existing=None, certs_dir=Path("c")).writes[0].content,
        "docker names": "\n".join(docker_plan(presets, target, daemon_json=Path("d"),
                                              existing=None, certs_dir=Path("c")).notes[-8:]),
        "containerd docker.io": containerd_plan(presets, target,
                                                config_path=Path("/etc/containerd/certs.d")
                                                ).writes[0].content,
        "containerd ghcr.io with CA": next(
            w.content for w in containerd_plan(presets, target,
                                               config_path=Path("/etc/containerd/certs.d"),
                                               ca=(Path("ca.crt"), CA_PEM)).writes
            if w.path == Path("/etc/containerd/certs.d/ghcr.io/hosts.toml")),
        "podman drop-in": registries_conf(presets, target),
        "k3s registries.yaml": "mirrors:" + k8s_text(presets, target, ca=Path("ca.crt"))
        .split("\nmirrors:", 1)[1].split("\n\nCRI-O", 1)[0],
    }
    blocks = _docs_blocks()
    for what, snippet in snippets.items():
        text = snippet.decode() if isinstance(snippet, bytes) else snippet
        found = sum(1 for block in blocks if text.strip("\n") in block)
        assert found >= 2, f"docs/clients.md must show the {what} snippet in English and " \
                           f"Chinese, exactly as written:\n{text}"


# -- the client tools stand apart from the server -----------------------------------------------


def _gateway_imports(path: Path) -> set[str]:
    """The gateway modules a file imports, as dotted names (relative imports resolved)."""
    package = ".".join(path.relative_to(GATEWAY.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "gateway"}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            if module.split(".")[0] == "gateway":
                found |= {f"{module}.{a.name}" if not node.module else module
                          for a in node.names}
    return found


def test_the_client_tools_import_nothing_of_the_server() -> None:
    allowed = ("gateway.client", "gateway.wire", "gateway.presets", "gateway.reference",
               "gateway.errors", "gateway.oci")
    seen = set()
    for path in sorted((GATEWAY / "client").glob("*.py")):
        for module in _gateway_imports(path):
            assert module.startswith(allowed), f"{path.name} imports {module}"
            seen.add(module)
    assert {"gateway.wire", "gateway.presets", "gateway.client.target"} <= seen  # it sees them
    assert "gateway.config" in _gateway_imports(GATEWAY / "cli.py")  # and would see this
    for shared in ("wire.py", "presets.py"):
        assert _gateway_imports(GATEWAY / shared) <= {"gateway.presets"}, shared
