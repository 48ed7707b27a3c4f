"""routes.yaml text into a `Config`: parse every section first, resolve secrets second.

Top-level keys dispatch through one table, `SECTIONS` (section name -> parser and the
`Config` field it fills). Adding a section is one entry there plus its `Config` field:

    @dataclass(frozen=True)
    class CacheSettings:
        max_size: int | None = field(default=None, metadata=yaml_key(size))

    # Config:    cache: CacheSettings = field(default_factory=CacheSettings)
    # SECTIONS:  "cache": settings_section(CacheSettings, "cache"),

Every mistake becomes a `ConfigError` naming the file, the line and the key. Only
`resolve_secrets` (secrets.py) reads the environment or secret files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..presets import PRESETS
from .access import access_section
from .document import Document, Place
from .forward_proxy import ForwardProxySettings
from .limits import Limits
from .model import CacheLimits, CachePolicy, Config, Route, UpstreamSettings
from .pins import pins
from .redis import redis_section
from .resilience import layered
from .schema import Key, build, check_keys, keys_of, parse_keys
from .secrets import resolve_secrets
from .storage import storage_section
from .values import ABSENT, domains, networks

# (raw value or ABSENT, its place, the sections parsed before it) -> the section's value
SectionParser = Callable[[Any, Place, Mapping[str, Any]], Any]

_REGISTRY_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::\d{1,5})?")
# A route is written flat; its keys set fields of the route, its upstream and its cache policy.
_ROUTE_KEYS: Mapping[str, Key] = keys_of(Route, UpstreamSettings, CachePolicy)
_DEFAULT_KEYS: Mapping[str, Key] = {name: key for name, key in _ROUTE_KEYS.items() if key.inherit}


@dataclass(frozen=True)
class Section:
    """One top-level key of routes.yaml."""

    parse: SectionParser
    field: str | None  # the Config field it fills; None: only later sections read it


def settings_section(cls: type[Any], field: str) -> Section:
    """A section that is a mapping of `cls`'s `yaml_key` fields (null or absent: defaults)."""

    def parse(raw: Any, at: Place, _earlier: Mapping[str, Any]) -> Any:
        return build(cls, _mapping(raw, at, keys_of(cls)))

    return Section(parse, field)


def _mapping(raw: Any, at: Place, table: Mapping[str, Any]) -> dict[str, Any]:
    if raw is None or raw is ABSENT:
        return {}
    if not isinstance(raw, dict):
        raise at.error(f"want a mapping of {', '.join(sorted(table))}")
    return parse_keys(at, raw, table)


def _defaults(raw: Any, at: Place, _earlier: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults:`: the inheritable route keys, parsed once, for every route."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise at.error("want a mapping")
    return parse_keys(at, raw, _DEFAULT_KEYS)


def _routes(raw: Any, at: Place, earlier: Mapping[str, Any]) -> tuple[Route, ...]:
    if not isinstance(raw, dict) or not raw:
        raise at.error("want a mapping of registry names to routes, e.g. docker.io: {}")
    routes = tuple(_route(str(name), spec, at.child(str(name)), earlier["defaults"])
                   for name, spec in raw.items())
    # Names, aliases, labels and hosts must each pick exactly one route.
    seen: dict[tuple[str, str], str] = {}
    for route in routes:
        for kind, values in (("name", (route.name, *route.aliases)),
                             ("label", (route.label,) if route.label else ()),
                             ("host", route.hosts)):
            for value in values:
                owner = seen.setdefault((kind, value), route.name)
                if owner != route.name:
                    raise at.child(route.name).error(
                        f"{kind} {value!r} is already used by route {owner}")
    return routes


def _route(name: str, spec: Any, at: Place, defaults: Mapping[str, Any]) -> Route:
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise at.error("a route is a mapping (use {} to take a preset as it is)")
    check_keys(at, spec, _ROUTE_KEYS)
    if not _REGISTRY_RE.fullmatch(name):
        raise at.error(f"{name!r} is not a registry host name (like ghcr.io)")
    preset = PRESETS.get(name)
    # A preset is a route written for the user: its values go through the same parsers.
    written: dict[str, Any] = {} if preset is None else {
        "upstream": preset.upstream, "label": preset.label, "aliases": preset.aliases,
        "library_prefix": preset.library_prefix}
    if spec.get("upstream", written.get("upstream")) is None:
        raise at.error(f"{name} is not a preset ({', '.join(PRESETS)}): "
                       "give its upstream: https://...")
    # The route's own keys win over defaults:, which win over its preset.
    values = {**parse_keys(at, written, _ROUTE_KEYS), **defaults}
    # A mapping-valued key (timeouts:, retries:, breaker:) takes the sub-keys it names.
    values.update({name: layered(value, values.get(name))
                   for name, value in parse_keys(at, spec, _ROUTE_KEYS).items()})
    return build(Route, values, name=name, namespace=re.sub(r"[^a-z0-9.-]", "_", name),
                 upstream=build(UpstreamSettings, values), cache=build(CachePolicy, values))


def _default_route(raw: Any, at: Place, earlier: Mapping[str, Any]) -> str | None:
    names = {route.name for route in earlier["routes"]}
    if raw is ABSENT:  # docker.io present: registry-mirrors mode sends plain /v2/library/...
        return "docker.io" if "docker.io" in names else None
    if raw is not None and not isinstance(raw, str):
        raise at.error("want the name of one route, e.g. docker.io, or null")
    if raw is not None and raw not in names:
        raise at.error(f"{raw!r} is not one of the routes: {', '.join(sorted(names))}")
    return raw


# In order: a section may read the ones above it.
SECTIONS: Mapping[str, Section] = {
    "base_domains": Section(lambda raw, at, _: domains(raw, at), "base_domains"),
    "trusted_proxies": Section(lambda raw, at, _: networks(raw, at), "trusted_proxies"),
    "defaults": Section(_defaults, None),
    "routes": Section(_routes, "routes"),
    "default_route": Section(_default_route, "default_route"),
    "cache": settings_section(CacheLimits, "cache"),
    "pins": Section(pins, "pins"),
    "access": Section(access_section, "access"),
    "limits": settings_section(Limits, "limits"),
    "storage": Section(storage_section, "storage"),
    "forward_proxy": settings_section(ForwardProxySettings, "forward_proxy"),
    "redis": Section(redis_section, "redis"),
}


def parse_config(text: str, source: str = "<config>") -> Config:
    """routes.yaml text, validated, secrets not resolved: each route's upstream has its
    `credentials_ref` and no `credentials`. Reads no environment and no secret file."""
    document = Document.parse(text, source)
    if not isinstance(document.data, dict):
        raise ConfigError("the top level must be a mapping with routes:", file=source, line=1)
    top = document.at("")
    check_keys(top, document.data, SECTIONS)
    parsed: dict[str, Any] = {}
    for name, section in SECTIONS.items():
        parsed[name] = section.parse(document.data.get(name, ABSENT), top.child(name), parsed)
    fields = {section.field: parsed[name] for name, section in SECTIONS.items() if section.field}
    return Config(source=source, **fields)


def load_config(text: str, source: str = "<config>",
                env: Mapping[str, str] | None = None) -> Config:
    """Parse routes.yaml text, then resolve its secrets; `env` defaults to os.environ."""
    return resolve_secrets(parse_config(text, source), env)


def parse_config_file(path: str | os.PathLike[str]) -> Config:
    """`parse_config` of a file: for machines that must not need the gateway's secrets."""
    file = Path(path)
    return parse_config(_read(file), str(file))


def load_config_file(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    return resolve_secrets(parse_config_file(path), env)


def _read(file: Path) -> str:
    try:
        return file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(file)) from None
