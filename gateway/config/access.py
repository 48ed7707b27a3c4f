"""`access:` in routes.yaml and the access keys of a route: who may connect (`allow`,
`deny`), who may log in (`users`, an htpasswd file), who may pull without a login
(`anonymous`), who may read the operator endpoints (`admin`); per route `anonymous` and
`repositories: {allow, deny}`.

Values only: the htpasswd file is named here and read by pipeline/users.py; the rules
are compiled and applied by pipeline/rules.py.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .document import Place
from .schema import build, check_keys, keys_of, parse_keys, yaml_key
from .values import ABSENT, Absent, Network, networks, readable_file

EVERYONE: tuple[Network, ...] = (ipaddress.IPv4Network("0.0.0.0/0"),
                                 ipaddress.IPv6Network("::/0"))
LOOPBACK: tuple[Network, ...] = (ipaddress.IPv4Network("127.0.0.0/8"),
                                 ipaddress.IPv6Network("::1/128"))
# A repository glob: the characters of OCI repository names plus fnmatch's * ? [ ] !.
_GLOB_RE = re.compile(r"[a-z0-9._/*?\[\]!-]+")


def _cidr_list(value: Any, at: Place, what: str) -> tuple[Network, ...] | Absent:
    """A non-empty list of addresses or networks; null keeps the default."""
    if value is None:
        return ABSENT
    found = networks(value, at)
    if not found:
        raise at.error(f"an empty list lets no one {what}; leave the key out for the default")
    return found


def allow_list(value: Any, at: Place) -> tuple[Network, ...] | Absent:
    return _cidr_list(value, at, "in")


def admin_list(value: Any, at: Place) -> tuple[Network, ...] | Absent:
    return _cidr_list(value, at, "read /metrics and /_gateway/")


def anonymous(value: Any, at: Place) -> tuple[Network, ...]:
    """`all` (everyone, the default), `none` (logins only) or a list of networks."""
    want = "want all, none, or a list of networks like [10.0.0.0/8]"
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("all", "none"):
            return EVERYONE if word == "all" else ()
        try:
            return (ipaddress.ip_network(word, strict=False),)
        except ValueError:
            raise at.error(f"{value[:100]!r}: {want}") from None
    if value is None or isinstance(value, bool | dict | int | float):
        raise at.error(want)
    return networks(value, at)


def route_anonymous(value: Any, at: Place) -> tuple[Network, ...] | None:
    """A route's own `anonymous:`; null: as `access.anonymous` says."""
    return None if value is None else anonymous(value, at)


@dataclass(frozen=True)
class RepositoryRules:
    """`repositories: {allow: [glob...], deny: [glob...]}` of one route. Globs are
    fnmatch patterns (`*` also matches `/`) over the repository as the upstream knows it
    (`library/nginx`) and, on a route with Docker Hub's `library/` rule, also its short
    name (`nginx`): `nginx`, `library/nginx` and `library/*` all match `docker pull nginx`.
    Deny beats allow; an empty allow list allows every repository."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)


def _globs(value: Any, at: Place) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise at.error("want a list of repository globs like [library/*, myorg/*]")
    out = []
    for i, item in enumerate(items):
        glob = str(item).strip()
        if not _GLOB_RE.fullmatch(glob) or glob.startswith("/"):
            raise at.child(f"[{i}]").error(
                f"{str(item)[:100]!r} is not a repository glob: lower-case names with "
                "* ? [...] like library/* or myorg/app-*")
        out.append(glob)
    return tuple(out)


def repository_rules(value: Any, at: Place) -> RepositoryRules:
    if value is None:
        return RepositoryRules()
    if not isinstance(value, dict):
        raise at.error("want {allow: [glob...], deny: [glob...]}")
    check_keys(at, value, ("allow", "deny"))
    rules = RepositoryRules(_globs(value.get("allow"), at.child("allow")),
                            _globs(value.get("deny"), at.child("deny")))
    if "allow" in value and not rules.allow:
        raise at.child("allow").error("an empty allow list allows no repository; leave it "
                                      "out to allow every one")
    return rules


@dataclass(frozen=True)
class AccessSettings:
    """`access:`. Deny beats allow; both are about the client's real address (after
    `trusted_proxies`). Without this section everyone may pull, and /metrics and
    /_gateway/* answer loopback only."""

    allow: tuple[Network, ...] = field(default=EVERYONE, metadata=yaml_key(allow_list))
    deny: tuple[Network, ...] = field(default=(), metadata=yaml_key(networks))
    users: str | None = field(default=None, metadata=yaml_key(readable_file))
    anonymous: tuple[Network, ...] = field(default=EVERYONE, metadata=yaml_key(anonymous))
    admin: tuple[Network, ...] = field(default=LOOPBACK, metadata=yaml_key(admin_list))


def access_section(raw: Any, at: Place, earlier: Mapping[str, Any]) -> AccessSettings:
    """The `access:` section (absent or null: the defaults), checked against the routes."""
    if raw is None or raw is ABSENT:
        values: dict[str, Any] = {}
    elif isinstance(raw, dict):
        values = parse_keys(at, raw, keys_of(AccessSettings))
    else:
        raise at.error("want a mapping of " + ", ".join(sorted(keys_of(AccessSettings))))
    settings = build(AccessSettings, values)
    _check_logins(settings, {route.name: route.anonymous for route in earlier["routes"]},
                  at.document.at(""))
    return settings


def _check_logins(settings: AccessSettings,
                  routes: Mapping[str, tuple[Network, ...] | None], top: Place) -> None:
    """Refuse a file where a rule asks for a login and no one could log in (no `users`)."""
    if settings.users is not None:
        return
    if not settings.anonymous:
        raise top.child("access").child("anonymous").error(
            "anonymous: none needs users: (an htpasswd file): otherwise no one may pull")
    for name, own in routes.items():
        if own is not None and not own:
            raise top.child("routes").child(name).child("anonymous").error(
                "anonymous: none needs access.users (an htpasswd file): otherwise no one "
                "may pull from this route")
