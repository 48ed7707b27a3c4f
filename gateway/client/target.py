"""The gateway as the user names it (`Target`), the routes it serves (`GatewayInfo`), and
where clients reach each route (`Endpoint`). Pure: no I/O, nothing written."""

from __future__ import annotations

import re
from dataclasses import dataclass

from yarl import URL

from ..presets import PRESETS
from ..wire import GatewayListing, RouteListing

DOCKER_HUB = "docker.io"
_HOST_RE = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                      r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


class ClientConfError(Exception):
    """A problem the user must fix; the message says how. Nothing was written."""


@dataclass(frozen=True)
class GatewayInfo:
    """The gateway's route listing and where it came from (for messages)."""

    listing: GatewayListing
    source: str = "presets"

    @property
    def routes(self) -> tuple[RouteListing, ...]:
        return self.listing.routes

    @property
    def base_domains(self) -> tuple[str, ...]:
        return self.listing.base_domains

    @property
    def default_route(self) -> str | None:
        return self.listing.default_route

    def route(self, name: str) -> RouteListing | None:
        return self.listing.route(name)

    @classmethod
    def presets(cls, base_domain: str | None) -> GatewayInfo:
        """Every preset under its standard label, as the example routes.yaml serves them."""
        routes = tuple(RouteListing(name, preset.label) for name, preset in PRESETS.items())
        return cls(GatewayListing(routes, (base_domain,) if base_domain else (), DOCKER_HUB),
                   "the preset routes (--presets)")


@dataclass(frozen=True)
class Endpoint:
    """Where clients reach one route: a host of its own, or a shared host plus the
    registry name as a path prefix (/v2/ghcr.io/...) or containerd's ns= parameter."""

    route: str
    scheme: str
    host: str
    netloc: str  # host[:port]
    prefix: str = ""  # "" or the registry name

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @property
    def location(self) -> str:
        """host[:port][/prefix]: what an image reference starts with."""
        return f"{self.netloc}/{self.prefix}" if self.prefix else self.netloc


@dataclass(frozen=True)
class Target:
    """The gateway as the user named it: a base domain (`example.com[:port]`, one host per
    route: hub.example.com, ghcr.example.com) or a URL (`https://mirror.example.com`, one
    host for everything)."""

    scheme: str
    host: str
    port: int | None
    base_domain: bool

    def netloc(self, host: str) -> str:
        default = 443 if self.scheme == "https" else 80
        return host if self.port in (None, default) else f"{host}:{self.port}"

    def url(self, host: str | None = None) -> str:
        return f"{self.scheme}://{self.netloc(host or self.host)}"

    def endpoint(self, route: RouteListing, info: GatewayInfo) -> Endpoint:
        host, prefix = self.host, route.name
        if self.base_domain:
            if route.label and self.host in info.base_domains:
                host, prefix = f"{route.label}.{self.host}", ""
            elif route.hosts:
                host, prefix = route.hosts[0], ""
        return Endpoint(route.name, self.scheme, host, self.netloc(host), prefix)

    def endpoints(self, info: GatewayInfo) -> list[Endpoint]:
        return [self.endpoint(route, info) for route in info.routes]


def parse_target(text: str) -> Target:
    """`example.com`, `example.com:8443` (base domain) or `https://mirror.example.com`."""
    text = text.strip()
    if "://" in text:
        try:
            url = URL(text)
        except ValueError:
            url = URL()
        if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/") \
                or url.query_string or url.fragment or url.user:
            raise ClientConfError(f"{text!r} is not a gateway URL like https://mirror.example.com "
                                  "(no path), nor a base domain like example.com")
        return Target(url.scheme, url.host.lower().rstrip("."), url.explicit_port, False)
    host, port = text.lower(), None
    if ":" in host:
        host, _, port_text = host.rpartition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ClientConfError(f"{text!r}: the port must be a number")
        port = int(port_text)
    host = host.rstrip(".")
    if not _HOST_RE.fullmatch(host) or "." not in host:
        raise ClientConfError(f"{text!r} is not a base domain like example.com (the gateway "
                              "answers on hub.example.com, ghcr.example.com, ...) nor a URL "
                              "like https://mirror.example.com")
    return Target("https", host, port, True)


def check_target(target: Target, info: GatewayInfo) -> None:
    """Refuse targets that would route wrongly, saying what to give instead."""
    if target.base_domain:
        labelled = [r for r in info.routes if r.label]
        if labelled and info.base_domains and target.host not in info.base_domains:
            raise ClientConfError(
                f"{info.source} serves labels under {', '.join(info.base_domains)}, not under "
                f"{target.host}: give one of those base domains, or add {target.host} to "
                "base_domains in the gateway's routes.yaml")
        return
    owner = route_for_host(target.host, info)
    if owner is not None:
        raise ClientConfError(
            f"{target.host} is a host of the {owner} route, so every request to it goes to "
            f"{owner}. Give the base domain instead ({_suggest_domain(target.host, info)}), or "
            "a URL whose host no route claims (e.g. https://mirror.<your domain>)")


def route_for_host(host: str, info: GatewayInfo) -> str | None:
    """The route whose exact host or <label>.<base domain> `host` is, if any."""
    for route in info.routes:
        if host in route.hosts:
            return route.name
        for domain in info.base_domains:
            if route.label and host == f"{route.label}.{domain}":
                return route.name
    return None


def _suggest_domain(host: str, info: GatewayInfo) -> str:
    for domain in info.base_domains:
        if host.endswith("." + domain):
            return domain
    return host.partition(".")[2] or host


def docker_hub_mirror(target: Target, info: GatewayInfo) -> Endpoint | None:
    """The URL for daemon.json registry-mirrors: Docker sends plain /v2/library/... there,
    so it needs a host that picks the docker.io route (or falls to it by default)."""
    hub = info.route(DOCKER_HUB)
    if hub is None:
        return None
    endpoint = target.endpoint(hub, info)
    if not endpoint.prefix:
        return endpoint
    if info.default_route == DOCKER_HUB:
        return Endpoint(DOCKER_HUB, endpoint.scheme, endpoint.host, endpoint.netloc)
    return None


def probe_hosts(target: Target) -> list[str]:
    """Where to ask: for a base domain, the Docker Hub host first (its conventional label)."""
    if target.base_domain:
        return [f"{PRESETS[DOCKER_HUB].label}.{target.host}", target.host]
    return [target.host]


def probe_urls(target: Target) -> list[str]:
    return [target.url(host) for host in probe_hosts(target)]
