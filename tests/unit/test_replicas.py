"""Replicas without sockets: `redis:` in routes.yaml (secrets resolved after parsing, never
shown; mistakes refused with the key), the replicas' HMAC, a lease's value, and the access
stage's refusal of the internal endpoint to anyone who cannot sign."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from yarl import URL

from gateway.cache.coordinate_redis import Holder
from gateway.cache.replica_auth import FLIGHT_PATH, INTERNAL_PREFIX, sign, verify
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.pipeline.access import INTERNAL_PREFIX as ACCESS_PREFIX

ROUTES = "routes: {ghcr.io: {upstream: 'http://127.0.0.1:5000'}}\n"


def load(redis: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_config(ROUTES + textwrap.dedent(redis), "routes.yaml", env or {})


def refused(redis: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(redis, env)
    return caught.value


def test_without_redis_there_is_none() -> None:
    assert not load("").redis.enabled


def test_a_url_alone_or_a_mapping_with_secrets_from_env_and_file(tmp_path: Path) -> None:
    assert load("redis: redis://127.0.0.1:6379/0").redis.url == URL("redis://127.0.0.1:6379/0")
    secret = tmp_path / "secret"
    secret.write_text("s" * 32 + "\n")
    settings = load(f"""\
        redis:
          url: redis://r.internal:6379/1
          password_env: REDIS_PASSWORD
          secret_file: {secret}
          prefix: "rg:"
          lease_ttl: 5s
          heartbeat: 1s
          advertise: http://10.0.0.5:5000
        """, {"REDIS_PASSWORD": "hunter2"}).redis
    assert settings.password == "hunter2" and settings.secret == "s" * 32
    assert (settings.prefix, settings.lease_ttl, settings.heartbeat) == ("rg:", 5.0, 1.0)
    assert settings.advertise == URL("http://10.0.0.5:5000")
    assert "hunter2" not in repr(settings) and "s" * 32 not in repr(settings)


@pytest.mark.parametrize(("redis", "says"), [
    ("redis: {prefix: x}", "needs url"),
    ("redis: {url: 'http://h:1'}", "Redis URL"),
    ("redis: {url: 'redis://:pw@h:1'}", "password does not go"),
    ("redis: {url: 'redis://h', password: pw}", "unknown key"),
    ("redis: {url: 'redis://h', lease_ttl: 2s, heartbeat: 3s}", "less than lease_ttl"),
    ("redis: {url: 'redis://h', advertise: 'h:5000'}", "other replicas reach"),
    ("redis: [x]", "want a Redis URL"),
])
def test_mistakes_are_refused_with_the_key(redis: str, says: str) -> None:
    error = refused(redis)
    assert says in str(error), str(error)
    assert "pw" not in str(error).replace("password", "")


def test_a_short_secret_is_refused() -> None:
    assert "16 characters" in str(refused("redis: {url: 'redis://h', secret_env: S}",
                                          {"S": "short"}))


def test_a_signature_holds_for_its_request_only_and_expires() -> None:
    secret = b"k" * 32
    path = FLIGHT_PATH + "sha256:" + "a" * 64 + "?ns=docker.io&fence=7"
    header = sign(secret, "GET", path, 1000.0)
    assert verify(secret, header, "GET", path, 1000.0)
    assert verify(secret, header, "get", path, 1020.0)
    assert not verify(secret, header, "GET", path, 1031.0)  # expired
    assert not verify(secret, header, "GET", path.replace("fence=7", "fence=8"), 1000.0)
    assert not verify(b"x" * 32, header, "GET", path, 1000.0)
    assert not verify(None, header, "GET", path, 1000.0)
    for forged in ("", "abc", "1030.", "99999999999.00", f"{10**12}.{header.split('.')[1]}"):
        assert not verify(secret, forged, "GET", path, 1000.0), forged


def test_a_lease_value_round_trips_and_junk_is_nobody() -> None:
    holder = Holder(42, "http://10.0.0.5:5000")
    assert Holder.decode(holder.encode()) == holder
    assert Holder.decode(holder.encode().encode()) == holder
    for junk in (None, b"", b"{}", b"[1]", b'{"t": "x", "u": 1}'):
        assert Holder.decode(junk) is None


def test_the_access_stage_guards_the_endpoint_the_replicas_serve() -> None:
    assert ACCESS_PREFIX == INTERNAL_PREFIX and FLIGHT_PATH.startswith(INTERNAL_PREFIX)


def test_a_reload_that_changes_redis_is_refused() -> None:
    from gateway.config.redis import check_reload

    old = load("redis: redis://127.0.0.1:6379/0").redis
    check_reload(old, load("redis: redis://127.0.0.1:6379/0").redis, "routes.yaml")
    for new in ("redis: redis://127.0.0.1:6380/0", ""):
        with pytest.raises(ConfigError, match="takes a restart"):
            check_reload(old, load(new).redis, "routes.yaml")
