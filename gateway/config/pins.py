"""`pins:` in routes.yaml: images the size cap never evicts, and (when a pin names one
tag or digest) the gateway keeps cached and fresh by itself.

    pins:
      - registry.k8s.io/pause:*          # every tag of a repository
      - ghcr.io/myorg/*                  # every repository under a path, any tag or digest
      - image: docker.io/library/nginx:1.27
        platforms: [linux/amd64]         # only these platforms of a multi-arch image
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .document import Place
from .model import Pin, Route
from .values import ABSENT

_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")


def _route_for(registry: str, routes: tuple[Route, ...]) -> Route | None:
    for route in routes:
        if registry == route.name or registry in route.aliases:
            return route
    return None


def parse_pin(text: str, at: Place, routes: tuple[Route, ...],
              platforms: tuple[str, ...] = ()) -> Pin:
    first, sep, rest = text.partition("/")
    registry, remainder = (first, rest) if sep and (
        "." in first or ":" in first or first == "localhost") else ("docker.io", text)
    route = _route_for(registry, routes)
    if route is None:
        raise at.error(f"{text!r}: no route serves {registry}; pins name images of the "
                       f"routes ({', '.join(r.name for r in routes)})")
    repository, tag, digest = remainder, None, None
    if "@" in remainder:
        repository, _, digest = remainder.partition("@")
    elif ":" in remainder.rsplit("/", 1)[-1]:
        repository, _, tag = remainder.rpartition(":")
    if not repository or (tag is not None and not tag) or (digest is not None and not digest):
        raise at.error(f"{text!r} is not an image reference like ghcr.io/org/app:tag or a "
                       "glob like registry.k8s.io/pause:*")
    if route.library_prefix and "/" not in repository:
        repository = "library/" + repository
    return Pin(text, route.name, repository, tag, digest, platforms)


def pins(raw: Any, at: Place, earlier: Mapping[str, Any]) -> tuple[Pin, ...]:
    """The `pins:` section: a list of references, or of {image, platforms} mappings."""
    if raw is None or raw is ABSENT:
        return ()
    if not isinstance(raw, list):
        raise at.error("want a list of images, e.g. [registry.k8s.io/pause:*]")
    found = []
    for i, item in enumerate(raw):
        place = at.child(f"[{i}]")
        if isinstance(item, str):
            found.append(parse_pin(item, place, earlier["routes"]))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or \
                set(item) - {"image", "platforms"}:
            raise place.error("a pin is an image reference, or a mapping with image: and "
                              "platforms:")
        wanted = item.get("platforms") or []
        if isinstance(wanted, str):
            wanted = [wanted]
        if not isinstance(wanted, list) or not all(
                isinstance(p, str) and _PLATFORM.fullmatch(p) for p in wanted):
            raise place.error("platforms: want a list like [linux/amd64, linux/arm64/v8]")
        found.append(parse_pin(item["image"], place, earlier["routes"], tuple(wanted)))
    return tuple(found)
