"""config.py: routes.yaml into frozen dataclasses; every mistake names file, line and key."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway import cli
from gateway.config import (
    FOREVER,
    PRESETS,
    SECTIONS,
    CachePolicy,
    Config,
    Credentials,
    CredentialsRef,
    ProxySettings,
    Route,
    SecretRef,
    UpstreamSettings,
    load_config,
    load_config_file,
    parse_config,
    parse_duration,
    parse_size,
    resolve_secrets,
    settings_section,
    yaml_key,
)
from gateway.config.document import Document
from gateway.config.values import duration, size
from gateway.errors import ConfigError

SHIPPED_ROUTES = Path(__file__).resolve().parents[2] / "routes.yaml"
SECRET = "hunter2-very-secret"


def load(text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(textwrap.dedent(text), "routes.yaml", env=env or {})


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line number of the `nth` line of dedented `text` containing `needle`."""
    found = 0
    for number, line in enumerate(textwrap.dedent(text).splitlines(), start=1):
        if needle in line:
            found += 1
            if found == nth:
                return number
    raise AssertionError(f"{needle!r} not in text")


def config_error(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(text, env)
    return caught.value


def assert_located(error: ConfigError, text: str, needle: str, key: str, *,
                   nth: int = 1) -> None:
    line = line_of(text, needle, nth)
    assert (error.file, error.line, error.key) == ("routes.yaml", line, key), str(error)
    assert str(error).startswith(f"routes.yaml:{line}: {key}: ")


# ---------------------------------------------------------------- presets


def test_a_preset_needs_nothing_else() -> None:
    config = load("""
        routes:
          docker.io: {}
          ghcr.io:
    """)
    hub = config.route("docker.io")
    assert hub.upstream.url == URL("https://registry-1.docker.io")
    assert hub.label == "hub"
    assert hub.library_prefix is True
    assert "registry-1.docker.io" in hub.aliases and "index.docker.io" in hub.aliases
    assert hub.namespace == "docker.io"
    assert hub.cache == CachePolicy(tag_ttl=600.0, negative_ttl=30.0, stale_if_error=FOREVER)
    ghcr = config.route("ghcr.io")
    assert ghcr.upstream.url == URL("https://ghcr.io") and ghcr.label == "ghcr"
    assert ghcr.library_prefix is False and ghcr.aliases == ()
    assert config.default_route == "docker.io"  # docker.io present: registry-mirrors mode
    assert config.source == "routes.yaml"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads_with_its_upstream_and_label(name: str) -> None:
    route = load(f"routes:\n  {name}: {{}}\n").route(name)
    assert route.upstream.url == URL(PRESETS[name].upstream)
    assert route.label == PRESETS[name].label


def test_without_docker_io_there_is_no_default_route() -> None:
    assert load("routes: {ghcr.io: {}}").default_route is None


def test_default_route_null_refuses_unrouted_requests() -> None:
    assert load("default_route: null\nroutes: {docker.io: {}}").default_route is None


def test_overrides_replace_preset_values() -> None:
    config = load("""
        base_domains: [Example.COM., mirror.corp]
        defaults:
          tag_ttl: 5m
          negative_ttl: 10s
        routes:
          ghcr.io:
            upstream: http://127.0.0.1:5001/
            label: gh
            hosts: [GHCR.Corp.Example., ghcr-mirror]
            aliases: [ghcr-alias.example]
            tag_ttl: 1m
            stale_if_error: never
            orphan_fetch_limit: 1024
          registry.example.org:
            upstream: https://registry.example.org
            library_prefix: true
    """)
    assert config.base_domains == ("example.com", "mirror.corp")
    ghcr = config.route("ghcr.io")
    assert ghcr.upstream.url == URL("http://127.0.0.1:5001")
    assert ghcr.label == "gh"
    assert ghcr.hosts == ("ghcr.corp.example", "ghcr-mirror")
    assert ghcr.aliases == ("ghcr-alias.example",)
    assert (ghcr.cache.tag_ttl, ghcr.cache.negative_ttl, ghcr.cache.stale_if_error) == \
        (60.0, 10.0, 0.0)
    assert ghcr.cache.orphan_fetch_limit == 1024
    other = config.route("registry.example.org")
    assert other.label is None and other.cache.tag_ttl == 300.0 and other.library_prefix is True
    assert other.namespace == "registry.example.org"


def test_registry_with_port_gets_a_safe_namespace() -> None:
    route = load("routes: {'localhost:5000': {upstream: 'http://127.0.0.1:5000'}}").route(
        "localhost:5000")
    assert "/" not in route.namespace and ":" not in route.namespace


def test_config_is_frozen() -> None:
    config = load("routes: {ghcr.io: {}}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.default_route = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].cache.tag_ttl = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].upstream.proxy = "http://x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].label = "x"  # type: ignore[misc]


def test_shipped_routes_yaml_loads() -> None:
    config = load_config_file(SHIPPED_ROUTES, env={})
    names = {route.name for route in config.routes}
    assert {"docker.io", "ghcr.io", "gcr.io", "quay.io", "registry.k8s.io", "nvcr.io"} <= names
    assert config.base_domains == ("example.com",)
    assert config.default_route == "docker.io"
    assert config.source == str(SHIPPED_ROUTES)
    for route in config.routes:
        assert route.cache.tag_ttl == 600.0 and route.cache.negative_ttl == 30.0
        assert route.cache.stale_if_error == FOREVER
        assert route.upstream.credentials is None


def test_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_file(tmp_path / "nope.yaml", env={})
    assert str(tmp_path / "nope.yaml") in str(caught.value)


# --------------------------------------------------------------- durations


@pytest.mark.parametrize(("value", "seconds"), [
    ("30s", 30.0), ("10m", 600.0), ("1h", 3600.0), ("1d", 86400.0), ("1.5h", 5400.0),
    ("250ms", 0.25), ("45", 45.0), (45, 45.0), (2.5, 2.5), (0, 0.0), ("10 m", 600.0),
    ("forever", math.inf), ("Forever", math.inf), ("inf", math.inf), ("always", math.inf),
    ("never", 0.0), ("off", 0.0), (" 7d ", 7 * 86400.0),
])
def test_durations(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["-5s", "5x", "", "1h30m", True, False, -1, [], None, "s"])
def test_bad_durations(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@given(st.one_of(st.text(max_size=12), st.integers(), st.floats(allow_nan=False)))
def test_random_durations_are_a_number_or_value_error(value: Any) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert seconds >= 0


# ------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("value", "size"), [
    (0, 0), (1024, 1024), ("1024", 1024), ("1B", 1), ("10KB", 10_000), ("10 kb", 10_000),
    ("5MB", 5_000_000), ("2GB", 2 * 10**9), ("1TB", 10**12), ("1KiB", 1024),
    ("512MiB", 512 << 20), ("200GiB", 200 << 30), ("8gib", 8 << 30), ("2TiB", 2 << 40),
    ("1.5GiB", 3 << 29), ("0.5KiB", 512), (" 7 MiB ", 7 << 20), (1 << 50, 1 << 50),
])
def test_sizes(value: Any, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [
    -1, "-1", "1.5", 1.5, 2.0, True, False, None, [], "", "GiB", "lots", "10 GiBs", "10XB",
    "10%", "1.5B", "1e3",
])
def test_bad_sizes(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@given(st.one_of(st.text(max_size=12), st.integers(), st.floats(allow_nan=False)))
def test_random_sizes_are_whole_bytes_or_value_error(value: Any) -> None:
    try:
        size = parse_size(value)
    except ValueError:
        return
    assert isinstance(size, int) and size >= 0


def test_orphan_fetch_limit_takes_a_size() -> None:
    config = load("defaults: {orphan_fetch_limit: 512MiB}\nroutes: {ghcr.io: {}, "
                  "quay.io: {orphan_fetch_limit: 1GB}}")
    assert config.route("ghcr.io").cache.orphan_fetch_limit == 512 << 20
    assert config.route("quay.io").cache.orphan_fetch_limit == 10**9


def test_bad_orphan_fetch_limit_in_defaults_names_the_defaults_line() -> None:
    text = """
        defaults:
          orphan_fetch_limit: lots
        routes:
          ghcr.io: {}
    """
    error = config_error(text)
    assert_located(error, text, "orphan_fetch_limit", "defaults.orphan_fetch_limit")
    assert "GiB" in str(error)


def test_bad_duration_in_a_route_names_its_line() -> None:
    text = """
        routes:
          ghcr.io:
            tag_ttl: 10 minutes
    """
    error = config_error(text)
    assert_located(error, text, "tag_ttl", "routes.ghcr.io.tag_ttl")
    assert "10 minutes" in str(error) and "30s" in str(error)


def test_bad_duration_in_defaults_names_the_defaults_line() -> None:
    text = """
        defaults:
          negative_ttl: soon
        routes:
          ghcr.io: {}
    """
    assert_located(config_error(text), text, "negative_ttl", "defaults.negative_ttl")


# ------------------------------------------------------------- credentials


def test_credentials_from_environment() -> None:
    route = load("""
        routes:
          docker.io:
            credentials:
              username: me
              password_env: HUB_TOKEN
    """, env={"HUB_TOKEN": SECRET}).route("docker.io")
    assert route.upstream.credentials == Credentials("me", SECRET)
    assert SECRET not in repr(route.upstream.credentials) and SECRET not in repr(route)


def test_username_from_environment_and_password_from_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(f"{SECRET}\n")
    user_file = tmp_path / "user"
    user_file.write_text("file-user\n")
    config = load(f"""
        routes:
          docker.io:
            credentials:
              username_env: HUB_USER
              password_file: {secret_file}
          ghcr.io:
            credentials:
              username_file: {user_file}
              password_file: {secret_file}
    """, env={"HUB_USER": "env-user"})
    assert config.route("docker.io").upstream.credentials == Credentials("env-user", SECRET)
    assert config.route("ghcr.io").upstream.credentials == Credentials("file-user", SECRET)


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RGW_UNIT_TEST_TOKEN", SECRET)
    config = load_config("routes:\n  docker.io:\n    credentials: {username: u, "
                         "password_env: RGW_UNIT_TEST_TOKEN}\n")
    assert config.route("docker.io").upstream.credentials == Credentials("u", SECRET)


def test_inline_password_is_refused_without_echoing_it() -> None:
    text = f"""
        routes:
          docker.io:
            credentials:
              username: me
              password: {SECRET}
    """
    error = config_error(text)
    assert_located(error, text, "password:", "routes.docker.io.credentials.password")
    assert "password_env" in str(error) and "password_file" in str(error)
    assert SECRET not in str(error)


def test_password_in_the_upstream_url_is_refused() -> None:
    """An inline password in `https://user:pass@host` is still an inline password: it would
    be logged with every request (the access log's "upstream" field) and printed by
    `registry-gateway check`."""
    text = f"""
        routes:
          registry.example.org:
            upstream: https://me:{SECRET}@registry.example.org
    """
    error = config_error(text)
    assert_located(error, text, "upstream:", "routes.registry.example.org.upstream")
    assert SECRET not in str(error)


def test_two_sources_for_one_secret_are_refused() -> None:
    text = """
        routes:
          docker.io:
            credentials:
              username: me
              password_env: A
              password_file: /nonexistent
    """
    error = config_error(text, env={"A": "x"})
    assert_located(error, text, "password_file", "routes.docker.io.credentials.password_file")
    assert "only one" in str(error)


def test_unset_password_env_names_the_variable_and_line() -> None:
    text = """
        routes:
          docker.io:
            credentials:
              username: me
              password_env: NOT_SET_ANYWHERE
    """
    error = config_error(text)
    assert_located(error, text, "password_env", "routes.docker.io.credentials.password_env")
    assert "NOT_SET_ANYWHERE" in str(error)


def test_unreadable_password_file(tmp_path: Path) -> None:
    text = f"""
        routes:
          docker.io:
            credentials:
              username: me
              password_file: {tmp_path / "missing"}
    """
    error = config_error(text)
    assert_located(error, text, "password_file", "routes.docker.io.credentials.password_file")
    assert str(tmp_path / "missing") in str(error)


def test_password_file_with_a_nul_byte_is_a_config_error() -> None:
    text = """
        routes:
          docker.io:
            credentials:
              username: me
              password_file: "/run/secrets/a\\0b"
    """
    error = config_error(text)
    assert_located(error, text, "password_file", "routes.docker.io.credentials.password_file")


def test_credentials_need_a_password() -> None:
    text = """
        routes:
          docker.io:
            credentials:
              username: me
    """
    assert_located(config_error(text), text, "credentials", "routes.docker.io.credentials")


def test_credentials_must_be_a_mapping() -> None:
    text = """
        routes:
          docker.io:
            credentials: me
    """
    assert_located(config_error(text), text, "credentials", "routes.docker.io.credentials")


def test_unknown_credentials_key() -> None:
    text = """
        routes:
          docker.io:
            credentials:
              username: me
              token_env: X
    """
    error = config_error(text)
    assert_located(error, text, "token_env", "routes.docker.io.credentials.token_env")
    assert "password_env" in str(error)


# ------------------------------------------- parse first, resolve secrets second


CREDENTIALS_TEXT = """
    routes:
      docker.io:
        credentials:
          username: me
          password_env: HUB_TOKEN
      ghcr.io:
        credentials:
          username_env: GHCR_USER
          password_file: /run/secrets/ghcr-token
      quay.io: {}
"""


def test_parsing_reads_no_secret() -> None:
    """No environment and no secret file is needed to parse: the refs say where secrets are."""
    config = parse_config(textwrap.dedent(CREDENTIALS_TEXT), "routes.yaml")
    hub, ghcr = config.route("docker.io").upstream, config.route("ghcr.io").upstream
    assert hub.credentials is None and ghcr.credentials is None
    assert hub.credentials_ref == CredentialsRef(SecretRef("inline", "me"),
                                                 SecretRef("env", "HUB_TOKEN"))
    assert hub.pool == ()  # nothing resolved yet
    assert ghcr.credentials_ref == CredentialsRef(SecretRef("env", "GHCR_USER"),
                                                  SecretRef("file", "/run/secrets/ghcr-token"))
    assert config.route("quay.io").upstream.credentials_ref is None


def test_resolving_fills_credentials_in_a_new_config(tmp_path: Path) -> None:
    token = tmp_path / "ghcr-token"
    token.write_text(f"{SECRET}\n")
    parsed = parse_config(textwrap.dedent(CREDENTIALS_TEXT).replace(
        "/run/secrets/ghcr-token", str(token)), "routes.yaml")
    resolved = resolve_secrets(parsed, {"HUB_TOKEN": "hub-secret", "GHCR_USER": "gh"})
    assert resolved.route("docker.io").upstream.credentials == Credentials("me", "hub-secret")
    assert resolved.route("ghcr.io").upstream.credentials == Credentials("gh", SECRET)
    assert resolved.route("quay.io") == parsed.route("quay.io")
    assert resolved.route("ghcr.io").upstream.credentials_ref == \
        parsed.route("ghcr.io").upstream.credentials_ref
    assert parsed.route("ghcr.io").upstream.credentials is None  # frozen: a new Config
    assert SECRET not in repr(resolved)


def test_resolving_later_still_names_file_line_and_key() -> None:
    text = CREDENTIALS_TEXT
    parsed = parse_config(textwrap.dedent(text), "routes.yaml")
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(parsed, {"GHCR_USER": "gh"})
    assert_located(caught.value, text, "password_env", "routes.docker.io.credentials.password_env")
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(parsed, {"HUB_TOKEN": "x", "GHCR_USER": "gh"})
    assert_located(caught.value, text, "password_file",
                   "routes.ghcr.io.credentials.password_file")


def test_every_route_is_parsed_before_any_secret_is_resolved() -> None:
    """A mistake anywhere in the file is reported before an unset variable is looked up."""
    text = """
        routes:
          docker.io:
            credentials: {username: me, password_env: NOT_SET_ANYWHERE}
          ghcr.io:
            tag_ttl: soon
    """
    assert_located(config_error(text), text, "tag_ttl", "routes.ghcr.io.tag_ttl")


def test_secret_refs_compare_by_source_and_value_only() -> None:
    first = parse_config("routes: {docker.io: {credentials: {username: u, password_env: A}}}",
                         "one.yaml")
    second = parse_config("\n\nroutes:\n  docker.io:\n    credentials:\n      username: u\n"
                          "      password_env: A\n", "two.yaml")
    assert first.route("docker.io").upstream == second.route("docker.io").upstream


def test_check_parses_and_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes:\n  docker.io:\n    credentials:\n      username: me\n"
                      "      password_env: RGW_UNIT_CHECK_TOKEN\n")
    monkeypatch.delenv("RGW_UNIT_CHECK_TOKEN", raising=False)
    assert cli.main(["check", str(routes)]) == 1
    assert f"{routes}:5: routes.docker.io.credentials.password_env" in capsys.readouterr().err
    monkeypatch.setenv("RGW_UNIT_CHECK_TOKEN", SECRET)
    assert cli.main(["check", str(routes)]) == 0
    out = capsys.readouterr().out
    assert "-> https://registry-1.docker.io" in out and "tag_ttl: 600s" in out
    assert "credentials for me" in out and SECRET not in out


# ----------------------------------------------------------- duplicates


def test_duplicate_host_across_routes() -> None:
    text = """
        routes:
          ghcr.io:
            hosts: [mirror.corp]
          quay.io:
            hosts: [other.corp, MIRROR.corp]
    """
    error = config_error(text)
    assert_located(error, text, "quay.io", "routes.quay.io")
    assert "mirror.corp" in str(error) and "ghcr.io" in str(error)


def test_duplicate_label_across_routes() -> None:
    text = """
        routes:
          ghcr.io: {}
          registry.example.org:
            upstream: https://registry.example.org
            label: ghcr
    """
    error = config_error(text)
    assert_located(error, text, "registry.example.org:", "routes.registry.example.org")
    assert "label 'ghcr'" in str(error)


def test_route_name_colliding_with_a_preset_alias() -> None:
    text = """
        routes:
          docker.io: {}
          registry-1.docker.io:
            upstream: https://registry-1.docker.io
            label: other
    """
    error = config_error(text)
    assert_located(error, text, "registry-1.docker.io:", "routes.registry-1.docker.io")
    assert "docker.io" in str(error)


def test_duplicate_yaml_key() -> None:
    text = """
        routes:
          ghcr.io: {}
          quay.io: {}
          ghcr.io: {}
    """
    error = config_error(text)
    assert_located(error, text, "ghcr.io", "routes.ghcr.io", nth=2)
    assert "duplicate" in str(error)


# -------------------------------------------------------- unknown keys


def test_unknown_top_level_key() -> None:
    text = """
        routes: {ghcr.io: {}}
        base_domain: [example.com]
    """
    error = config_error(text)
    assert_located(error, text, "base_domain:", "base_domain")
    assert "base_domains" in str(error)


def test_unknown_route_key_lists_the_valid_ones() -> None:
    text = """
        routes:
          ghcr.io:
            label: gh
            tagttl: 1m
    """
    error = config_error(text)
    assert_located(error, text, "tagttl", "routes.ghcr.io.tagttl")
    assert "tag_ttl" in str(error) and "upstream" in str(error)


def test_unknown_defaults_key() -> None:
    text = """
        defaults:
          label: x
        routes: {ghcr.io: {}}
    """
    assert_located(config_error(text), text, "label", "defaults.label")


def _yaml_keys(*classes: type[Any]) -> set[str]:
    """What the field metadata says routes.yaml may write (the table is derived from it)."""
    return {field.metadata["routes.yaml"].name or field.name
            for cls in classes for field in dataclasses.fields(cls)
            if "routes.yaml" in field.metadata}


def _listed_keys(error: ConfigError) -> set[str]:
    return set(str(error).split("valid keys: ")[1].split(", "))


def test_route_keys_are_the_fields_of_route_upstream_and_cache_policy() -> None:
    error = config_error("routes: {ghcr.io: {bogus: 1}}")
    assert _listed_keys(error) == _yaml_keys(Route, UpstreamSettings, CachePolicy) == {
        "upstream", "label", "hosts", "aliases", "library_prefix", "tag_ttl", "negative_ttl",
        "stale_if_error", "credentials", "ca_file", "proxy", "orphan_fetch_limit", "max_size",
        "fallbacks", "timeouts", "retries", "breaker", "stale_while_revalidate",
        "anonymous", "repositories", "parallel_fetch_threshold",
        "parallel_fetch_parts", "limits"}


def test_parallel_fetch_keys_are_per_route_and_inherited_from_defaults() -> None:
    config = parse_config(textwrap.dedent("""\
        defaults: {parallel_fetch_threshold: 32MiB, parallel_fetch_parts: 6}
        routes:
          ghcr.io: {}
          quay.io: {parallel_fetch_threshold: "off"}
          docker.io: {parallel_fetch_parts: 1}
        """), "routes.yaml")
    ghcr, quay, hub = (config.route(n).cache for n in ("ghcr.io", "quay.io", "docker.io"))
    assert (ghcr.parallel_fetch_threshold, ghcr.parallel_fetch_parts) == (32 << 20, 6)
    assert (quay.parallel_fetch_threshold, quay.parallel_fetch_parts) == (None, 6)
    assert (hub.parallel_fetch_threshold, hub.parallel_fetch_parts) == (32 << 20, 1)
    default = parse_config("routes: {ghcr.io: {}}").route("ghcr.io").cache
    assert (default.parallel_fetch_threshold, default.parallel_fetch_parts) == (4 << 20, 6)
    for bad in ("0", "65", "two", "true"):
        error = config_error(f"routes: {{ghcr.io: {{parallel_fetch_parts: {bad}}}}}")
        assert "parallel_fetch_parts" in str(error) and "1 to 64" in str(error)


def test_defaults_keys_are_the_cache_policy_and_proxy() -> None:
    error = config_error("defaults: {bogus: 1}\nroutes: {ghcr.io: {}}")
    # A route's max_size is its own quota: defaults: does not hand it to every route;
    # nor are a route's fallbacks (mirrors of its own registry) anybody else's.
    assert _listed_keys(error) == {f.name for f in dataclasses.fields(CachePolicy)
                                   if f.name != "max_size"} | {
        "proxy", "timeouts", "retries", "breaker", "anonymous", "repositories"}


def test_top_level_keys_are_the_sections() -> None:
    error = config_error("routes: {ghcr.io: {}}\nbogus: 1")
    assert _listed_keys(error) == set(SECTIONS) == {
        "base_domains", "default_route", "defaults", "routes", "trusted_proxies", "cache",
        "pins", "access", "limits", "storage", "forward_proxy", "redis"}


def test_a_settings_section_is_parsed_from_its_fields() -> None:
    """What adding a top-level section (cache:, storage:, ...) takes: a dataclass whose
    fields carry yaml_key(...) and one SECTIONS entry made by settings_section."""

    @dataclasses.dataclass(frozen=True)
    class Limits:
        max_size: int | None = dataclasses.field(default=None, metadata=yaml_key(size))
        window: float = dataclasses.field(default=1.0, metadata=yaml_key(duration))

    section = settings_section(Limits, "limits")
    text = "limits:\n  max_size: 2GiB\n  window: 1m\n  bogus: 1\n"
    document = Document.parse(text, "routes.yaml")
    at = document.at("limits")
    assert section.field == "limits"
    assert section.parse({"max_size": "2GiB"}, at, {}) == Limits(max_size=2 << 30)
    assert section.parse(None, at, {}) == Limits()
    with pytest.raises(ConfigError) as caught:
        section.parse(document.data["limits"], at, {})
    assert (caught.value.line, caught.value.key) == (4, "limits.bogus")
    assert _listed_keys(caught.value) == {"max_size", "window"}
    with pytest.raises(ConfigError) as caught:
        section.parse({"window": "soon"}, at, {})
    assert caught.value.key == "limits.window"


# ------------------------------------------------- null, presets and defaults


def test_null_label_takes_away_the_preset_label() -> None:
    assert load("routes: {ghcr.io: {label: null}}").route("ghcr.io").label is None


def test_null_aliases_and_hosts_keep_their_defaults() -> None:
    hub = load("routes: {docker.io: {aliases: null, hosts: null}}").route("docker.io")
    assert hub.aliases == PRESETS["docker.io"].aliases and hub.hosts == ()


def test_a_route_can_take_back_the_default_proxy() -> None:
    config = load("defaults: {proxy: 'http://10.0.0.1:3128', tag_ttl: 1m}\n"
                  "routes: {ghcr.io: {}, quay.io: {proxy: null}}")
    assert config.route("ghcr.io").upstream.proxy == ProxySettings(URL("http://10.0.0.1:3128"))
    assert config.route("quay.io").upstream.proxy is None
    assert config.route("quay.io").cache.tag_ttl == 60.0


def test_credentials_in_a_bad_upstream_url_are_not_echoed() -> None:
    text = f"""
        routes:
          registry.example.org:
            upstream: ftp://me:{SECRET}@registry.example.org/v2
    """
    error = config_error(text)
    assert_located(error, text, "upstream:", "routes.registry.example.org.upstream")
    assert SECRET not in str(error)


# ------------------------------------------------------- bad values


@pytest.mark.parametrize("upstream", [
    "ftp://registry.example.org", "registry.example.org", "https://registry.example.org/v2",
    "https://", "file:///etc/passwd",
])
def test_bad_upstream_url(upstream: str) -> None:
    text = f"""
        routes:
          registry.example.org:
            upstream: "{upstream}"
    """
    error = config_error(text)
    assert_located(error, text, "upstream", "routes.registry.example.org.upstream")
    assert "https://" in str(error)


@pytest.mark.parametrize("upstream", ["http://[::1", "http://:80", "https://host:99999"])
def test_unparseable_upstream_url_is_a_config_error(upstream: str) -> None:
    text = f"""
        routes:
          registry.example.org:
            upstream: "{upstream}"
    """
    error = config_error(text)
    assert_located(error, text, "upstream", "routes.registry.example.org.upstream")


def test_non_preset_needs_an_upstream() -> None:
    text = """
        routes:
          ghcr.io: {}
          registry.example.org:
            label: myreg
    """
    error = config_error(text)
    assert_located(error, text, "registry.example.org", "routes.registry.example.org")
    assert "upstream" in str(error)


@pytest.mark.parametrize("label", ["a.b", "Hub!", "-x", "x" * 64])
def test_bad_label(label: str) -> None:
    text = f"""
        routes:
          ghcr.io:
            label: "{label}"
    """
    assert_located(config_error(text), text, "label", "routes.ghcr.io.label")


def test_bad_host_names_its_list_item() -> None:
    text = """
        routes:
          ghcr.io:
            hosts:
              - good.example
              - bad_host!
    """
    error = config_error(text)
    assert_located(error, text, "bad_host", "routes.ghcr.io.hosts[1]")


def test_bad_base_domain_names_its_list_item() -> None:
    text = """
        base_domains:
          - example.com
          - "not a domain"
        routes: {ghcr.io: {}}
    """
    assert_located(config_error(text), text, "not a domain", "base_domains[1]")


def test_base_domains_must_be_a_list() -> None:
    text = """
        base_domains: {a: 1}
        routes: {ghcr.io: {}}
    """
    assert_located(config_error(text), text, "base_domains", "base_domains")


def test_bad_route_name() -> None:
    text = """
        routes:
          Not_A_Registry:
            upstream: https://registry.example.org
    """
    assert_located(config_error(text), text, "Not_A_Registry", "routes.Not_A_Registry")


def test_route_must_be_a_mapping() -> None:
    text = """
        routes:
          ghcr.io: yes
    """
    assert_located(config_error(text), text, "ghcr.io", "routes.ghcr.io")


def test_default_route_must_be_a_route() -> None:
    text = """
        default_route: quay.io
        routes: {ghcr.io: {}}
    """
    error = config_error(text)
    assert_located(error, text, "default_route", "default_route")
    assert "ghcr.io" in str(error)


def test_default_route_given_as_a_list_is_a_config_error() -> None:
    text = """
        default_route: [ghcr.io]
        routes: {ghcr.io: {}}
    """
    assert_located(config_error(text), text, "default_route", "default_route")


def test_missing_ca_file(tmp_path: Path) -> None:
    text = f"""
        routes:
          ghcr.io:
            ca_file: {tmp_path / "ca.pem"}
    """
    assert_located(config_error(text), text, "ca_file", "routes.ghcr.io.ca_file")
    (tmp_path / "ca.pem").write_text("pem")
    assert load(text).route("ghcr.io").upstream.ca_file == str(tmp_path / "ca.pem")


@pytest.mark.parametrize("url", ["ftp://10.0.0.1:21", "socks4://10.0.0.1:1080",
                                 "http://10.0.0.1:3128/path", "socks5://"])
def test_proxy_must_be_http_https_or_socks5(url: str) -> None:
    text = f"""
        routes:
          ghcr.io:
            proxy: {url}
    """
    error = config_error(text)
    assert_located(error, text, "proxy", "routes.ghcr.io.proxy")
    assert "socks5h" in str(error)


@pytest.mark.parametrize("url", ["http://10.0.0.1:3128", "https://proxy.example:8443",
                                 "socks5://10.0.0.1:1080", "socks5h://10.0.0.1"])
def test_proxy_schemes(url: str) -> None:
    good = load(f"routes: {{ghcr.io: {{proxy: '{url}'}}}}")
    assert good.route("ghcr.io").upstream.proxy == ProxySettings(URL(url))


def test_bad_proxy_in_defaults_names_the_defaults_line() -> None:
    text = """
        defaults:
          proxy: socks4://10.0.0.1:1080
        routes:
          ghcr.io: {}
    """
    assert_located(config_error(text), text, "proxy", "defaults.proxy")


def test_unparseable_proxy_url_is_a_config_error() -> None:
    text = """
        routes:
          ghcr.io:
            proxy: "http://[10.0.0.1:3128"
    """
    assert_located(config_error(text), text, "proxy", "routes.ghcr.io.proxy")


@pytest.mark.parametrize("value", ["-1", "lots", "1.5", "true"])
def test_bad_orphan_fetch_limit(value: str) -> None:
    text = f"""
        routes:
          ghcr.io:
            orphan_fetch_limit: {value}
    """
    assert_located(config_error(text), text, "orphan_fetch_limit",
                   "routes.ghcr.io.orphan_fetch_limit")


def test_library_prefix_must_be_boolean() -> None:
    text = """
        routes:
          ghcr.io:
            library_prefix: "yes"
    """
    assert_located(config_error(text), text, "library_prefix", "routes.ghcr.io.library_prefix")


def test_routes_must_be_a_non_empty_mapping() -> None:
    error = config_error("base_domains: [example.com]\nroutes: {}\n")
    assert error.key == "routes" and error.line == 2


def test_invalid_yaml_names_the_line() -> None:
    text = """
        routes:
          ghcr.io: {}
          quay.io: [unclosed
        base_domains: []
    """
    error = config_error(text)
    assert error.file == "routes.yaml"
    assert error.line is not None and error.line >= line_of(text, "quay.io")
    assert "YAML" in str(error)


def test_empty_file() -> None:
    error = config_error("")
    assert error.file == "routes.yaml" and "routes" in str(error)


def test_top_level_must_be_a_mapping() -> None:
    error = config_error("- docker.io\n- ghcr.io\n")
    assert (error.file, error.line) == ("routes.yaml", 1)


def test_non_scalar_key() -> None:
    text = """
        routes:
          ? [a, b]
          : {}
    """
    error = config_error(text)
    assert error.line == line_of(text, "[a, b]")


# ------------------------------------------------------------------ fuzz

_KEYS = sorted({
    "upstream", "label", "hosts", "aliases", "library_prefix", "tag_ttl", "negative_ttl",
    "stale_if_error", "credentials", "ca_file", "proxy", "orphan_fetch_limit", "username",
    "username_env", "password_env", "password_file", "bogus",
})
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 1 << 40), st.floats(allow_nan=False),
    st.text("abcxyz019.-_:/ ", max_size=12),
    st.sampled_from(["30s", "forever", "https://registry.example.org", "http://127.0.0.1:1",
                     "docker.io", "ghcr.io", "ENV_SET", "hub", "example.com"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4)),
    max_leaves=8,
)
_documents = st.fixed_dictionaries(
    {"routes": st.dictionaries(
        st.sampled_from(["docker.io", "ghcr.io", "quay.io", "registry.example.org", "Bad Name"]),
        st.one_of(st.none(), st.dictionaries(st.sampled_from(_KEYS), _values, max_size=4)),
        max_size=3)},
    optional={"base_domains": _values, "default_route": _values,
              "defaults": st.dictionaries(st.sampled_from(_KEYS), _values, max_size=3)},
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents)
def test_any_document_loads_or_raises_a_config_error(document: dict[str, Any]) -> None:
    text = yaml.safe_dump(document)
    try:
        config = load_config(text, "routes.yaml", env={"ENV_SET": "value"})
    except ConfigError as exc:
        assert str(exc).startswith("routes.yaml")
        return
    assert isinstance(config, Config)
