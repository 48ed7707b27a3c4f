"""Where a CONNECT may go: the allow-list of the forward proxy compiled from one `Config`
(the routes' registry hosts, their presets' auth and CDN hosts, `forward_proxy.hosts`),
the ports and IP literals it admits, and the address a destination is really reached at.

Pure: no sockets, no DNS. A destination not named here is refused before any connection
is made, so the proxy is never an open proxy.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

from ..config import PRESETS, Config, Route
from ..net import NetworkSet, parse_address
from ..routing import registry_hosts

Mode = Literal["intercept", "tunnel", "refuse"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one CONNECT. `route`: the route whose registry host it names (an
    intercepted CONNECT is served by it); `reason`: the refusals metric's reason."""

    mode: Mode
    host: str
    port: int
    route: Route | None = None
    reason: str = ""
    message: str = ""


def route_side_hosts(route: Route) -> tuple[str, ...]:
    """The auth, CDN and redirect hosts a route's preset sends clients to."""
    preset = PRESETS.get(route.name)
    return preset.proxy_hosts if preset is not None else ()


def _matcher(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


class Destinations:
    """The forward proxy's rules of one Config (memoised against its identity by the
    caller). `intercepting`: the gateway has a CA, so registry hosts are answered by it."""

    def __init__(self, config: Config, *, intercepting: bool) -> None:
        settings = config.forward_proxy
        self.intercepting = intercepting
        self._registries: dict[str, Route] = {}
        side: list[str] = list(settings.hosts)
        for route in config.routes:
            for host in registry_hosts(route):
                self._registries.setdefault(host, route)
            side += route_side_hosts(route)
        self._side = _matcher(tuple(dict.fromkeys(side)))
        self._ports = frozenset(settings.ports)
        self._addresses = NetworkSet(settings.addresses)
        self._connect_to = {host: (address, port) for host, address, port in settings.connect_to}

    @property
    def registry_names(self) -> tuple[str, ...]:
        """Every registry host a leaf certificate may be minted for."""
        return tuple(self._registries)

    def may_mint(self, host: str) -> bool:
        """A leaf is minted for a route's registry host, never for anything else."""
        return host.lower().rstrip(".") in self._registries

    def decide(self, host: str, port: int) -> Decision:
        host = host.lower().rstrip(".")
        if port not in self._ports:
            return Decision("refuse", host, port, reason="proxy_port",
                            message=f"port {port} is not a registry port of this proxy")
        if parse_address(host) is not None:
            if host in self._addresses:
                return Decision("tunnel", host, port)
            return Decision("refuse", host, port, reason="proxy_address",
                            message="IP-literal destinations are refused; name the registry")
        route = self._registries.get(host)
        if route is not None:
            return Decision("intercept" if self.intercepting else "tunnel", host, port, route)
        if self._side is not None and self._side.fullmatch(host):
            return Decision("tunnel", host, port)
        return Decision("refuse", host, port, reason="proxy_host",
                        message=f"{host[:255]} is not a registry host this gateway serves")

    def address(self, host: str, port: int) -> tuple[str, int]:
        """Where a tunnel to host:port connects: `forward_proxy.connect_to`, else itself."""
        return self._connect_to.get(host.lower().rstrip("."), (host, port))
