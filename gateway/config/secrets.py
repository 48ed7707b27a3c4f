"""Resolving secrets: each route's `CredentialsRef`s (its accounts, its proxy's login) into
`Credentials`, after parsing.

The only place that reads the environment or secret files. A secret's value never
appears in an error: errors name the variable or the path, with the file, line and key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError
from .model import Config, Credentials, CredentialsRef, Route, SecretRef
from .redis import resolve_redis
from .storage import resolve_storage


def resolve_secrets(config: Config, env: Mapping[str, str] | None = None) -> Config:
    """A new `Config` whose routes with a `credentials_ref` have their `credentials`;
    `env` defaults to os.environ. Reads secret files: not for the event loop."""
    env = os.environ if env is None else env
    return replace(config, routes=tuple(_resolve_route(route, env) for route in config.routes),
                   storage=resolve_storage(config.storage, env),
                   redis=resolve_redis(config.redis, env))


def resolve_secret(ref: SecretRef, env: Mapping[str, str]) -> str:
    if ref.source == "inline":
        return ref.value
    if ref.source == "env":
        if ref.value not in env:
            raise _error(ref, f"environment variable {ref.value} is not set")
        return env[ref.value]
    path = Path(ref.value).expanduser()
    try:
        return path.read_text().strip()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a usable path or text"
        raise _error(ref, f"cannot read {path}: {reason}") from None


def _resolve_route(route: Route, env: Mapping[str, str]) -> Route:
    upstream = route.upstream
    ref = upstream.credentials_ref
    if ref is not None:
        refs = ref if isinstance(ref, tuple) else (ref,)
        accounts = tuple(_credentials(one, env) for one in refs)
        _check_distinct(refs, accounts)
        upstream = replace(upstream, credentials=accounts[0], accounts=accounts)
    proxy = upstream.proxy
    if proxy is not None and proxy.credentials_ref is not None:
        upstream = replace(upstream, proxy=replace(
            proxy, credentials=_credentials(proxy.credentials_ref, env)))
    return route if upstream is route.upstream else replace(route, upstream=upstream)


def _credentials(ref: CredentialsRef, env: Mapping[str, str]) -> Credentials:
    return Credentials(resolve_secret(ref.username, env), resolve_secret(ref.password, env))


def _check_distinct(refs: tuple[CredentialsRef, ...], accounts: tuple[Credentials, ...]) -> None:
    """An account is named by its username in metrics and logs: each once per pool."""
    seen: set[str] = set()
    for ref, account in zip(refs, accounts, strict=True):
        if account.username in seen:
            raise _error(ref.username, f"the account {account.username!r} is listed twice "
                         "in this route's credentials")
        seen.add(account.username)


def _error(ref: SecretRef, message: str) -> ConfigError:
    return ref.location.error(message) if ref.location else ConfigError(message)
