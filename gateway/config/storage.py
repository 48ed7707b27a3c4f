"""`storage:` in routes.yaml: where committed blobs, manifests and tags live. `filesystem`
(the data directory, the default) or `s3` (any S3-compatible service: endpoint, bucket,
region, path-style, credentials from the environment or files, presigned redirects).

Values only: the keys' secrets are `SecretRef`s until `resolve_storage` reads them (never
logged: `S3Keys` hides the secret); cache/s3.py builds the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from yarl import URL

from ..errors import ConfigError
from .document import Place
from .schema import build, check_keys, keys_of, parse_keys, yaml_key
from .values import ABSENT, boolean, duration, size

if TYPE_CHECKING:
    from .model import SecretRef

MIN_PART = 5 << 20  # S3's smallest multipart part (all but the last)
MAX_PART = 5 << 30
# Without `access_key*`/`secret_key*`, the variables every S3 tool reads.
AWS_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
AWS_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"


@dataclass(frozen=True)
class S3Keys:
    access_key: str
    secret_key: str = field(repr=False)

    def __repr__(self) -> str:  # never show the secret, even in a debugger
        return f"S3Keys(access_key={self.access_key!r}, secret_key=***)"


@dataclass(frozen=True)
class Redirect:
    """`redirect:`: blobs of at least `min_size` are answered with a 307 to a presigned
    URL valid for `expires` seconds."""

    min_size: int = field(default=0, metadata=yaml_key(size))
    expires: float = field(default=900.0, metadata=yaml_key(duration))


def _redirect(value: Any, at: Place) -> Redirect | None:
    if value is None or value is False:
        return None
    if value is True:
        return Redirect()
    if not isinstance(value, dict):
        raise at.error("want a mapping of expires, min_size (or null for no redirects)")
    redirect = build(Redirect, parse_keys(at, value, keys_of(Redirect)))
    if not 1 <= redirect.expires <= 7 * 86400:  # SigV4's limit: a week
        raise at.child("expires").error("want between 1s and 7d")
    return redirect


def _endpoint(value: Any, at: Place) -> URL | None:
    if value is None:
        return None
    try:
        url = URL(str(value))
        url.port  # noqa: B018  (yarl checks the port range lazily)
    except (ValueError, TypeError):
        raise at.error("not a valid URL (want http://host:port or https://...)") from None
    if url.user is not None or url.password is not None:
        raise at.error("keys do not go in the endpoint URL: use access_key_env and "
                       "secret_key_env (or _file)")
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
        raise at.error(f"{value!r} is not an endpoint URL like https://s3.example.com:8333")
    return url.with_path("")


def _text(value: Any, at: Place) -> str:
    if not isinstance(value, str) or not value.strip():
        raise at.error("want a non-empty string")
    return value.strip()


def _prefix(value: Any, at: Place) -> str:
    if value is None:
        return ""
    text = _text(value, at).strip("/")
    if ".." in text.split("/"):
        raise at.error("a key prefix cannot hold '..'")
    return text + "/" if text else ""


def _kind(value: Any, at: Place) -> str:
    if value not in ("filesystem", "s3"):
        raise at.error("want filesystem or s3")
    return str(value)


def _part_size(value: Any, at: Place) -> int:
    parsed = size(value, at)
    if not MIN_PART <= parsed <= MAX_PART:
        raise at.error("want a part size between 5MiB and 5GiB (S3's limits)")
    return parsed


@dataclass(frozen=True)
class StorageSettings:
    type: Literal["filesystem", "s3"] = field(default="filesystem", metadata=yaml_key(_kind))
    endpoint: URL | None = field(default=None, metadata=yaml_key(_endpoint))  # None: AWS
    bucket: str = field(default="", metadata=yaml_key(_text))
    region: str = field(default="us-east-1", metadata=yaml_key(_text))
    path_style: bool = field(default=False, metadata=yaml_key(boolean))
    prefix: str = field(default="", metadata=yaml_key(_prefix))  # every key under it
    part_size: int = field(default=16 << 20, metadata=yaml_key(_part_size))
    redirect: Redirect | None = field(default=None, metadata=yaml_key(_redirect))
    # Where the keys come from (None: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
    access_key_ref: SecretRef | None = field(default=None, repr=False)
    secret_key_ref: SecretRef | None = field(default=None, repr=False)
    keys: S3Keys | None = None  # filled by resolve_storage


_KEYS = keys_of(StorageSettings)
_SECRETS = ("access_key", "access_key_env", "access_key_file", "secret_key_env",
            "secret_key_file")


def storage_section(raw: Any, at: Place, _earlier: Mapping[str, Any]) -> StorageSettings:
    """The `storage:` section (absent or null: the filesystem store)."""
    if raw is None or raw is ABSENT:
        return StorageSettings()
    if not isinstance(raw, dict):
        raise at.error("want a mapping of " + ", ".join(sorted([*_KEYS, *_SECRETS])))
    check_keys(at, raw, [*_KEYS, *_SECRETS])
    plain = {k: v for k, v in raw.items() if k not in _SECRETS}
    settings = build(StorageSettings, parse_keys(at, plain, _KEYS))
    secrets = {k: v for k, v in raw.items() if k in _SECRETS}
    if settings.type == "filesystem":
        if len(plain) > 1 or secrets:
            extra = sorted(k for k in raw if k != "type")[0]
            raise at.child(extra).error("only type: s3 takes more keys")
        return settings
    if not settings.bucket:
        raise at.error("type: s3 needs bucket: (and endpoint: unless it is AWS)")
    if settings.redirect is not None and settings.redirect.min_size < 0:
        raise at.child("redirect").error("min_size cannot be negative")
    # model.py imports this module (Config has a StorageSettings): import it when used.
    from .model import _secret_ref

    access = _secret_ref(secrets, at, "access_key", True)
    secret = _secret_ref(secrets, at, "secret_key", False)
    if (access is None) != (secret is None):
        raise at.error("give both access_key[_env|_file] and secret_key_env|secret_key_file, "
                       f"or neither (then {AWS_ACCESS_KEY} and {AWS_SECRET_KEY} are read)")
    return replace(settings, access_key_ref=access, secret_key_ref=secret)


def resolve_storage(settings: StorageSettings, env: Mapping[str, str]) -> StorageSettings:
    """`settings` with its keys read (S3 only). Reads secret files: not for the loop."""
    if settings.type != "s3":
        return settings
    from .model import SecretRef
    from .secrets import resolve_secret

    access = settings.access_key_ref or SecretRef("env", AWS_ACCESS_KEY)
    secret = settings.secret_key_ref or SecretRef("env", AWS_SECRET_KEY)
    return replace(settings, keys=S3Keys(resolve_secret(access, env),
                                         resolve_secret(secret, env)))


def storage_files(settings: StorageSettings) -> list[str]:
    """The key files `storage:` reads (`*_file:`): a changed key is a reload."""
    return [ref.value for ref in (settings.access_key_ref, settings.secret_key_ref)
            if ref is not None and ref.source == "file"]


def check_reload(old: StorageSettings, new: StorageSettings, source: str) -> None:
    """Refuse a reload that moves the store: the objects would stay behind. Only the keys
    and `redirect:` change live."""
    def place(settings: StorageSettings) -> StorageSettings:
        return replace(settings, keys=None, access_key_ref=None, secret_key_ref=None,
                       redirect=None)

    if place(old) != place(new):
        raise ConfigError("storage: a new type, endpoint, bucket, region, prefix, path_style "
                          "or part_size takes a restart (keys and redirect: apply live)",
                          file=source)
