"""`forward_proxy:` in routes.yaml: the forward-proxy mode's destinations beyond the routes
(`hosts`), its CA directory (`ca`), where a destination is really reached (`connect_to`,
for split DNS and tests), and which ports and IP literals a CONNECT may name.

Values only: the CA files are read by gateway/proxy/authority.py when the listener starts,
the allow-list is compiled and applied by gateway/proxy/destinations.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .document import Place
from .schema import yaml_key
from .values import Network, networks

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
# A host name, or a glob whose `*` (any characters, dots too) stays left of a fixed domain
# of two labels or more: `*.pkg.dev`, `prod-registry-k8s-io-*.amazonaws.com`.
_PATTERN_RE = re.compile(rf"(?:[a-z0-9*-]+\.)*{_LABEL}\.{_LABEL}")
_HOSTPORT_RE = re.compile(r"(?P<host>[a-z0-9.-]+|\[[0-9a-f:.]+\]):(?P<port>\d{1,5})")


def host_patterns(value: Any, at: Place) -> tuple[str, ...]:
    """A list of host names or `*.domain` patterns, lower-cased."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise at.error("want a list of host names like [auth.docker.io, '*.pkg.dev']")
    out = []
    for i, item in enumerate(items):
        name = str(item).strip().lower().rstrip(".")
        if not _PATTERN_RE.fullmatch(name):
            raise at.child(f"[{i}]").error(
                f"{str(item)[:100]!r} is not a host name or pattern like *.pkg.dev (a "
                "'*' needs a fixed domain of two labels or more to its right)")
        out.append(name)
    return tuple(out)


def connect_map(value: Any, at: Place) -> tuple[tuple[str, str, int], ...]:
    """`{host: address:port}`: where a CONNECT to `host` really goes."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise at.error("want a mapping like {registry-1.docker.io: 10.0.0.5:443}")
    out = []
    for host, target in value.items():
        name = str(host).strip().lower().rstrip(".")
        place = at.child(str(host))
        if not _HOST_RE.fullmatch(name):
            raise place.error(f"{str(host)[:100]!r} is not a host name")
        match = _HOSTPORT_RE.fullmatch(str(target).strip().lower())
        if match is None or not 0 < int(match.group("port")) < 65536:
            raise place.error(f"{str(target)[:100]!r}: want ADDRESS:PORT, e.g. 10.0.0.5:443")
        out.append((name, match.group("host").strip("[]"), int(match.group("port"))))
    return tuple(out)


def port_list(value: Any, at: Place) -> tuple[int, ...]:
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in items):
        raise at.error("want a non-empty list of port numbers, e.g. [443]")
    return tuple(items)


def ca_directory(value: Any, at: Place) -> str | None:
    """The directory `registry-gateway ca init` wrote (ca.crt, ca.key); checked at start."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise at.error("want the CA directory, e.g. certs/proxy-ca")
    return value.strip()


@dataclass(frozen=True)
class ForwardProxySettings:
    """`forward_proxy:`, used by `serve --proxy-listen`. The routes' registry hosts (and
    their presets' auth and CDN hosts) are always allowed; `hosts` adds more, tunnelled.
    With `ca`, a CONNECT to a route's registry host is answered by the gateway itself."""

    hosts: tuple[str, ...] = field(default=(), metadata=yaml_key(host_patterns))
    ca: str | None = field(default=None, metadata=yaml_key(ca_directory))
    connect_to: tuple[tuple[str, str, int], ...] = field(default=(),
                                                          metadata=yaml_key(connect_map))
    ports: tuple[int, ...] = field(default=(443,), metadata=yaml_key(port_list))
    # IP-literal destinations (CONNECT 10.0.0.5:443) are refused unless in these networks.
    addresses: tuple[Network, ...] = field(default=(), metadata=yaml_key(networks))
