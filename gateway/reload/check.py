"""`registry-gateway check`: whether a routes.yaml would be accepted by a reload (parsed,
secrets resolved), and what it holds. Never prints a secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..config import Config, load_config_file
from ..errors import ConfigError


def check_file(path: Path, env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """(True, a description ending in OK) or (False, the error naming file, line and key)."""
    try:
        config = load_config_file(path, env)
    except ConfigError as exc:
        return False, str(exc)
    return True, f"{describe_config(config)}\nOK: {path} is valid"


def describe_config(config: Config) -> str:
    lines = [f"{config.source}: {len(config.routes)} routes, default route "
             f"{config.default_route or '(none)'}"]
    for route in config.routes:
        hosts = list(route.hosts)
        if route.label:
            hosts += [f"{route.label}.{d}" for d in config.base_domains] or [f"{route.label}.*"]
        accounts = [account.username for account in route.upstream.pool]
        auth = f", credentials for {', '.join(accounts)}" if accounts else ""
        lines.append(f"  {route.name:<20} -> {route.upstream.url}  hosts: "
                     f"{', '.join(hosts) or '-'}  tag_ttl: {route.cache.tag_ttl:g}s{auth}")
    return "\n".join(lines)
