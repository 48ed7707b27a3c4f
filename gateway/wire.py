"""The `/_gateway/routes` listing: the one wire format between a gateway and the client tools.

Frozen values with `to_json` and a validating `from_json`; the JSON shape is fixed so
running gateways and clients of other versions keep working. No I/O, no server imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ROUTES_PATH = "/_gateway/routes"
GATEWAY = "registry-gateway"  # the listing's "gateway" value: who answered


@dataclass(frozen=True)
class RouteListing:
    """One route as clients see it: never its upstream URL or credentials."""

    name: str  # the registry clients name: docker.io, ghcr.io
    label: str | None = None  # <label>.<base domain> picks this route
    hosts: tuple[str, ...] = ()  # exact host names that pick this route
    aliases: tuple[str, ...] = ()  # other registry names clients may use for it

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "hosts": list(self.hosts),
                "aliases": list(self.aliases)}


@dataclass(frozen=True)
class GatewayListing:
    routes: tuple[RouteListing, ...]
    base_domains: tuple[str, ...] = ()
    default_route: str | None = None
    version: str = ""
    gateway: str = GATEWAY

    def route(self, name: str) -> RouteListing | None:
        return next((r for r in self.routes if r.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {"gateway": self.gateway, "version": self.version,
                "base_domains": list(self.base_domains), "default_route": self.default_route,
                "routes": [route.to_json() for route in self.routes]}

    @classmethod
    def from_json(cls, data: Any) -> GatewayListing:
        """Validate a decoded listing; ValueError names the offending key. Keys this version
        does not know are ignored, so a newer gateway can add some."""
        document = _mapping(data, "the listing")
        gateway = _optional_str(document, "gateway", "gateway") or GATEWAY
        if gateway != GATEWAY:
            raise ValueError(f"gateway: {gateway!r} is not {GATEWAY!r}")
        if "routes" not in document:
            raise ValueError("routes: missing (a registry-gateway always lists its routes)")
        raw_routes = document["routes"]
        if not isinstance(raw_routes, list):
            raise ValueError(f"routes: want a list of routes, got {_kind(raw_routes)}")
        routes = tuple(_route(item, f"routes[{i}]") for i, item in enumerate(raw_routes))
        names = [route.name for route in routes]
        if len(set(names)) != len(names):
            raise ValueError("routes: a route name is listed twice")
        default = _optional_str(document, "default_route", "default_route") or None
        if default is not None and default not in names:
            raise ValueError(f"default_route: {default!r} is not one of the routes")
        return cls(routes=routes,
                   base_domains=_hosts(document, "base_domains", "base_domains"),
                   default_route=default,
                   version=_optional_str(document, "version", "version") or "",
                   gateway=gateway)


# Host and registry names compare case-insensitively; normalising here keeps an older or
# hand-written listing from defeating the client's exact comparisons.


def _route(item: Any, where: str) -> RouteListing:
    spec = _mapping(item, where)
    name = _optional_str(spec, "name", f"{where}.name")
    if not name:
        raise ValueError(f"{where}.name: missing; every route has a registry name")
    return RouteListing(name=name.lower(),
                        label=_optional_str(spec, "label", f"{where}.label") or None,
                        hosts=_hosts(spec, "hosts", f"{where}.hosts"),
                        aliases=_hosts(spec, "aliases", f"{where}.aliases"))


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: want a JSON object, got {_kind(value)}")
    return value


def _optional_str(document: Mapping[str, Any], key: str, where: str) -> str | None:
    value = document.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: want a string or null, got {_kind(value)}")
    return value


def _hosts(document: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = document.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: want a list of host names, got {_kind(value)}")
    return tuple(v.lower() for v in value)


def _kind(value: Any) -> str:
    """A short description of a JSON value for an error message (never the whole value)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    shown = repr(value) if isinstance(value, str | int | float | bool) else ""
    kind = names.get(type(value), type(value).__name__)
    return f"{kind} {shown[:40]}".rstrip() if shown else kind
