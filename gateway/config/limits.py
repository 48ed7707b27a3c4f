"""`limits:` in routes.yaml: per-client token buckets (requests, bytes served, upstream
misses), connection caps and the listener's hardening (`limits.server`), and a route's
`limits:` (its upstream bandwidth cap, its own miss budget).

Values only: the buckets are buckets.py, the stage pipeline/limits.py, the listener
listen.py. Nothing here reads files or the environment.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from .access import LOOPBACK
from .document import Place
from .schema import build, keys_of, parse_keys, yaml_key
from .values import ABSENT, Network, duration, parse_size

_USER = re.compile(r"[A-Za-z0-9._@-]{1,128}")
_OFF = ("off", "none", "unlimited")


def _is_off(value: Any) -> bool:
    # YAML 1.1 reads a bare `off` as false.
    return value is None or value is False or (
        isinstance(value, str) and value.strip().lower() in _OFF)


def rate(value: Any, at: Place) -> float | None:
    """A positive number per the key's unit, or null/off for no limit."""
    if _is_off(value):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise at.error(f"{value!r} is not a rate: want a positive number, or off")
    return float(value)


def count(value: Any, at: Place) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise at.error(f"{value!r} is not a count: want a whole number of at least 1")
    return value


def optional_count(value: Any, at: Place) -> int | None:
    return None if _is_off(value) else count(value, at)


def auto_count(value: Any, at: Place) -> int | None:
    """A count, or `auto` (null) for one derived at start (max_connections)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    return count(value, at)


def bandwidth(value: Any, at: Place) -> int | None:
    """Bytes a second: `10MB`, `10MB/s`, `512KiB/s` or a number; null/off for no limit."""
    if _is_off(value):
        return None
    text = value.strip()[:-2] if isinstance(value, str) and \
        value.strip().lower().endswith("/s") else value
    try:
        parsed = parse_size(text)
    except ValueError:
        raise at.error(f"{value!r} is not a bandwidth: want e.g. 10MB/s, 512KiB/s, or "
                       "off") from None
    if parsed < 1024:
        raise at.error(f"{value!r} is too little to pace a transfer by: want 1KiB/s or more")
    return parsed


def size_bytes(value: Any, at: Place) -> int:
    try:
        parsed = parse_size(value)
    except ValueError as exc:
        raise at.error(str(exc)) from None
    if parsed < 1:
        raise at.error("want a size of at least one byte")
    return parsed


@dataclass(frozen=True)
class Exempt:
    """Who no per-client limit applies to: addresses (networks) and logged-in users."""

    # Loopback by default: the operator's own machine (health checks, the bench, a proxy in
    # front not yet in trusted_proxies, which would otherwise pool every client in one bucket).
    networks: tuple[Network, ...] = LOOPBACK
    users: frozenset[str] = frozenset()


def exempt(value: Any, at: Place) -> Exempt:
    """`[10.0.0.0/8, 192.0.2.7, alice]`: an item that is an address or network is one,
    anything else is a user name (as the access section's users log in)."""
    if value is None:
        return Exempt((), frozenset())
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise at.error("want a list of networks and user names, e.g. [10.0.0.0/8, ci-bot]")
    networks: list[Network] = []
    users: set[str] = set()
    for i, item in enumerate(items):
        text = str(item).strip()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        if "/" in text or not _USER.fullmatch(text):
            raise at.child(f"[{i}]").error(f"{text!r} is neither a network like 10.0.0.0/8 "
                                           "nor a user name")
        users.add(text)
    return Exempt(tuple(networks), frozenset(users))


@dataclass(frozen=True)
class ServerLimits:
    """`limits.server:` the listener's own defences, read once at start."""

    # A connection that has not sent a whole request head this long after it opened or
    # after its last answer is closed: idle keep-alives and slowloris alike.
    idle_timeout: float = field(default=30.0, metadata=yaml_key(duration))
    # All client connections at once; auto: from the process's descriptor limit.
    max_connections: int | None = field(default=None, metadata=yaml_key(auto_count))
    max_headers: int = field(default=64, metadata=yaml_key(count))
    max_header_size: int = field(default=16 << 10, metadata=yaml_key(size_bytes))
    # Long enough that a 10 KB repository name reaches the handler and gets an OCI 400.
    max_request_line: int = field(default=64 << 10, metadata=yaml_key(size_bytes))


def server_limits(value: Any, at: Place) -> ServerLimits:
    if value is None or value is ABSENT:
        return ServerLimits()
    if not isinstance(value, dict):
        raise at.error(f"want a mapping of {', '.join(sorted(keys_of(ServerLimits)))}")
    return build(ServerLimits, parse_keys(at, value, keys_of(ServerLimits)))


@dataclass(frozen=True)
class Limits:
    """`limits:` per client address (after trusted_proxies), unless exempt."""

    requests_per_second: float | None = field(default=100.0, metadata=yaml_key(rate))
    requests_burst: int = field(default=500, metadata=yaml_key(count))
    bytes_per_second: int | None = field(default=None, metadata=yaml_key(bandwidth))
    bytes_burst: int = field(default=16 << 20, metadata=yaml_key(size_bytes))
    # Requests the cache cannot answer (each costs an upstream request, and quota).
    misses_per_minute: float | None = field(default=120.0, metadata=yaml_key(rate))
    misses_burst: int = field(default=300, metadata=yaml_key(count))
    connections_per_ip: int | None = field(default=128, metadata=yaml_key(optional_count))
    exempt: Exempt = field(default_factory=Exempt, metadata=yaml_key(exempt))
    server: ServerLimits = field(default_factory=ServerLimits,
                                 metadata=yaml_key(server_limits))


@dataclass(frozen=True)
class RouteLimits:
    """A route's `limits:`: what all its clients together may take from its upstream."""

    upstream_bytes_per_second: int | None = field(default=None, metadata=yaml_key(bandwidth))
    # This route's own miss budget per client (e.g. tighter for Docker Hub's quota).
    misses_per_minute: float | None = field(default=None, metadata=yaml_key(rate))
    misses_burst: int | None = field(default=None, metadata=yaml_key(optional_count))


def route_limits(value: Any, at: Place) -> RouteLimits:
    if value is None:
        return RouteLimits()
    if not isinstance(value, dict):
        raise at.error(f"want a mapping of {', '.join(sorted(keys_of(RouteLimits)))}")
    return build(RouteLimits, parse_keys(at, value, keys_of(RouteLimits)))
