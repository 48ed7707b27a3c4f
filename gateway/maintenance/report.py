"""How the `cache` commands write what they found: sizes in human units, ages, aligned
columns, image names as clients write them. Pure formatting: no I/O but the stream given.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from ..cache.contents import Entry
from ..config import Config

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human(size: float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB."""
    value, unit = float(size), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    if unit == 0:
        return f"{int(value)} B"
    return f"{value:.1f} {_UNITS[unit]}" if abs(value) < 100 else f"{value:.0f} {_UNITS[unit]}"


def age(when: float, now: float) -> str:
    """How long ago, in the largest unit that fits: '42s', '5m', '3h', '12d ago'."""
    if when <= 0:
        return "never"
    seconds = max(0.0, now - when)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit} ago"
    return f"{int(seconds)}s ago"


def timestamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)) if when > 0 else ""


def duration_text(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length and seconds % length == 0:
            return f"{int(seconds // length)}{unit}"
    return f"{seconds:g}s"


def table(out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[str]],
          right: Sequence[int] = ()) -> None:
    """Columns padded to their widest cell; the last one is never padded (long names)."""
    widths = [max([len(headers[i]), *(len(r[i]) for r in rows)]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        padded[-1] = cells[-1]
        return "  ".join(padded).rstrip()

    out.write(line(headers) + "\n")
    for row in rows:
        out.write(line(row) + "\n")


def write_json(out: TextIO, document: Any) -> None:
    out.write(json.dumps(document, indent=2, sort_keys=False) + "\n")


class Names:
    """Route names of namespaces, and image names as a client writes them."""

    def __init__(self, config: Config) -> None:
        self._routes = {route.namespace: route.name for route in config.routes}

    def route(self, namespace: str) -> str:
        return self._routes.get(namespace, namespace)

    def known(self, namespace: str) -> bool:
        return namespace in self._routes

    def references(self, entry: Entry, repositories: Sequence[str],
                   tags: Sequence[tuple[str, str]]) -> list[str]:
        """`route/repository:tag@digest` for each tag, else `route/repository@digest`;
        a blob no manifest references is `route@digest (blob)`."""
        route = self.route(entry.namespace)
        if entry.kind == "blob":
            return [f"{route}@{entry.digest} (blob)"]
        by_repository: Mapping[str, list[str]] = {
            r: [t for repo, t in tags if repo == r] for r in
            dict.fromkeys([*(r for r, _ in tags), *repositories])}
        names = [f"{route}/{repository}:{','.join(found)}@{entry.digest}" if found
                 else f"{route}/{repository}@{entry.digest}"
                 for repository, found in by_repository.items()]
        return names or [f"{route}/<repository unknown>@{entry.digest}"]

    def reference(self, entry: Entry, repositories: Sequence[str],
                  tags: Sequence[tuple[str, str]]) -> str:
        names = self.references(entry, repositories, tags)
        return names[0] + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")
