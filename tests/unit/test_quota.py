"""Docker Hub quota (issue #11): rate-limit header parsing, the account pool's choice and
skip/reset logic with an injected clock, the credential pool and proxy config keys, and
that no credential shows in logs, metrics or errors."""

from __future__ import annotations

import logging
import textwrap
from email.utils import formatdate

import pytest
from aiohttp import encode_basic_auth
from multidict import CIMultiDict
from yarl import URL

from gateway.config import (
    Credentials,
    CredentialsRef,
    ProxySettings,
    SecretRef,
    load_config,
    parse_config,
)
from gateway.errors import ConfigError, UpstreamError
from gateway.metrics import Metrics
from gateway.upstream.accounts import ANONYMOUS, AccountPool
from gateway.upstream.connect import outbound
from gateway.upstream.ratelimit import MAX_WAIT, Quota, kind_of_429, parse_quota, retry_after
from tests.support.clock import Clock

SECRET = "pa55-Word-never-shown"
ROUTE = "docker.io"
POOL = (Credentials("alice", SECRET + "a"), Credentials("bob", SECRET + "b"),
        Credentials("carol", SECRET + "c"))


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in values.items()})


def quota_headers(limit: int, remaining: int, window: int = 21600) -> CIMultiDict[str]:
    return headers(ratelimit_limit=f"{limit};w={window}",
                   ratelimit_remaining=f"{remaining};w={window}",
                   docker_ratelimit_source="203.0.113.7")


# ----------------------------------------------------------------- headers


def test_docker_hub_headers() -> None:
    assert parse_quota(quota_headers(100, 76)) == Quota(100, 76, 21600.0, "203.0.113.7")


@pytest.mark.parametrize(("limit", "remaining", "want"), [
    ("200;w=21600", None, Quota(200, None, 21600.0, None)),
    (None, "5", Quota(None, 5, None, None)),
    ("100", "0;w=3600", Quota(100, 0, 3600.0, None)),
    ("100;w=21600;comment=\"x\"", " 7 ; w=21600", Quota(100, 7, 21600.0, None)),
])
def test_partial_headers(limit: str | None, remaining: str | None, want: Quota) -> None:
    given = {k: v for k, v in (("RateLimit-Limit", limit),
                               ("RateLimit-Remaining", remaining)) if v is not None}
    assert parse_quota(CIMultiDict(given)) == want


def test_missing_headers() -> None:
    assert parse_quota(CIMultiDict()) is None
    assert parse_quota(headers(docker_ratelimit_source="1.2.3.4")) is None


@pytest.mark.parametrize("value", ["", "lots", "-1", "200=21600", "1e3;w=5", "w=21600"])
def test_malformed_headers_read_as_absent_not_zero(value: str) -> None:
    assert parse_quota(headers(ratelimit_limit=value, ratelimit_remaining=value)) is None
    # ... so a 429 with such headers is not taken for a spent account.
    assert kind_of_429(parse_quota(headers(ratelimit_remaining=value))) == "abuse"


def test_kinds_of_429() -> None:
    assert kind_of_429(parse_quota(quota_headers(100, 0))) == "pull_limit"
    assert kind_of_429(None) == "abuse"
    assert kind_of_429(parse_quota(quota_headers(100, 3))) == "abuse"


def test_retry_after() -> None:
    now = 1_800_000_000.0
    assert retry_after(headers(retry_after="17"), now) == 17.0
    assert retry_after(headers(retry_after=formatdate(now + 90, usegmt=True)), now) == 90.0
    assert retry_after(headers(retry_after=formatdate(now - 90, usegmt=True)), now) == 0.0
    assert retry_after(headers(retry_after="99999999"), now) == MAX_WAIT
    for bad in ("", "soon", "-5", "1.5"):
        assert retry_after(headers(retry_after=bad), now) is None
    assert retry_after(CIMultiDict(), now) is None


# ----------------------------------------------------------------- the pool


def pool(clock: Clock, metrics: Metrics | None = None,
         accounts: tuple[Credentials, ...] = POOL) -> AccountPool:
    return AccountPool(ROUTE, accounts, metrics or Metrics(), clock)


def pulls(p: AccountPool, n: int, repository: str = "library/a") -> list[str]:
    return [p.for_pull(repository).name for _ in range(n)]


def test_without_headers_pulls_go_round_robin() -> None:
    p = pool(Clock(frozen=1000))
    assert pulls(p, 7) == ["alice", "bob", "carol", "alice", "bob", "carol", "alice"]


def test_most_remaining_first() -> None:
    clock = Clock(frozen=1000)
    p = pool(clock)
    alice, bob, carol = p.accounts
    # Each account is tried once (unknown counts as most), then the numbers decide.
    assert pulls(p, 3) == ["alice", "bob", "carol"]
    p.observe(alice, 200, quota_headers(200, 150))
    p.observe(bob, 200, quota_headers(100, 3))
    p.observe(carol, 200, quota_headers(200, 149))
    assert pulls(p, 3) == ["alice", "carol", "alice"]  # 150, 149, then 149 vs 148
    assert bob.remaining == 3


def test_anonymous_when_no_credentials() -> None:
    p = pool(Clock(frozen=1000), accounts=())
    (account,) = p.accounts
    assert (account.name, account.credentials) == (ANONYMOUS, None)
    assert pulls(p, 2) == [ANONYMOUS, ANONYMOUS]


def test_spent_account_is_skipped_until_its_window_resets() -> None:
    clock = Clock(frozen=1000)
    metrics = Metrics()
    p = pool(clock, metrics)
    alice = p.for_pull("library/a")
    assert p.observe(alice, 429, quota_headers(100, 0, window=3600)) == "pull_limit"
    assert "alice" not in pulls(p, 4)
    clock.advance(3599)
    assert "alice" not in pulls(p, 4)
    clock.advance(1)
    assert "alice" in pulls(p, 3)
    value = metrics.registry.get_sample_value
    assert value("gateway_upstream_rate_limited_total",
                 {"route": ROUTE, "account": "alice", "kind": "pull_limit"}) == 1
    assert value("gateway_upstream_account_out_until_seconds",
                 {"route": ROUTE, "account": "alice"}) == 1000 + 3600


def test_retry_after_wins_over_the_window() -> None:
    clock = Clock(frozen=1000)
    p = pool(clock)
    alice = p.for_pull(None)
    spent = quota_headers(100, 0)
    spent["Retry-After"] = "60"
    p.observe(alice, 429, spent)
    clock.advance(59)
    assert "alice" not in pulls(p, 3)
    clock.advance(1)
    assert "alice" in pulls(p, 3)


def test_headers_saying_pulls_are_back_end_the_skip_early() -> None:
    clock = Clock(frozen=1000)
    p = pool(clock, accounts=POOL[:1])
    alice = p.for_pull("library/a")
    p.observe(alice, 429, quota_headers(100, 0))
    with pytest.raises(UpstreamError):
        p.for_pull("library/a")
    # A (free) HEAD as alice says her window moved on.
    assert p.for_other("library/a") is alice
    p.observe(alice, 200, quota_headers(100, 12))
    assert p.for_pull("library/a") is alice


def test_all_out_is_a_429_saying_when_the_first_comes_back() -> None:
    clock = Clock(frozen=1000)
    p = pool(clock)
    for account, window in zip(p.accounts, (600, 300, 900), strict=True):
        p.for_pull(None)
        p.observe(account, 429, quota_headers(100, 0, window=window))
    with pytest.raises(UpstreamError) as caught:
        p.for_pull("library/a")
    error = caught.value
    assert (error.code, error.status, error.retryable) == ("TOOMANYREQUESTS", 429, True)
    assert error.headers == {"Retry-After": "300"}
    assert "every account" in error.message
    # Non-pulls still go out (a HEAD is free on Docker Hub).
    assert p.for_other("library/a").name in ("alice", "bob", "carol")


def test_abuse_429_backs_off_the_whole_upstream_without_spending_accounts() -> None:
    clock = Clock(frozen=1000)
    metrics = Metrics()
    p = pool(clock, metrics)
    alice = p.for_pull(None)
    assert p.observe(alice, 429, headers(retry_after="120")) == "abuse"
    for ask in (lambda: p.for_pull(None), lambda: p.for_other("library/a")):
        with pytest.raises(UpstreamError) as caught:
            ask()
        assert caught.value.headers == {"Retry-After": "120"}
    clock.advance(120)
    assert pulls(p, 3) == ["bob", "carol", "alice"]  # nobody was marked out
    value = metrics.registry.get_sample_value
    assert value("gateway_upstream_rate_limited_total",
                 {"route": ROUTE, "account": "alice", "kind": "abuse"}) == 1
    assert value("gateway_upstream_rate_limited_total",
                 {"route": ROUTE, "account": "alice", "kind": "pull_limit"}) is None
    assert value("gateway_upstream_backoff_until_seconds", {"route": ROUTE}) == 1120


def test_blobs_and_heads_follow_the_manifests_account() -> None:
    p = pool(Clock(frozen=1000))
    assert [p.for_pull(repo).name for repo in ("r/one", "r/two")] == ["alice", "bob"]
    assert p.for_other("r/two").name == "bob"
    assert p.for_other("r/one").name == "alice"
    assert p.for_other("r/never-pulled").name == "alice"


def test_metrics_per_account_and_source_info() -> None:
    metrics = Metrics()
    p = pool(Clock(frozen=1000), metrics)
    alice, bob, _ = p.accounts
    p.observe(alice, 200, quota_headers(200, 150))
    p.observe(bob, 200, quota_headers(100, 7))
    moved = quota_headers(100, 6)
    moved["Docker-RateLimit-Source"] = "198.51.100.1"
    p.observe(bob, 200, moved)
    value = metrics.registry.get_sample_value
    for name, limit, remaining in (("alice", 200, 150), ("bob", 100, 6)):
        labels = {"route": ROUTE, "account": name}
        assert value("gateway_upstream_ratelimit_limit", labels) == limit
        assert value("gateway_upstream_ratelimit_remaining", labels) == remaining
        assert value("gateway_upstream_ratelimit_window_seconds", labels) == 21600
    info = {"route": ROUTE, "account": "bob"}
    assert value("gateway_upstream_ratelimit_source_info",
                 {**info, "source": "198.51.100.1"}) == 1
    assert value("gateway_upstream_ratelimit_source_info",
                 {**info, "source": "203.0.113.7"}) is None  # the old one is gone


def test_no_secret_in_metrics_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(frozen=1000)
    metrics = Metrics()
    p = pool(clock, metrics)
    caplog.set_level(logging.DEBUG)
    errors = []
    for account in list(p.accounts):
        p.for_pull("r/x")
        p.observe(account, 429, quota_headers(100, 0))
    try:
        p.for_pull("r/x")
    except UpstreamError as exc:
        errors.append(exc)
    p.observe(p.accounts[0], 429, headers())
    try:
        p.for_other("r/x")
    except UpstreamError as exc:
        errors.append(exc)
    assert len(errors) == 2
    shown = [metrics.render().decode(), caplog.text, repr(p.accounts),
             *(f"{e} {e.message} {e.headers} {e.body().decode()}" for e in errors)]
    assert "alice" in caplog.text and "abuse" in caplog.text
    for text in shown:
        assert SECRET not in text


# ----------------------------------------------------------------- config


POOL_TEXT = """
    routes:
      docker.io:
        credentials:
          - {username: alice, password_env: HUB_ALICE}
          - {username_env: BOB_USER, password_file: /run/secrets/bob}
        proxy:
          url: socks5h://127.0.0.1:1080
          username: gw
          password_env: PROXY_PASSWORD
      ghcr.io:
        credentials: {username: me, password_env: GHCR}
"""


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def config_error(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(text, "routes.yaml", env=env or {})
    return caught.value


def test_a_pool_of_credentials_and_a_proxy_login_are_parsed_without_secrets() -> None:
    config = parse_config(textwrap.dedent(POOL_TEXT), "routes.yaml")
    hub = config.route("docker.io").upstream
    assert hub.credentials_ref == (
        CredentialsRef(SecretRef("inline", "alice"), SecretRef("env", "HUB_ALICE")),
        CredentialsRef(SecretRef("env", "BOB_USER"), SecretRef("file", "/run/secrets/bob")))
    assert hub.proxy == ProxySettings(URL("socks5h://127.0.0.1:1080"), CredentialsRef(
        SecretRef("inline", "gw"), SecretRef("env", "PROXY_PASSWORD")))
    assert hub.pool == () and hub.proxy.credentials is None


def test_resolving_a_pool(tmp_path: pytest.TempPathFactory) -> None:
    bob = tmp_path / "bob"  # type: ignore[operator]
    bob.write_text(SECRET + "\n")
    text = textwrap.dedent(POOL_TEXT).replace("/run/secrets/bob", str(bob))
    config = load_config(text, "routes.yaml", env={
        "HUB_ALICE": SECRET + "a", "BOB_USER": "bob", "PROXY_PASSWORD": SECRET + "p",
        "GHCR": SECRET + "g"})
    hub = config.route("docker.io").upstream
    assert hub.pool == (Credentials("alice", SECRET + "a"), Credentials("bob", SECRET))
    assert hub.credentials == Credentials("alice", SECRET + "a")
    assert hub.proxy is not None and hub.proxy.credentials == Credentials("gw", SECRET + "p")
    # The single mapping is still one account.
    assert config.route("ghcr.io").upstream.pool == (Credentials("me", SECRET + "g"),)
    assert SECRET not in repr(config)


def test_a_missing_pool_secret_names_file_line_and_key() -> None:
    text = textwrap.dedent(POOL_TEXT)
    error = config_error(text, {"HUB_ALICE": "x", "BOB_USER": "bob"})
    assert (error.file, error.line, error.key) == (
        "routes.yaml", line_of(text, "password_file"),
        "routes.docker.io.credentials[1].password_file")


def test_a_missing_proxy_password_names_its_key() -> None:
    text = textwrap.dedent("""
        defaults:
          proxy: {url: 'http://127.0.0.1:3128', username: gw, password_env: PROXY_PW}
        routes:
          ghcr.io: {}
    """)
    error = config_error(text)
    assert (error.line, error.key) == (line_of(text, "proxy:"), "defaults.proxy.password_env")
    assert "PROXY_PW" in str(error)


@pytest.mark.parametrize(("body", "needle", "key"), [
    ("credentials: []", "credentials", "routes.docker.io.credentials"),
    ("credentials:\n      - {username: a, password_env: A}\n      - me", "- me",
     "routes.docker.io.credentials[1]"),
    ("credentials:\n      - {username: a, password: inline}", "password: inline",
     "routes.docker.io.credentials[0].password"),
    ("proxy: {url: 'socks5://h:1080', password: inline}", "proxy",
     "routes.docker.io.proxy.password"),
    ("proxy: {username: u, password_env: P}", "proxy", "routes.docker.io.proxy"),
    ("proxy: {url: 'socks5://h:1080', user: u}", "proxy", "routes.docker.io.proxy.user"),
    ("proxy: {url: 'ftp://h'}", "proxy", "routes.docker.io.proxy.url"),
])
def test_pool_and_proxy_mistakes_name_file_line_and_key(body: str, needle: str,
                                                         key: str) -> None:
    text = f"routes:\n  docker.io:\n    {body}\n"
    error = config_error(text)
    assert (error.file, error.line, error.key) == ("routes.yaml", line_of(text, needle), key)


def test_credentials_in_a_proxy_url_are_refused_without_echoing_them() -> None:
    text = f"routes:\n  ghcr.io:\n    proxy: 'socks5://gw:{SECRET}@127.0.0.1:1080'\n"
    error = config_error(text)
    assert error.key == "routes.ghcr.io.proxy" and SECRET not in str(error)


def test_an_account_listed_twice_is_refused() -> None:
    text = textwrap.dedent("""
        routes:
          docker.io:
            credentials:
              - {username: alice, password_env: A}
              - {username_env: SAME, password_env: B}
    """)
    error = config_error(text, {"A": "1", "B": "2", "SAME": "alice"})
    assert error.key == "routes.docker.io.credentials[1].username_env"
    assert "alice" in str(error) and "twice" in str(error)


# ----------------------------------------------------------------- connect


async def test_outbound_for_each_proxy_kind() -> None:
    direct = outbound(None, True)
    assert direct.proxy is None and direct.proxy_login is None
    login = Credentials("gw", SECRET)
    http = outbound(ProxySettings(URL("https://proxy.test:8443"), None, login), True)
    assert http.proxy == URL("https://proxy.test:8443")
    header = encode_basic_auth("gw", SECRET)
    # Plain http: the request itself goes to the proxy and carries the login ...
    sent: dict[str, str] = {}
    assert http.login_for(URL("http://registry.test/v2/"), sent) is None
    assert sent == {"Proxy-Authorization": header}
    # ... https: the CONNECT does, and the request inside the tunnel never.
    assert http.login_for(URL("https://registry.test/v2/"), sent) == {
        "Proxy-Authorization": header}
    assert sent == {}
    socks = outbound(ProxySettings(URL("socks5h://127.0.0.1"), None, login), True)
    assert socks.proxy is None and socks.proxy_login is None  # the connector carries it
    for made in (direct, http, socks):
        assert SECRET not in repr(made) and header not in repr(made)
        await made.connector.close()
