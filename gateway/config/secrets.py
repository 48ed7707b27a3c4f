"""Resolving secrets: each route's `CredentialsRef` into `Credentials`, after parsing.

The only place that reads the environment or secret files. A secret's value never
appears in an error: errors name the variable or the path, with the file, line and key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError
from .model import Config, Credentials, Route, SecretRef


def resolve_secrets(config: Config, env: Mapping[str, str] | None = None) -> Config:
    """A new `Config` whose routes with a `credentials_ref` have their `credentials`;
    `env` defaults to os.environ. Reads secret files: not for the event loop."""
    env = os.environ if env is None else env
    return replace(config, routes=tuple(_resolve_route(route, env) for route in config.routes))


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
    ref = route.upstream.credentials_ref
    if ref is None:
        return route
    credentials = Credentials(resolve_secret(ref.username, env), resolve_secret(ref.password, env))
    return replace(route, upstream=replace(route.upstream, credentials=credentials))


def _error(ref: SecretRef, message: str) -> ConfigError:
    return ref.location.error(message) if ref.location else ConfigError(message)
