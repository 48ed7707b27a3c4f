"""The configuration as frozen dataclasses, and which routes.yaml key sets which field.

A field's `yaml_key(...)` metadata names its key and value parser; load.py derives its key
tables from these, so adding such a field adds the key. Nothing here reads files or the
environment: secrets stay `SecretRef`s until secrets.py resolves them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from yarl import URL

from . import resilience
from .access import AccessSettings, RepositoryRules, repository_rules, route_anonymous
from .document import Location, Place
from .forward_proxy import ForwardProxySettings
from .limits import Limits, RouteLimits, route_limits
from .redis import RedisSettings
from .resilience import BreakerSettings, Retries, Timeouts
from .schema import check_keys, yaml_key
from .storage import StorageSettings
from .values import (
    FOREVER,
    FreeSpace,
    Network,
    boolean,
    count,
    dns_label,
    duration,
    free_space,
    host_names,
    optional_duration,
    optional_size,
    outbound_proxy_url,
    readable_file,
    registry_url,
    size,
)

_GLOB = re.compile(r"[*?\[]")
SecretSource = Literal["inline", "env", "file"]
# How a secret is written: `password_env: VAR` reads the environment variable VAR.
_SUFFIXES: Mapping[str, SecretSource] = {"": "inline", "_env": "env", "_file": "file"}


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:  # never show the secret, even in a debugger
        return f"Credentials(username={self.username!r}, password=***)"


@dataclass(frozen=True)
class SecretRef:
    """Where a secret comes from: an environment variable's name, a file's path, or (for a
    username only) the value itself. Never the secret."""

    source: SecretSource
    value: str
    # Where it was written, so that resolving it later still names file, line and key.
    location: Location | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class CredentialsRef:
    username: SecretRef
    password: SecretRef = field(metadata={"inline": False})  # never written in the file


def _secret_ref(spec: Mapping[str, Any], at: Place, what: str,
                inline: bool) -> SecretRef | None:
    """`<what>`, `<what>_env` or `<what>_file`: at most one of them."""
    given = [what + suffix for suffix in _SUFFIXES if spec.get(what + suffix) is not None]
    if len(given) > 1:
        raise at.child(given[1]).error(f"give only one of {', '.join(given)}")
    if not given:
        return None
    key = given[0]
    if key == what and not inline:
        raise at.child(key).error(f"{what}s are never written inline: "
                                  f"use {what}_env or {what}_file")
    source = _SUFFIXES[key[len(what):]]
    return SecretRef(source, str(spec[key]), at.child(key).location())


def credentials_ref(value: Any, at: Place) -> CredentialsRef | None:
    """`credentials: {username[_env|_file]: ..., password_env|password_file: ...}`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise at.error("want username and password_env or password_file")
    fields = dataclasses.fields(CredentialsRef)
    check_keys(at, value, [f.name + suffix for f in fields for suffix in _SUFFIXES])
    refs = {f.name: _secret_ref(value, at, f.name, f.metadata.get("inline", True))
            for f in fields}
    given = {name: ref for name, ref in refs.items() if ref is not None}
    if len(given) < len(refs):
        raise at.error("credentials need a username and a password_env or password_file")
    return CredentialsRef(**given)


def credentials_pool(value: Any, at: Place) -> CredentialsRef | tuple[CredentialsRef, ...] | None:
    """`credentials:` one account (a mapping, as before), or a list of them: a pool the
    upstream client spreads pulls over (upstream/accounts.py)."""
    if not isinstance(value, list):
        return credentials_ref(value, at)
    if not value:
        raise at.error("want one or more accounts, each {username, password_env|password_file}")
    refs = []
    for i, item in enumerate(value):
        ref = credentials_ref(item, at.child(f"[{i}]"))
        if ref is None:
            raise at.child(f"[{i}]").error("want username and password_env or password_file")
        refs.append(ref)
    return tuple(refs)


@dataclass(frozen=True)
class ProxySettings:
    """An outbound proxy: `http://`, `https://`, `socks5://` or `socks5h://` (the proxy
    resolves names), with its login from the environment or a file, never inline."""

    url: URL  # no user info: that is `credentials`
    credentials_ref: CredentialsRef | None = None
    credentials: Credentials | None = None  # filled by resolve_secrets

    def __repr__(self) -> str:
        who = f", user={self.credentials.username!r}" if self.credentials else ""
        return f"ProxySettings({str(self.url)!r}{who})"


def proxy_settings(value: Any, at: Place) -> ProxySettings | None:
    """`proxy: socks5h://host:1080`, or `proxy: {url: ..., username[_env|_file]: ...,
    password_env|password_file: ...}`; null means none (a route can take back a default's)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return ProxySettings(outbound_proxy_url(value, at))
    check_keys(at, value, ["url", *(f.name + suffix for f in dataclasses.fields(CredentialsRef)
                                    for suffix in _SUFFIXES)])
    if "url" not in value:
        raise at.error("want url: (http://, https://, socks5:// or socks5h://host:port)")
    login = {k: v for k, v in value.items() if k != "url"}
    return ProxySettings(outbound_proxy_url(value["url"], at.child("url")),
                         credentials_ref(login, at) if login else None)


@dataclass(frozen=True)
class UpstreamSettings:
    """How the gateway talks to one upstream registry."""

    url: URL = field(metadata=yaml_key(registry_url, name="upstream"))  # no path
    credentials: Credentials | None = None  # filled by resolve_secrets from credentials_ref
    # One account (a mapping) or a pool of them (a list); `accounts` holds them all, resolved.
    credentials_ref: CredentialsRef | tuple[CredentialsRef, ...] | None = field(
        default=None, metadata=yaml_key(credentials_pool, name="credentials"))
    ca_file: str | None = field(default=None, metadata=yaml_key(readable_file))
    proxy: ProxySettings | None = field(default=None,
                                        metadata=yaml_key(proxy_settings, inherit=True))
    # Mirrors of the same registry, tried in order after `url` (anonymously: the route's
    # credentials go to `url` only); the cache namespace stays the route's.
    fallbacks: tuple[URL, ...] = field(default=(), metadata=yaml_key(resilience.registry_urls))
    timeouts: Timeouts = field(default_factory=Timeouts,
                               metadata=yaml_key(resilience.timeouts, inherit=True))
    retries: Retries = field(default_factory=Retries,
                             metadata=yaml_key(resilience.retries, inherit=True))
    breaker: BreakerSettings = field(default_factory=BreakerSettings,
                                     metadata=yaml_key(resilience.breaker, inherit=True))
    accounts: tuple[Credentials, ...] = ()  # filled by resolve_secrets, in the written order

    @property
    def pool(self) -> tuple[Credentials, ...]:
        """Every account to pull with; () for anonymous."""
        return self.accounts or ((self.credentials,) if self.credentials else ())


@dataclass(frozen=True)
class CachePolicy:
    """How long answers about one route's tags are believed, and what a fetch may cost."""

    tag_ttl: float = field(default=600.0, metadata=yaml_key(duration, inherit=True))
    negative_ttl: float = field(default=30.0, metadata=yaml_key(duration, inherit=True))
    stale_if_error: float = field(default=FOREVER, metadata=yaml_key(duration, inherit=True))
    # Past tag_ttl, within this: answered from cache at once while one HEAD revalidates.
    stale_while_revalidate: float = field(default=0.0,
                                          metadata=yaml_key(resilience.window, inherit=True))
    # A fetch that no client waits for any more still completes up to this size,
    # so the next pull is a hit; larger ones are abandoned.
    orphan_fetch_limit: int = field(default=8 << 30, metadata=yaml_key(size, inherit=True))
    # This route's share of the cache: a quota inside `cache.max_size`.
    max_size: int | None = field(default=None, metadata=yaml_key(optional_size))
    # Parallel ranged fetch (cache/ranged.py): a cold blob larger than the threshold
    # comes as Range parts: the threshold's bytes first, the rest in equal parts, this
    # many at once (off, or parts 1: one stream).
    parallel_fetch_threshold: int | None = field(
        default=4 << 20, metadata=yaml_key(optional_size, inherit=True))
    parallel_fetch_parts: int = field(default=6, metadata=yaml_key(count, inherit=True))


@dataclass(frozen=True)
class CacheLimits:
    """`cache:`: how much disk the cache may use. Eviction keeps the data below
    `max_size` and keeps `min_free` of the filesystem free, least recently used images
    first; `max_idle` evicts what nobody read for that long."""

    max_size: int | None = field(default=None, metadata=yaml_key(optional_size))
    min_free: FreeSpace = field(default=FreeSpace(fraction=0.10), metadata=yaml_key(free_space))
    max_idle: float | None = field(default=None, metadata=yaml_key(optional_duration))
    # The blobs of a manifest served this recently are never evicted: a pull that has
    # its manifest finds its layers.
    lease: float = field(default=600.0, metadata=yaml_key(duration))


@dataclass(frozen=True)
class Route:
    """One upstream registry and how the gateway serves it."""

    name: str  # the registry name clients use: path prefix, ns=, metrics label
    namespace: str  # directory of this upstream's cache inside the data dir
    upstream: UpstreamSettings
    cache: CachePolicy = field(default_factory=CachePolicy)
    label: str | None = field(default=None, metadata=yaml_key(dns_label))
    hosts: tuple[str, ...] = field(default=(), metadata=yaml_key(host_names))
    aliases: tuple[str, ...] = field(default=(), metadata=yaml_key(host_names))
    library_prefix: bool = field(default=False, metadata=yaml_key(boolean))
    # Access (config/access.py): who may pull without a login (None: access.anonymous;
    # () is `none`, the way to keep a route with upstream credentials for logged-in
    # users), and which repositories may be pulled at all.
    anonymous: tuple[Network, ...] | None = field(
        default=None, metadata=yaml_key(route_anonymous, inherit=True))
    repositories: RepositoryRules = field(
        default_factory=RepositoryRules, metadata=yaml_key(repository_rules, inherit=True))
    limits: RouteLimits = field(default_factory=RouteLimits, metadata=yaml_key(route_limits))


@dataclass(frozen=True)
class Pin:
    text: str  # as written, for messages
    route: str  # the route's name
    repository: str  # a glob over repositories as the upstream knows them (library/ added)
    tag: str | None = None  # a glob over tags; None: any manifest of a matching repository
    digest: str | None = None
    platforms: tuple[str, ...] = ()  # os/arch[/variant]; () = every platform

    @property
    def reference(self) -> str | None:
        """The one tag or digest to keep fetched, when the pin names exactly one."""
        if _GLOB.search(self.repository):
            return None
        if self.digest is not None:
            return self.digest
        return self.tag if self.tag is not None and not _GLOB.search(self.tag) else None

    def matches(self, route: str, repository: str, tags: Iterable[str] = (),
                digest: str | None = None) -> bool:
        """Whether a cached manifest of `route`/`repository` (tagged `tags`) is pinned."""
        if route != self.route or not fnmatch.fnmatchcase(repository, self.repository):
            return False
        if self.digest is not None:
            return digest == self.digest
        if self.tag is None:
            return True
        return any(fnmatch.fnmatchcase(tag, self.tag) for tag in tags)

@dataclass(frozen=True)
class Config:
    routes: tuple[Route, ...]
    base_domains: tuple[str, ...] = ()
    default_route: str | None = None
    source: str = "<config>"
    # Peers (a proxy or load balancer in front) whose X-Forwarded-* headers are believed.
    trusted_proxies: tuple[Network, ...] = ()
    cache: CacheLimits = field(default_factory=CacheLimits)
    pins: tuple[Pin, ...] = ()
    access: AccessSettings = field(default_factory=AccessSettings)
    limits: Limits = field(default_factory=Limits)
    storage: StorageSettings = field(default_factory=StorageSettings)  # config/storage.py
    # `serve --proxy-listen` (config/forward_proxy.py, gateway/proxy/).
    forward_proxy: ForwardProxySettings = field(default_factory=ForwardProxySettings)
    redis: RedisSettings = field(default_factory=RedisSettings)  # config/redis.py: replicas

    def route(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)
