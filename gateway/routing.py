"""Which route serves a request: Host, then path prefix, then `ns=`, then the default.

Also the Docker Hub `library/` rule. Pure lookups over the frozen config; no I/O.
A registry that no route names is refused: the gateway is never an open proxy.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from .config import Config, Route
from .errors import RegistryError
from .reference import validate_name

Via = Literal["host", "path", "ns", "default", "proxy"]


def _host_of(netloc: str) -> str:
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def registry_hosts(route: Route) -> tuple[str, ...]:
    """The names clients reach `route`'s registry itself by (forward-proxy mode): its name,
    its aliases (Docker Hub's registry-1.docker.io) and its upstream's host when that is a
    DNS name. Not `hosts`, which are the gateway's own names."""
    names = [_host_of(route.name), *(_host_of(a) for a in route.aliases)]
    upstream = (route.upstream.url.host or "").lower()
    if upstream and upstream != "localhost" and not _is_address(upstream.strip("[]")):
        names.append(upstream)
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class Resolved:
    route: Route
    repository: str  # the repository as the upstream knows it
    via: Via


class Router:
    def __init__(self, config: Config) -> None:
        self._by_name: dict[str, Route] = {}
        self._by_host: dict[str, Route] = {}
        self._labels: dict[str, Route] = {}
        for route in config.routes:
            for name in (route.name, *route.aliases):
                self._by_name[name] = route
            for host in route.hosts:
                self._by_host[host] = route
            if route.label:
                self._labels[route.label] = route
        self._registries: dict[str, Route] = {}
        for route in config.routes:
            for host in registry_hosts(route):
                self._registries.setdefault(host, route)
        self._base_domains = tuple("." + d for d in config.base_domains)
        self._default = config.route(config.default_route) if config.default_route else None

    def by_name(self, registry: str) -> Route | None:
        return self._by_name.get(registry.lower())

    def by_host(self, host: str | None) -> Route | None:
        """The route a Host header picks: an exact host, or <label>.<base domain>."""
        if not host:
            return None
        host = host.lower().rstrip(".")
        if host.startswith("["):  # IPv6 literal, possibly with a port
            host = host.split("]", 1)[0] + "]"
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        route = self._by_host.get(host)
        if route is not None:
            return route
        for suffix in self._base_domains:
            if host.endswith(suffix):
                label = host[: -len(suffix)]
                if "." not in label:
                    return self._labels.get(label)
        return None

    def by_registry_host(self, host: str) -> Route | None:
        """The route of a registry host a client reached through the forward proxy."""
        return self._registries.get(host.lower().rstrip("."))

    def resolve_proxied(self, registry_host: str, name: str) -> Resolved:
        """A request inside a CONNECT to `registry_host`: the path is the registry's own
        (no /v2/<registry>/ prefix, no ns=); only the host picks the route."""
        route = self.by_registry_host(registry_host)
        if route is None:  # the allow-list changed under a kept-alive connection
            raise RegistryError("NAME_UNKNOWN", f"registry {registry_host[:255]!r} is not "
                                "configured on this gateway")
        validate_name(name)
        if route.library_prefix and "/" not in name:
            name = "library/" + name
        return Resolved(route, name, "proxy")

    def resolve(self, host: str | None, name: str, ns: str | None) -> Resolved:
        """Map (Host, repository path, ns=) to a route and the upstream repository."""
        route = self.by_host(host)
        via: Via = "host"
        if route is None:
            first, sep, rest = name.partition("/")
            if sep and ("." in first or ":" in first or first == "localhost"):
                # /v2/<registry>/<repository>/...: a Docker Hub namespace never has a dot,
                # so a first component that looks like a host names a registry.
                route = self.by_name(first)
                if route is None:
                    raise RegistryError("NAME_UNKNOWN", f"registry {first[:255]!r} is not "
                                        "configured on this gateway")
                name, via = rest, "path"
            elif ns:
                # containerd mirrors send ?ns=<registry> (hosts.toml docs, "ns" parameter).
                route = self.by_name(ns)
                if route is None:
                    raise RegistryError("NAME_UNKNOWN",
                                        f"registry {ns[:255]!r} is not configured on this gateway")
                via = "ns"
            elif self._default is not None:
                route, via = self._default, "default"
            else:
                raise RegistryError("NAME_UNKNOWN", "no route serves this host; use a configured "
                                    "registry host, a /v2/<registry>/ prefix or ?ns=<registry>")
        validate_name(name)
        if route.library_prefix and "/" not in name:
            name = "library/" + name
        return Resolved(route, name, via)
