"""Route keys for a failing upstream: `fallbacks:` (mirrors of the same registry),
`timeouts:`, `retries:` and `breaker:` (mappings whose keys a route may set one by one
over `defaults:`), `stale_while_revalidate:`. Parsing only: upstream/ and cache/ act on them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar, cast

from yarl import URL

from .document import Place
from .schema import check_keys
from .values import duration, registry_url

T = TypeVar("T")


class Layered:
    """A mapping-valued key: the sub-keys a route writes replace those of `defaults:`,
    the others are inherited (`given` names the ones written)."""

    given: frozenset[str]

    def over(self, base: Self) -> Self:
        mine = {name: getattr(self, name) for name in self.given}
        merged: Self = dataclasses.replace(cast(Any, base), **mine,
                                           given=base.given | self.given)
        return merged


def layered(value: Any, base: Any) -> Any:
    """`value` for a key written in a route, over `base` from defaults/preset (if any)."""
    if isinstance(value, Layered) and isinstance(base, type(value)):
        return value.over(base)
    return value


def _positive_duration(value: Any, at: Place) -> float:
    seconds = duration(value, at)
    if seconds <= 0 or math.isinf(seconds):
        raise at.error("want a duration above zero, like 5s or 500ms")
    return seconds


def window(value: Any, at: Place) -> float:
    """`stale_while_revalidate: 1h` (a duration), or `off` (which YAML reads as false)."""
    return 0.0 if value is False or value is None else duration(value, at)


def _count(value: Any, at: Place) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise at.error("want a whole number, 0 or more")
    return value


def _attempts(value: Any, at: Place) -> int:
    number = _count(value, at)
    if number < 1:
        raise at.error("want 1 or more attempts (1: no retry)")
    return number


def _mapping(cls: Callable[..., T], parsers: Mapping[str, Callable[[Any, Place], Any]],
             off: dict[str, Any] | None = None) -> Callable[[Any, Place], T]:
    """A parser for `key: {sub: value, ...}` (or `off`, if `off` says what that sets)."""

    def parse(raw: Any, at: Place) -> T:
        if off is not None and (raw is False or (isinstance(raw, str)
                                                 and raw.strip().lower() == "off")):
            raw = off
        if not isinstance(raw, dict):
            also = " or off" if off is not None else ""
            raise at.error(f"want a mapping of {', '.join(parsers)}{also}")
        check_keys(at, raw, parsers)
        values = {name: parsers[name](value, at.child(name)) for name, value in raw.items()}
        return cls(**values, given=frozenset(values))

    return parse


@dataclass(frozen=True)
class Timeouts(Layered):
    """`timeouts: {connect, headers, stall}`."""

    connect: float = 5.0  # TCP (and TLS) connect, per attempt
    headers: float = 10.0  # a manifest/tag/token call until its response headers, retries included
    stall: float = 20.0  # the longest pause in a blob body, and a blob's wait for headers
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)


@dataclass(frozen=True)
class Retries(Layered):
    """`retries: {attempts, backoff, max_backoff}` or `retries: off`: idempotent requests
    (GET, HEAD) tried again after a connect error, a timeout, a 5xx or a 429 without
    rate-limit headers, waiting random(0, min(max_backoff, backoff * 2**n))."""

    attempts: int = 3  # tries in all, fallbacks included in each round
    backoff: float = 0.25
    max_backoff: float = 2.0
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)


@dataclass(frozen=True)
class BreakerSettings(Layered):
    """`breaker: {failures, cooldown}` or `breaker: off`: after `failures` consecutive
    failures an upstream URL is skipped for `cooldown`, then probed with one request."""

    failures: int = 3  # 0: never opens
    cooldown: float = 30.0
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)


timeouts = _mapping(Timeouts, {"connect": _positive_duration, "headers": _positive_duration,
                               "stall": _positive_duration})
retries = _mapping(Retries, {"attempts": _attempts, "backoff": duration,
                             "max_backoff": duration}, off={"attempts": 1})
breaker = _mapping(BreakerSettings, {"failures": _count, "cooldown": _positive_duration},
                   off={"failures": 0})


def registry_urls(value: Any, at: Place) -> tuple[URL, ...]:
    """`fallbacks: [https://mirror.example.com, ...]` (or one URL): tried in order after
    the route's `upstream:`."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    return tuple(registry_url(item, at.child(f"[{i}]")) for i, item in enumerate(items))
