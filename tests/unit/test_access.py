"""Access rules: `access:` and the route keys in routes.yaml (errors name file, line and
key), the compiled rules without sockets, htpasswd logins and their bcrypt cache, and the
access stage through aiohttp's test client (other client addresses arrive through a
trusted proxy's X-Forwarded-For, as they would in production).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import os
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import Config, load_config
from gateway.errors import ConfigError, RegistryError
from gateway.pipeline import users as users_module
from gateway.pipeline.access import CHALLENGE, basic_credentials
from gateway.pipeline.rules import Policy
from gateway.pipeline.users import Logins, parse_htpasswd
from tests.support.clock import Clock
from tests.support.fake_registry import image_manifest

from .conftest import Gateway, Served

PASSWORD = "correct horse battery staple"
WRONG = "hunter2-wrong-password"


def bcrypt_hash(password: str, rounds: int = 4) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return bcrypt_hash(PASSWORD)


@pytest.fixture
def htpasswd(tmp_path: Path, alice_hash: str) -> Path:
    path = tmp_path / "users.htpasswd"
    path.write_text(f"# operators\nalice:{alice_hash}\n")
    return path


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def load(text: str) -> Config:
    return load_config(textwrap.dedent(text), "routes.yaml", env={})


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return caught.value


def line_of(text: str, needle: str) -> int:
    lines = textwrap.dedent(text).splitlines()
    return next(i for i, line in enumerate(lines, start=1) if needle in line)


# ---------------------------------------------------------------- routes.yaml


def test_no_access_section_keeps_everyone_pulling_and_admin_on_loopback() -> None:
    config = load("routes: {ghcr.io: {upstream: 'http://127.0.0.1:1'}}")
    policy = Policy(config)
    route = config.routes[0]
    for address in ("203.0.113.9", "10.1.2.3", "2001:db8::1", "127.0.0.1"):
        assert policy.screen(address, "/v2/owner/app/manifests/v1") is None
        assert policy.pull(address, route, "owner/app", None).allowed
    assert policy.base("203.0.113.9", None, None).allowed
    for path in ("/metrics", "/_gateway/routes"):
        assert policy.screen("127.0.0.1", path).allowed  # type: ignore[union-attr]
        assert policy.screen("::1", path).allowed  # type: ignore[union-attr]
        refused = policy.screen("203.0.113.9", path)
        assert refused is not None and (refused.status, refused.reason) == (403, "admin_only")
    assert policy.screen("203.0.113.9", "/healthz").allowed  # type: ignore[union-attr]


def test_access_section_values(htpasswd: Path) -> None:
    config = load(f"""
        access:
          allow: [10.0.0.0/8, 192.0.2.1]
          deny: 10.66.0.0/16
          users: {htpasswd}
          anonymous: none
          admin: [10.9.0.0/16]
        routes:
          ghcr.io:
            upstream: http://127.0.0.1:1
            anonymous: [10.1.0.0/16]
            repositories: {{allow: ['owner/*'], deny: [owner/secret-*]}}
          quay.io: {{upstream: 'http://127.0.0.1:2', anonymous: all}}
    """)
    access = config.access
    assert access.allow == (ipaddress.ip_network("10.0.0.0/8"),
                            ipaddress.ip_network("192.0.2.1/32"))
    assert access.deny == (ipaddress.ip_network("10.66.0.0/16"),)
    assert (access.users, access.anonymous) == (str(htpasswd), ())
    ghcr, quay = config.routes
    assert ghcr.anonymous == (ipaddress.ip_network("10.1.0.0/16"),)
    assert ghcr.repositories.allow == ("owner/*",)
    assert ghcr.repositories.deny == ("owner/secret-*",)
    assert quay.anonymous is not None and len(quay.anonymous) == 2


def test_defaults_hand_anonymous_and_repositories_to_every_route(htpasswd: Path) -> None:
    config = load(f"""
        access: {{users: {htpasswd}}}
        defaults:
          anonymous: none
          repositories: {{deny: [evil/*]}}
        routes:
          ghcr.io: {{upstream: 'http://127.0.0.1:1'}}
          quay.io: {{upstream: 'http://127.0.0.1:2', anonymous: null}}
    """)
    ghcr, quay = config.routes
    assert ghcr.anonymous == () and ghcr.repositories.deny == ("evil/*",)
    assert quay.anonymous is None  # null: back to access.anonymous


@pytest.mark.parametrize(("section", "needle", "key", "message"), [
    ("access:\n  anonymous: maybe\n", "anonymous", "access.anonymous", "want all, none"),
    ("access:\n  anonymous: true\n", "anonymous", "access.anonymous", "want all, none"),
    ("access:\n  allow: []\n", "allow", "access.allow", "lets no one in"),
    ("access:\n  admin: []\n", "admin", "access.admin", "lets no one read /metrics"),
    ("access:\n  deny:\n    - 10.0.0.0/8\n    - not-a-network\n", "not-a-network",
     "access.deny[1]", "not an IP address"),
    ("access:\n  users: /nonexistent/users.htpasswd\n", "users", "access.users",
     "not a readable file"),
    ("access:\n  anonymous: none\n", "anonymous", "access.anonymous", "needs users"),
    ("access:\n  bogus: 1\n", "bogus", "access.bogus",
     "valid keys: admin, allow, anonymous, deny, users"),
    ("access: [1]\n", "access", "access", "want a mapping"),
])
def test_access_mistakes_name_file_line_and_key(section: str, needle: str, key: str,
                                                message: str) -> None:
    text = f"routes: {{ghcr.io: {{upstream: 'http://127.0.0.1:1'}}}}\n{section}"
    error = config_error(text)
    assert (error.file, error.line, error.key) == ("routes.yaml", line_of(text, needle), key)
    assert message in str(error), str(error)


@pytest.mark.parametrize(("route", "needle", "key", "message"), [
    ("anonymous: none", "anonymous", "routes.ghcr.io.anonymous", "needs access.users"),
    ("repositories: {deny: [Owner/App]}", "repositories", "routes.ghcr.io.repositories.deny[0]",
     "not a repository glob"),
    ("repositories: {allow: []}", "repositories", "routes.ghcr.io.repositories.allow",
     "allows no repository"),
    ("repositories: {block: [x]}", "repositories", "routes.ghcr.io.repositories.block",
     "valid keys: allow, deny"),
    ("repositories: [x]", "repositories", "routes.ghcr.io.repositories", "want {allow"),
])
def test_route_access_mistakes_name_file_line_and_key(route: str, needle: str, key: str,
                                                      message: str) -> None:
    text = f"routes:\n  ghcr.io:\n    upstream: http://127.0.0.1:1\n    {route}\n"
    error = config_error(text)
    assert (error.file, error.line, error.key) == ("routes.yaml", line_of(text, needle), key)
    assert message in str(error), str(error)


# ---------------------------------------------------------------- the rules, no sockets


def policy_of(text: str) -> tuple[Policy, Config]:
    config = load(text)
    return Policy(config), config


def test_deny_beats_allow_and_admin(htpasswd: Path) -> None:
    policy, _ = policy_of(f"""
        access:
          allow: [10.0.0.0/8]
          deny: [10.66.0.0/16, 127.0.0.9]
          users: {htpasswd}
        routes: {{ghcr.io: {{upstream: 'http://127.0.0.1:1'}}}}
    """)
    denied = policy.screen("10.66.1.2", "/v2/owner/app/manifests/v1")
    assert denied is not None
    assert (denied.status, denied.reason, denied.rule) == (403, "denied_address",
                                                           "access.deny 10.66.0.0/16")
    outside = policy.screen("192.0.2.7", "/v2/owner/app/manifests/v1")
    assert outside is not None and (outside.status, outside.rule) == (403, "access.allow")
    assert policy.screen("10.1.2.3", "/v2/owner/app/manifests/v1") is None
    # Deny beats admin too; allow does not gate admin (a loopback scrape keeps working).
    assert policy.screen("127.0.0.9", "/metrics").rule == "access.deny 127.0.0.9/32"  # type: ignore[union-attr]
    assert policy.screen("127.0.0.1", "/metrics").allowed  # type: ignore[union-attr]
    assert policy.screen("::ffff:10.66.0.1", "/v2/").status == 403  # type: ignore[union-attr]


@given(st.integers(0, (1 << 16) - 1))
def test_every_address_of_a_denied_network_is_refused(low: int) -> None:
    policy = Policy(load("access: {deny: [10.66.0.0/16]}\n"
                         "routes: {ghcr.io: {upstream: 'http://127.0.0.1:1'}}"))
    address = str(ipaddress.IPv4Address((10 << 24) | (66 << 16) | low))
    verdict = policy.screen(address, "/v2/owner/app/blobs/sha256:" + "a" * 64)
    assert verdict is not None and verdict.status == 403


def test_anonymous_list_login_and_private_route(htpasswd: Path) -> None:
    policy, config = policy_of(f"""
        access: {{users: {htpasswd}, anonymous: [10.0.0.0/8]}}
        routes:
          ghcr.io: {{upstream: 'http://127.0.0.1:1'}}
          private.example:
            upstream: http://127.0.0.1:2
            anonymous: none
            hosts: [private.gw.test]
          quay.io: {{upstream: 'http://127.0.0.1:3', anonymous: all}}
    """)
    ghcr, private, quay = config.routes
    assert policy.pull("10.2.3.4", ghcr, "owner/app", None).rule == "access.anonymous"
    outside = policy.pull("192.0.2.7", ghcr, "owner/app", None)
    assert (outside.status, outside.reason) == (401, "login_required")  # a login would help
    assert policy.pull("192.0.2.7", ghcr, "owner/app", "alice").rule == "access.users"
    closed = policy.pull("10.2.3.4", private, "owner/app", None)
    assert (closed.status, closed.rule) == (401, "routes.private.example.anonymous")
    assert policy.pull("10.2.3.4", private, "owner/app", "alice").allowed
    assert policy.pull("192.0.2.7", quay, "owner/app", None).rule == "routes.quay.io.anonymous"
    # /v2/ challenges a client that sent no login (so docker and podman send theirs) only
    # where it may not pull anonymously: docker fails a pull challenged without one.
    challenge = policy.base("192.0.2.7", "ghcr.gw.test", None)
    assert (challenge.status, challenge.reason) == (401, "")  # not counted as a refusal
    assert policy.base("10.2.3.4", None, None).allowed
    assert policy.base("10.2.3.4", "private.gw.test:5000", None).status == 401
    assert policy.base("192.0.2.7", None, "alice").allowed


def test_without_users_an_address_outside_anonymous_gets_403() -> None:
    policy, config = policy_of("access: {anonymous: [10.0.0.0/8]}\n"
                               "routes: {ghcr.io: {upstream: 'http://127.0.0.1:1'}}")
    verdict = policy.pull("192.0.2.7", config.routes[0], "owner/app", None)
    assert (verdict.status, verdict.reason) == (403, "denied_address")  # no login exists
    assert policy.base("192.0.2.7", None, None).allowed


def test_repository_globs_and_docker_hubs_library() -> None:
    policy, config = policy_of("""
        routes:
          docker.io:
            upstream: http://127.0.0.1:1
            repositories: {deny: [nginx, 'evil/*']}
          ghcr.io:
            upstream: http://127.0.0.1:2
            repositories: {allow: ['owner/*', 'other/app-?'], deny: ['owner/secret*']}
          quay.io:
            upstream: http://127.0.0.1:3
            repositories: {allow: ['library/*']}
    """)
    hub, ghcr, quay = config.routes

    def allowed(route: Any, repository: str) -> bool:
        return policy.pull("192.0.2.7", route, repository, None).allowed

    # `docker pull nginx` and `docker pull library/nginx` both resolve to library/nginx:
    # a rule on the short name catches both, and other namespaces are not hit.
    refused = policy.pull("192.0.2.7", hub, "library/nginx", None)
    assert (refused.status, refused.reason, refused.rule) == (
        403, "denied_repository", "routes.docker.io.repositories.deny nginx")
    assert allowed(hub, "library/alpine") and allowed(hub, "someone/nginx")
    assert not allowed(hub, "evil/miner") and not allowed(hub, "evil/a/b")  # * matches /
    assert allowed(ghcr, "owner/app") and allowed(ghcr, "owner/team/app")
    assert allowed(ghcr, "other/app-1") and not allowed(ghcr, "other/app-12")
    assert policy.pull("1.2.3.4", ghcr, "owner/secret-keys", "alice").rule == \
        "routes.ghcr.io.repositories.deny owner/secret*"  # deny beats allow, logins too
    assert policy.pull("1.2.3.4", ghcr, "nobody/app", None).rule == \
        "routes.ghcr.io.repositories.allow"
    # No library/ rule on quay.io: names are only what they are.
    assert allowed(quay, "library/x") and not allowed(quay, "x/library")


# ---------------------------------------------------------------- htpasswd and logins


def test_htpasswd_parsing_skips_bad_lines_and_never_shows_a_hash(alice_hash: str) -> None:
    apr1 = "$apr1$abcdefgh$0123456789abcdefghijk."
    text = "\n".join([
        "# a comment", "", f"alice:{alice_hash}", "no-colon-here", f":{alice_hash}",
        f"bob:{apr1}", f"alice:{bcrypt_hash('other')}", f"carol:{alice_hash}  ", "dave:"])
    table = parse_htpasswd(text, "users.htpasswd")
    assert set(table.hashes) == {"alice", "carol"}
    assert table.hashes["alice"] == alice_hash.encode()
    assert [p.split(": ", 1)[0] for p in table.problems] == [
        "users.htpasswd:4", "users.htpasswd:5", "users.htpasswd:6", "users.htpasswd:7",
        "users.htpasswd:9"]
    assert "htpasswd -B" in table.problems[2] and "listed twice" in table.problems[3]
    shown = "\n".join(table.problems)
    assert alice_hash not in shown and apr1 not in shown and "$2" not in shown


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("", None), ("Bearer abc", None),
    ("Basic " + base64.b64encode(b":").decode(), None),  # an empty user: no login
    ("Basic " + base64.b64encode(b"alice:pa:ss").decode(), ("alice", b"pa:ss")),
    ("basic " + base64.b64encode("jürgen:pw".encode()).decode(), ("jürgen", b"pw")),
])
def test_basic_credentials(header: str | None, expected: Any) -> None:
    assert basic_credentials(header) == expected


@pytest.mark.parametrize("header", ["Basic !!!", "Basic " + base64.b64encode(b"alice").decode(),
                                    "Basic " + base64.b64encode(b"\xff:x").decode()])
def test_malformed_basic_credentials_are_a_bad_login(header: str) -> None:
    from gateway.pipeline.access import BadLogin
    with pytest.raises(BadLogin):
        basic_credentials(header)


@pytest.fixture
def bcrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every bcrypt check the logins make (the expensive call a cache must avoid)."""
    calls: list[bytes] = []
    real = users_module._checkpw

    def counting(password: bytes, stored: bytes) -> bool:
        calls.append(stored)
        return real(password, stored)

    monkeypatch.setattr(users_module, "_checkpw", counting)
    return calls


async def test_a_good_login_costs_one_bcrypt_for_a_whole_pull(
        htpasswd: Path, bcrypt_calls: list[bytes]) -> None:
    logins = Logins()
    path, password = str(htpasswd), PASSWORD.encode()
    # The parallel first requests of a pull share one check; later ones hit the cache.
    assert await asyncio.gather(*(logins.verify(path, "alice", password)
                                  for _ in range(10))) == [True] * 10
    for _ in range(20):
        assert await logins.verify(path, "alice", password)
    assert len(bcrypt_calls) == 1
    assert not await logins.verify(path, "alice", WRONG.encode())
    assert not await logins.verify(path, "alice", WRONG.encode())  # remembered briefly
    assert len(bcrypt_calls) == 2
    # An unknown user costs a bcrypt as well (against a decoy), so timing tells nothing.
    assert not await logins.verify(path, "mallory", password)
    assert len(bcrypt_calls) == 3 and bcrypt_calls[-1] != bcrypt_calls[0]


async def test_passwords_longer_than_bcrypt_reads_still_verify(tmp_path: Path) -> None:
    long_password = "x" * 100
    path = tmp_path / "users"
    path.write_text(f"long:{bcrypt_hash(long_password[:72])}\n")
    assert await Logins().verify(str(path), "long", long_password.encode())


async def test_a_changed_htpasswd_file_is_read_again(tmp_path: Path, alice_hash: str) -> None:
    clock = Clock()
    path = tmp_path / "users"
    path.write_text(f"alice:{alice_hash}\n")
    logins = Logins(clock=clock)
    assert await logins.verify(str(path), "alice", PASSWORD.encode())
    path.write_text(f"bob:{alice_hash}\n")
    os.utime(path, ns=(1, 1))  # a different mtime even within the filesystem's tick
    # Not looked at again before the interval (a stat per request would cost).
    assert not await logins.verify(str(path), "bob", PASSWORD.encode())
    clock.advance(3)
    assert await logins.verify(str(path), "bob", PASSWORD.encode())
    assert not await logins.verify(str(path), "alice", PASSWORD.encode())  # removed
    # The reload hook reads at once; an unreadable file keeps the users read before.
    path.write_text(f"carol:{alice_hash}\n")
    os.utime(path, ns=(2, 2))
    await logins.refresh()
    assert await logins.verify(str(path), "carol", PASSWORD.encode())
    path.unlink()
    clock.advance(3)
    assert await logins.verify(str(path), "carol", PASSWORD.encode())


async def test_concurrent_checks_are_bounded_and_the_rest_get_429(
        htpasswd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = 0

    def slow(password: bytes, stored: bytes) -> bool:
        nonlocal started
        started += 1
        import time
        time.sleep(0.3)
        return False

    monkeypatch.setattr(users_module, "_checkpw", slow)
    logins = Logins(checks=1, waiting=1)
    results = await asyncio.gather(
        *(logins.verify(str(htpasswd), "alice", f"guess-{i}".encode()) for i in range(5)),
        return_exceptions=True)
    refused = [r for r in results if isinstance(r, RegistryError)]
    assert [r for r in results if r is False] and len(refused) == 3
    assert {(r.status, r.headers.get("Retry-After")) for r in refused} == {(429, "1")}
    assert started == 2


# ---------------------------------------------------------------- the stage over HTTP

FORWARDED = "X-Forwarded-For"


async def start(registry: Callable[..., Awaitable[Served]],
                gateway: Callable[..., Awaitable[Gateway]], access: dict[str, Any],
                route: dict[str, Any] | None = None) -> tuple[Gateway, Served]:
    fake = await registry()
    gw = await gateway({"ghcr.io": {"upstream": fake.url, **(route or {})}},
                       trusted_proxies=["127.0.0.1"], access=access)
    return gw, fake


async def oci_error(response: Any) -> dict[str, Any]:
    assert response.headers["Content-Type"].startswith("application/json")
    (error,) = json.loads(await response.read())["errors"]
    return dict(error)


async def test_logins_over_http(registry: Any, gateway: Any, htpasswd: Path, alice_hash: str,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw, fake = await start(registry, gateway, {"users": str(htpasswd),
                                               "anonymous": ["10.0.0.0/8"]})
    body = image_manifest()
    fake.fake.add_manifest("owner/app", body, tag="v1")
    path = "/v2/ghcr.io/owner/app/manifests/v1"
    client = gw.client

    challenged = await client.get("/v2/", headers={FORWARDED: "192.0.2.7"})
    assert challenged.status == 401 and challenged.headers["WWW-Authenticate"] == CHALLENGE
    assert (await oci_error(challenged))["code"] == "UNAUTHORIZED"
    ok = await client.get("/v2/", headers={FORWARDED: "192.0.2.7", **basic("alice", PASSWORD)})
    assert ok.status == 200
    wrong = await client.get(path, headers={FORWARDED: "10.1.1.1", **basic("alice", WRONG)})
    assert wrong.status == 401 and wrong.headers["WWW-Authenticate"] == CHALLENGE
    assert (await oci_error(wrong))["code"] == "UNAUTHORIZED"

    anonymous = await client.get(path, headers={FORWARDED: "10.1.1.1"})
    assert anonymous.status == 200 and await anonymous.read() == body
    stranger = await client.get(path, headers={FORWARDED: "192.0.2.7"})
    assert stranger.status == 401 and (await oci_error(stranger))["code"] == "UNAUTHORIZED"
    logged_in = await client.get(path, headers={FORWARDED: "192.0.2.7",
                                                **basic("alice", PASSWORD)})
    assert logged_in.status == 200 and await logged_in.read() == body
    assert len([r for r in fake.fake.requests if "/manifests/" in r.path]) == 1

    assert gw.sample("gateway_refusals_total", route="ghcr.io", reason="bad_login") == 1
    assert gw.sample("gateway_refusals_total", route="ghcr.io", reason="login_required") == 1
    assert gw.sample("gateway_refusals_total", route="-", reason="login_required") == 0

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    by_remote = [(line["remote"], line["status"], line["user"], line["rule"]) for line in lines]
    assert by_remote == [
        ("192.0.2.7", 401, None, "access.anonymous"),
        ("192.0.2.7", 200, "alice", "access.users"),
        ("10.1.1.1", 401, None, "access.users"), ("10.1.1.1", 200, None, "access.anonymous"),
        ("192.0.2.7", 401, None, "access.anonymous"),
        ("192.0.2.7", 200, "alice", "access.users")]
    encoded = basic("alice", PASSWORD)["Authorization"].split()[1]
    for secret in (PASSWORD, WRONG, alice_hash, encoded, basic("alice", WRONG)["Authorization"]):
        assert secret not in caplog.text
        assert secret not in (await (await client.get("/metrics")).text())


async def test_a_denied_repository_never_reaches_the_upstream(registry: Any,
                                                              gateway: Any) -> None:
    gw, fake = await start(registry, gateway, {},
                           {"repositories": {"deny": ["owner/secret-*"]}})
    fake.fake.add_manifest("owner/secret-app", image_manifest(), tag="v1")
    for path in ("/v2/ghcr.io/owner/secret-app/manifests/v1",
                 "/v2/ghcr.io/owner/secret-app/tags/list",
                 f"/v2/ghcr.io/owner/secret-app/blobs/sha256:{'a' * 64}"):
        refused = await gw.client.get(path)
        assert refused.status == 403, path
        error = await oci_error(refused)
        assert error["code"] == "DENIED" and "owner/secret-app" in error["message"]
    assert fake.fake.requests == []
    assert gw.sample("gateway_refusals_total", route="ghcr.io", reason="denied_repository") == 3


async def test_admin_endpoints_answer_admin_addresses_only(registry: Any, gateway: Any) -> None:
    gw, _ = await start(registry, gateway, {"deny": ["198.51.100.0/24"]})
    for path in ("/metrics", "/_gateway/routes"):
        refused = await gw.client.get(path, headers={FORWARDED: "192.0.2.7"})
        assert refused.status == 403
        error = await oci_error(refused)
        assert error["code"] == "DENIED" and "access.admin" in error["message"]
        assert (await gw.client.get(path)).status == 200  # loopback
    assert (await gw.client.get("/healthz", headers={FORWARDED: "192.0.2.7"})).status == 200
    assert (await gw.client.get("/healthz", headers={FORWARDED: "198.51.100.1"})).status == 200
    denied = await gw.client.get("/v2/", headers={FORWARDED: "198.51.100.1"})
    assert denied.status == 403 and (await oci_error(denied))["code"] == "DENIED"
    assert gw.sample("gateway_refusals_total", route="-", reason="admin_only") == 2
    assert gw.sample("gateway_refusals_total", route="-", reason="denied_address") == 1
