"""`client --routes routes.yaml`: the route names, labels, hosts, base domains and default
route read from a route table, as the gateway would list them. Reads nothing else of the
file (no upstreams, no secrets); the gateway's own `check` validates the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..presets import PRESETS
from ..wire import GatewayListing, RouteListing
from .target import DOCKER_HUB, ClientConfError


def read_routes_file(path: str | Path) -> GatewayListing:
    """The listing a gateway serving this routes.yaml publishes at /_gateway/routes."""
    source = str(Path(path))
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ClientConfError(f"{source}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ClientConfError(f"{where}: not valid YAML: "
                              f"{getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise ClientConfError(f"{source}: the top level must be a mapping with routes:")
    raw_routes = data.get("routes")
    if not isinstance(raw_routes, dict) or not raw_routes:
        raise ClientConfError(f"{source}: routes: want a mapping of registry names to routes, "
                              "e.g. docker.io: {}")
    routes = tuple(_route(source, str(name), spec) for name, spec in raw_routes.items())
    default = data.get("default_route", DOCKER_HUB if DOCKER_HUB in raw_routes else None)
    if default is not None and (not isinstance(default, str) or
                                default not in {r.name for r in routes}):
        raise ClientConfError(f"{source}: default_route: {default!r} is not one of the routes")
    return GatewayListing(routes, _names(source, "base_domains", data.get("base_domains")),
                          default)


def _route(source: str, name: str, spec: Any) -> RouteListing:
    key = f"routes.{name}"
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise ClientConfError(f"{source}: {key}: a route is a mapping "
                              "(use {} to take a preset as it is)")
    preset = PRESETS.get(name)
    # As the gateway's config does: `label` absent takes the preset's, `label: null` none.
    label = spec.get("label", preset.label if preset else None)
    return RouteListing(name, str(label) if label is not None else None,
                        _names(source, f"{key}.hosts", spec.get("hosts")))


def _names(source: str, key: str, raw: Any) -> tuple[str, ...]:
    """A host name or a list of them, normalised as the gateway's config does."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise ClientConfError(f"{source}: {key}: want a list of host names")
    return tuple(str(v).lower().strip(".") for v in raw)
