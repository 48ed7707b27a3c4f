"""An upstream's auth challenge (`WWW-Authenticate`: Basic or Bearer with its realm,
service and scope) and the tokens it leads to. Parsing only: no I/O, no secrets kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_in: float


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # bearer | basic
    realm: str = ""
    service: str = ""


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, params = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        return Challenge("basic")
    if scheme != "bearer":
        return None
    values = dict(_CHALLENGE_PARAM.findall(params))
    if "realm" not in values:
        return None
    return Challenge("bearer", values["realm"], values.get("service", ""))


def challenge_scope(header: str) -> str | None:
    return dict(_CHALLENGE_PARAM.findall(header)).get("scope")
