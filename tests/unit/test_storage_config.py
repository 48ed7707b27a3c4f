"""`storage:` in routes.yaml: the filesystem default, an S3 bucket with its keys from the
environment or files (resolved after parsing, never shown), redirects, and what is refused."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from yarl import URL

from gateway.config import load_config, parse_config
from gateway.config.storage import Redirect, S3Keys, check_reload
from gateway.errors import ConfigError
from gateway.reload import secret_files

ROUTES = "routes: {ghcr.io: {upstream: 'http://127.0.0.1:5000'}}\n"


def load(storage: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_config(ROUTES + textwrap.dedent(storage), "routes.yaml", env or {})


def refused(storage: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(storage, env)
    return caught.value


def test_without_storage_it_is_the_data_directory() -> None:
    assert load("").storage.type == "filesystem"
    assert load("storage: {type: filesystem}").storage.type == "filesystem"


def test_an_s3_bucket_with_keys_from_the_environment() -> None:
    config = load("""
        storage:
          type: s3
          endpoint: http://127.0.0.1:8333
          bucket: registry-cache
          region: eu-west-1
          path_style: true
          prefix: /gateway/
          part_size: 8MiB
          access_key_env: MY_KEY
          secret_key_env: MY_SECRET
          redirect: {min_size: 1MiB, expires: 10m}
        """, {"MY_KEY": "AKIDEXAMPLE", "MY_SECRET": "wJalrXUtnFEMI"})
    storage = config.storage
    assert (storage.type, storage.endpoint, storage.bucket, storage.region) == (
        "s3", URL("http://127.0.0.1:8333"), "registry-cache", "eu-west-1")
    assert storage.path_style and storage.prefix == "gateway/"
    assert storage.part_size == 8 << 20
    assert storage.redirect == Redirect(min_size=1 << 20, expires=600.0)
    assert storage.keys == S3Keys("AKIDEXAMPLE", "wJalrXUtnFEMI")
    assert "wJalrXUtnFEMI" not in repr(config)


def test_without_key_settings_the_aws_variables_are_read() -> None:
    storage = load("storage: {type: s3, bucket: b}",
                   {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"}).storage
    assert storage.keys == S3Keys("AK", "SK")
    assert storage.endpoint is None and not storage.path_style and storage.redirect is None
    error = refused("storage: {type: s3, bucket: b}")
    assert "AWS_ACCESS_KEY_ID" in str(error)


def test_keys_from_files_are_read_after_parsing_and_watched(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value\n")
    text = f"storage: {{type: s3, bucket: b, access_key: AK, secret_key_file: {secret}}}"
    parsed = parse_config(ROUTES + text)
    assert parsed.storage.keys is None  # parsing reads no file
    assert list(secret_files(parsed)) == [secret]
    assert load(text).storage.keys == S3Keys("AK", "s3cr3t-value")
    secret.unlink()
    error = refused(text)
    assert str(secret) in str(error) and "secret_key_file" in str(error)


@pytest.mark.parametrize(("storage", "says"), [
    ("storage: {type: s4}", "filesystem or s3"),
    ("storage: {type: s3}", "bucket"),
    ("storage: {type: filesystem, bucket: b}", "only type: s3"),
    ("storage: {type: s3, bucket: b, secret_key: x}", "unknown key"),
    ("storage: {type: s3, bucket: b, access_key: AK}", "both"),
    ("storage: {type: s3, bucket: b, part_size: 1MiB}", "5MiB"),
    ("storage: {type: s3, bucket: b, endpoint: 'http://k:s@h:1'}", "keys do not go"),
    ("storage: {type: s3, bucket: b, endpoint: 'ftp://h'}", "endpoint URL"),
    ("storage: {type: s3, bucket: b, redirect: {expires: 30d}}", "7d"),
    ("storage: {type: s3, bucket: b, redirect: {bogus: 1}}", "unknown key"),
    ("storage: [s3]", "want a mapping"),
])
def test_mistakes_are_refused_with_the_key(storage: str, says: str) -> None:
    error = refused(storage, {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"})
    assert says in str(error), str(error)
    assert error.line == 2


def test_an_inline_secret_key_is_never_accepted_and_never_echoed() -> None:
    error = refused("storage: {type: s3, bucket: b, access_key: AK, secret_key: hunter2}")
    assert "hunter2" not in str(error)


def test_a_reload_may_change_keys_and_redirects_but_not_the_place() -> None:
    env = {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "K2": "SK2"}
    old = load("storage: {type: s3, bucket: b}", env).storage
    rotated = load("storage: {type: s3, bucket: b, access_key: AK, secret_key_env: K2,"
                   " redirect: {min_size: 1MiB}}", env).storage
    check_reload(old, rotated, "routes.yaml")  # fine
    for moved in ("storage: {type: s3, bucket: other}", "storage: {type: s3, bucket: b, "
                  "prefix: p}", "storage: {type: filesystem}"):
        with pytest.raises(ConfigError, match="takes a restart"):
            check_reload(old, load(moved, env).storage, "routes.yaml")
    with pytest.raises(ConfigError, match="takes a restart"):
        check_reload(load("", env).storage, old, "routes.yaml")
