"""The key tables: which routes.yaml key sets which dataclass field, read from field metadata.

`yaml_key(parser)` marks a field as written in routes.yaml; `keys_of`, `parse_keys` and `build`
are all the table machinery there is, so a new field or section needs no hand-written key set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .document import Place
from .values import ABSENT

T = TypeVar("T")
# (raw YAML value, its place) -> the field's value, or ABSENT for "as if not written"
Parser = Callable[[Any, Place], Any]

_METADATA = "routes.yaml"


@dataclass(frozen=True)
class Key:
    """One routes.yaml key: the dataclass field it sets and how its value is parsed."""

    name: str  # as written in routes.yaml
    owner: type[Any]
    field: str
    parse: Parser
    inherit: bool  # may be given once under `defaults:` for every route


@dataclass(frozen=True)
class _Marker:
    parse: Parser
    name: str | None
    inherit: bool


def yaml_key(parse: Parser, *, name: str | None = None, inherit: bool = False) -> dict[str, Any]:
    """Field metadata: the field is the key `name` (default: the field's own name)."""
    return {_METADATA: _Marker(parse, name, inherit)}


def keys_of(*classes: type[Any]) -> dict[str, Key]:
    """The routes.yaml keys of the fields of `classes` (one flat mapping, as a route is written)."""
    keys: dict[str, Key] = {}
    for cls in classes:
        for field in dataclasses.fields(cls):
            marker = field.metadata.get(_METADATA)
            if marker is None:
                continue
            key = Key(marker.name or field.name, cls, field.name, marker.parse, marker.inherit)
            if key.name in keys:
                raise TypeError(f"{cls.__name__}.{field.name}: key {key.name!r} is taken")
            keys[key.name] = key
    return keys


def check_keys(at: Place, raw: Mapping[str, Any], allowed: Iterable[str]) -> None:
    valid = sorted(allowed)
    for key in raw:
        if key not in valid:
            raise at.child(key).error(f"unknown key {key!r}; valid keys: {', '.join(valid)}")


def parse_keys(at: Place, raw: Mapping[str, Any], table: Mapping[str, Key]) -> dict[str, Any]:
    """Each key of `raw` parsed by its table entry; a key parsed to ABSENT is left out."""
    check_keys(at, raw, table)
    parsed: dict[str, Any] = {}
    for name, value in raw.items():
        result = table[name].parse(value, at.child(name))
        if result is not ABSENT:
            parsed[name] = result
    return parsed


def build(cls: type[T], values: Mapping[str, Any], **given: Any) -> T:
    """A `cls` from parsed key values (keys not in `values` take the field defaults)."""
    fields = {key.field: values[name] for name, key in keys_of(cls).items() if name in values}
    return cls(**fields, **given)
