"""`redis:` in routes.yaml: the Redis that replicas share (single-flight leases, tags, the
negative cache): `url`, a password and the replicas' shared secret from the environment
or a file, the key `prefix`, the lease's `lease_ttl` and `heartbeat`, `advertise`.

Values only: secrets are `SecretRef`s until `resolve_redis` reads them (never logged:
`RedisSettings` hides them); cache/coordinate_redis.py builds the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from yarl import URL

from ..errors import ConfigError
from .document import Place
from .schema import build, check_keys, keys_of, parse_keys, yaml_key
from .values import ABSENT, duration

if TYPE_CHECKING:
    from .model import SecretRef


def _redis_url(value: Any, at: Place) -> URL:
    try:
        url = URL(str(value))
        url.port  # noqa: B018  (yarl checks the port range lazily)
    except (ValueError, TypeError):
        raise at.error("not a valid URL (want redis://host:6379/0 or rediss://...)") from None
    if url.scheme not in ("redis", "rediss", "unix") or not (url.host or url.path):
        raise at.error(f"{value!r} is not a Redis URL like redis://redis.internal:6379/0")
    if url.password is not None:
        raise at.error("the password does not go in the URL: use password_env or "
                       "password_file")
    return url


def _advertise(value: Any, at: Place) -> URL | None:
    if value is None:
        return None
    try:
        url = URL(str(value))
    except (ValueError, TypeError):
        url = URL()
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
        raise at.error(f"{value!r}: want the URL other replicas reach this one at, like "
                       "http://10.0.0.5:5000")
    return url.with_path("")


def _prefix(value: Any, at: Place) -> str:
    if not isinstance(value, str) or not value.strip():
        raise at.error("want a non-empty key prefix, e.g. registry-gateway:")
    return value.strip()


@dataclass(frozen=True)
class RedisSettings:
    url: URL | None = field(default=None, metadata=yaml_key(_redis_url))  # None: no Redis
    prefix: str = field(default="registry-gateway:", metadata=yaml_key(_prefix))
    lease_ttl: float = field(default=10.0, metadata=yaml_key(duration))
    heartbeat: float = field(default=3.0, metadata=yaml_key(duration))
    # Where other replicas reach this one's internal endpoint (None: the first listener).
    advertise: URL | None = field(default=None, metadata=yaml_key(_advertise))
    password_ref: SecretRef | None = field(default=None, repr=False)
    secret_ref: SecretRef | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)  # filled by resolve_redis
    secret: str | None = field(default=None, repr=False)  # None: one kept in Redis

    @property
    def enabled(self) -> bool:
        return self.url is not None


_KEYS = keys_of(RedisSettings)
_SECRETS = ("password_env", "password_file", "secret_env", "secret_file")


def redis_section(raw: Any, at: Place, _earlier: Mapping[str, Any]) -> RedisSettings:
    """The `redis:` section (absent or null: no Redis; a string: its URL)."""
    if raw is None or raw is ABSENT:
        return RedisSettings()
    if isinstance(raw, str):
        raw = {"url": raw}
    if not isinstance(raw, dict):
        raise at.error("want a Redis URL or a mapping of " +
                       ", ".join(sorted([*_KEYS, *_SECRETS])))
    check_keys(at, raw, [*_KEYS, *_SECRETS])
    if "url" not in raw:
        raise at.error("redis: needs url: (e.g. redis://redis.internal:6379/0)")
    settings = build(RedisSettings, parse_keys(
        at, {k: v for k, v in raw.items() if k not in _SECRETS}, _KEYS))
    if not 0.5 <= settings.lease_ttl <= 600:
        raise at.child("lease_ttl").error("want between 0.5s and 10m")
    if not 0 < settings.heartbeat < settings.lease_ttl:
        raise at.child("heartbeat").error("want more than 0 and less than lease_ttl")
    from .model import _secret_ref  # model.py imports this module

    secrets = {k: v for k, v in raw.items() if k in _SECRETS}
    return replace(settings, password_ref=_secret_ref(secrets, at, "password", False),
                   secret_ref=_secret_ref(secrets, at, "secret", False))


def resolve_redis(settings: RedisSettings, env: Mapping[str, str]) -> RedisSettings:
    """`settings` with the password and secret read. Reads files: not for the loop."""
    if not settings.enabled:
        return settings
    from .secrets import resolve_secret

    password = resolve_secret(settings.password_ref, env) if settings.password_ref else None
    secret = resolve_secret(settings.secret_ref, env) if settings.secret_ref else None
    if secret is not None and len(secret) < 16:
        raise ConfigError("redis: the replicas' secret must be at least 16 characters")
    return replace(settings, password=password, secret=secret)


def check_reload(old: RedisSettings, new: RedisSettings, source: str) -> None:
    """Refuse a reload that changes `redis:`: the coordinator is built once, at start."""
    if old != new:
        raise ConfigError("redis: a change takes a restart (the running config stays)",
                          file=source)
