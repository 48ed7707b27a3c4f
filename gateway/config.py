"""Loading and validating routes.yaml into frozen dataclasses.

Every mistake becomes a `ConfigError` naming the file, the line and the key, and
saying what would be valid. Secrets are resolved here (environment or file) and
never printed. Nothing else in the gateway reads the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from .errors import ConfigError

FOREVER = float("inf")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Preset:
    upstream: str
    label: str
    aliases: tuple[str, ...] = ()
    library_prefix: bool = False


# The registries our users cannot reach, with their conventional mirror host labels.
PRESETS: Mapping[str, Preset] = {
    "docker.io": Preset(
        "https://registry-1.docker.io",
        "hub",
        aliases=("registry-1.docker.io", "index.docker.io", "registry.hub.docker.com"),
        library_prefix=True,
    ),
    "gcr.io": Preset("https://gcr.io", "gcr"),
    "ghcr.io": Preset("https://ghcr.io", "ghcr"),
    "k8s.gcr.io": Preset("https://k8s.gcr.io", "k8s-gcr"),
    "registry.k8s.io": Preset("https://registry.k8s.io", "k8s"),
    "quay.io": Preset("https://quay.io", "quay"),
    "mcr.microsoft.com": Preset("https://mcr.microsoft.com", "mcr"),
    "docker.elastic.co": Preset("https://docker.elastic.co", "elastic"),
    "nvcr.io": Preset("https://nvcr.io", "nvcr"),
}


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:  # never show the secret, even in a debugger
        return f"Credentials(username={self.username!r}, password=***)"


@dataclass(frozen=True)
class Route:
    """One upstream registry and how the gateway serves it."""

    name: str  # the registry name clients use: path prefix, ns=, metrics label
    upstream: URL
    namespace: str  # directory of this upstream's cache inside the data dir
    label: str | None = None
    hosts: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    library_prefix: bool = False
    tag_ttl: float = 600.0
    negative_ttl: float = 30.0
    stale_if_error: float = FOREVER
    credentials: Credentials | None = None
    ca_file: str | None = None
    proxy: str | None = None
    # A fetch that no client waits for any more still completes up to this size,
    # so the next pull is a hit; larger ones are abandoned.
    orphan_fetch_limit: int = 8 << 30


@dataclass(frozen=True)
class Config:
    routes: tuple[Route, ...]
    base_domains: tuple[str, ...] = ()
    default_route: str | None = None
    source: str = "<config>"
    # Peers (a proxy or load balancer in front) whose X-Forwarded-* headers are believed.
    trusted_proxies: tuple[Network, ...] = ()

    def route(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)


# ---------------------------------------------------------------- parsing helpers

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_LABEL_RE = re.compile(_DNS_LABEL)
_REGISTRY_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::\d{1,5})?")


class _Located:
    """Values from YAML with the line of every mapping key and sequence item."""

    def __init__(self, file: str, loader: yaml.SafeLoader) -> None:
        self.file = file
        self.loader = loader
        self.lines: dict[str, int] = {}

    def convert(self, node: yaml.Node, path: str) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise ConfigError("keys must be plain strings", file=self.file,
                                      line=key_node.start_mark.line + 1, key=path)
                key = str(key_node.value)
                sub = f"{path}.{key}" if path else key
                if key in out:
                    raise ConfigError("duplicate key", file=self.file,
                                      line=key_node.start_mark.line + 1, key=sub)
                self.lines[sub] = key_node.start_mark.line + 1
                out[key] = self.convert(value_node, sub)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        return self.loader.construct_object(node)

    def error(self, key: str, message: str) -> ConfigError:
        line = self.lines.get(key)
        probe = key
        while line is None and "." in probe:
            probe = probe.rsplit(".", 1)[0]
            line = self.lines.get(probe)
        return ConfigError(message, file=self.file, line=line, key=key)


def parse_duration(value: Any) -> float:
    """`30s`, `10m`, `1h`, `1d`, plain seconds, or `forever`/`never` (0)."""
    if isinstance(value, bool):
        raise ValueError("want a duration like 30s, 10m, 1h, 1d or seconds")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("durations cannot be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("forever", "always", "inf"):
            return FOREVER
        if text in ("never", "off"):
            return 0.0
        match = _DURATION_RE.fullmatch(text)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration: want 30s, 10m, 1h, 1d, seconds, or forever")


def _secret_from(loc: _Located, key: str, spec: dict[str, Any], what: str,
                 env: Mapping[str, str]) -> str | None:
    """Resolve `<what>`, `<what>_env` or `<what>_file`; only `username` may be inline."""
    inline, env_name, file_name = spec.get(what), spec.get(f"{what}_env"), spec.get(f"{what}_file")
    given = [k for k, v in ((what, inline), (f"{what}_env", env_name), (f"{what}_file", file_name))
             if v is not None]
    if len(given) > 1:
        raise loc.error(f"{key}.{given[1]}", f"give only one of {', '.join(given)}")
    if inline is not None:
        if what == "password":
            raise loc.error(f"{key}.password",
                            "passwords are never written inline: use password_env or password_file")
        return str(inline)
    if env_name is not None:
        if str(env_name) not in env:
            raise loc.error(f"{key}.{what}_env", f"environment variable {env_name} is not set")
        return env[str(env_name)]
    if file_name is not None:
        path = Path(str(file_name)).expanduser()
        try:
            return path.read_text().strip()
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not a usable path or text"
            raise loc.error(f"{key}.{what}_file", f"cannot read {path}: {reason}") from None
    return None


_ROUTE_KEYS = {
    "upstream", "label", "hosts", "aliases", "library_prefix", "tag_ttl", "negative_ttl",
    "stale_if_error", "credentials", "ca_file", "proxy", "orphan_fetch_limit",
}
_DEFAULT_KEYS = {"tag_ttl", "negative_ttl", "stale_if_error", "proxy", "orphan_fetch_limit"}
_TOP_KEYS = {"base_domains", "default_route", "defaults", "routes", "trusted_proxies"}
_CRED_KEYS = {"username", "username_env", "username_file", "password", "password_env",
              "password_file"}


def _check_keys(loc: _Located, path: str, value: dict[str, Any], allowed: set[str]) -> None:
    for key in value:
        if key not in allowed:
            raise loc.error(f"{path}.{key}" if path else key,
                            f"unknown key {key!r}; valid keys: {', '.join(sorted(allowed))}")


def _url(loc: _Located, key: str, value: Any) -> URL:
    try:
        url = URL(str(value))
        url.port  # noqa: B018  (yarl checks the port range lazily)
    except (ValueError, TypeError):
        raise loc.error(key, "not a valid URL (want http://host[:port] or https://...)") from None
    return url


def _namespace(name: str) -> str:
    return re.sub(r"[^a-z0-9.-]", "_", name)


def _route(loc: _Located, name: str, spec: Any, defaults: dict[str, Any],
           env: Mapping[str, str]) -> Route:
    key = f"routes.{name}"
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise loc.error(key, "a route is a mapping (use {} to take a preset as it is)")
    _check_keys(loc, key, spec, _ROUTE_KEYS)
    if not _REGISTRY_RE.fullmatch(name):
        raise loc.error(key, f"{name!r} is not a registry host name (like ghcr.io)")
    preset = PRESETS.get(name)
    merged: dict[str, Any] = dict(defaults)
    merged.update(spec)

    upstream_text = merged.get("upstream", preset.upstream if preset else None)
    if upstream_text is None:
        raise loc.error(key, f"{name} is not a preset ({', '.join(PRESETS)}): "
                             "give its upstream: https://...")
    upstream = _url(loc, f"{key}.upstream", upstream_text)
    if upstream.scheme not in ("http", "https") or not upstream.host or \
            upstream.path not in ("", "/"):
        raise loc.error(f"{key}.upstream",
                        f"{upstream_text!r} is not a registry URL like https://registry.example.com")
    if upstream.user is not None or upstream.password is not None:
        # Never echo the URL: it holds a secret.
        raise loc.error(f"{key}.upstream", "credentials do not go in the upstream URL: use "
                                           "credentials: {username, password_env|password_file}")

    label = merged.get("label", preset.label if preset else None)
    if label is not None and not _LABEL_RE.fullmatch(str(label)):
        raise loc.error(f"{key}.label", f"{label!r} is not a single DNS label like 'ghcr'")

    def str_list(field_name: str, fallback: tuple[str, ...]) -> tuple[str, ...]:
        raw = merged.get(field_name)
        if raw is None:
            return fallback
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            raise loc.error(f"{key}.{field_name}", "want a list of host names")
        items = tuple(str(v).lower().rstrip(".") for v in raw)
        for i, item in enumerate(items):
            if not _HOST_RE.fullmatch(item):
                raise loc.error(f"{key}.{field_name}[{i}]", f"{item!r} is not a host name")
        return items

    hosts = str_list("hosts", ())
    aliases = str_list("aliases", preset.aliases if preset else ())

    durations: dict[str, float] = {}
    for field_name in ("tag_ttl", "negative_ttl", "stale_if_error"):
        if field_name in merged:
            try:
                durations[field_name] = parse_duration(merged[field_name])
            except ValueError as exc:
                where = f"{key}.{field_name}" if field_name in spec else f"defaults.{field_name}"
                raise loc.error(where, str(exc)) from None

    credentials = None
    cred_spec = merged.get("credentials")
    if cred_spec is not None:
        if not isinstance(cred_spec, dict):
            raise loc.error(f"{key}.credentials", "want username and password_env or password_file")
        _check_keys(loc, f"{key}.credentials", cred_spec, _CRED_KEYS)
        username = _secret_from(loc, f"{key}.credentials", cred_spec, "username", env)
        password = _secret_from(loc, f"{key}.credentials", cred_spec, "password", env)
        if username is None or password is None:
            raise loc.error(f"{key}.credentials",
                            "credentials need a username and a password_env or password_file")
        credentials = Credentials(username, password)

    ca_file = merged.get("ca_file")
    if ca_file is not None and not Path(str(ca_file)).is_file():
        raise loc.error(f"{key}.ca_file", f"{ca_file} is not a readable file")
    proxy = merged.get("proxy")
    if proxy is not None:
        where = f"{key}.proxy" if "proxy" in spec else "defaults.proxy"
        proxy_url = _url(loc, where, proxy)
        if proxy_url.scheme not in ("http", "https") or not proxy_url.host:
            raise loc.error(where, "the outbound proxy must be an http:// URL")
    orphan = merged.get("orphan_fetch_limit", 8 << 30)
    if not isinstance(orphan, int) or isinstance(orphan, bool) or orphan < 0:
        raise loc.error(f"{key}.orphan_fetch_limit", "want a number of bytes")
    library_prefix = merged.get("library_prefix", preset.library_prefix if preset else False)
    if not isinstance(library_prefix, bool):
        raise loc.error(f"{key}.library_prefix", "want true or false")

    return Route(
        name=name,
        upstream=upstream.with_path(""),
        namespace=_namespace(name),
        label=str(label) if label is not None else None,
        hosts=hosts,
        aliases=aliases,
        library_prefix=library_prefix,
        credentials=credentials,
        ca_file=str(ca_file) if ca_file is not None else None,
        proxy=str(proxy) if proxy is not None else None,
        orphan_fetch_limit=orphan,
        **durations,
    )


def _trusted_proxies(loc: _Located, raw: Any) -> tuple[Network, ...]:
    """`trusted_proxies: [127.0.0.1, 10.0.0.0/8]`: addresses or networks of proxies in front."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise loc.error("trusted_proxies", "want a list of addresses or networks, "
                                           "e.g. [127.0.0.1, 10.0.0.0/8]")
    networks = []
    for i, item in enumerate(raw):
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise loc.error(f"trusted_proxies[{i}]", f"{item!r} is not an IP address or "
                                                     "network like 10.0.0.0/8") from None
    return tuple(networks)


def load_config(text: str, source: str = "<config>",
                env: Mapping[str, str] | None = None) -> Config:
    """Parse routes.yaml text; `env` resolves *_env secrets (default: os.environ)."""
    env = os.environ if env is None else env
    loader = yaml.SafeLoader(text)
    loc = _Located(source, loader)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError("empty file: it needs at least a routes: mapping", file=source)
        data = loc.convert(node, "")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ConfigError(f"not valid YAML: {exc.problem}", file=source,
                          line=mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping with routes:", file=source, line=1)
    _check_keys(loc, "", data, _TOP_KEYS)

    base_domains_raw = data.get("base_domains") or []
    if isinstance(base_domains_raw, str):
        base_domains_raw = [base_domains_raw]
    if not isinstance(base_domains_raw, list):
        raise loc.error("base_domains", "want a list of domains like [example.com]")
    base_domains = tuple(str(d).lower().strip(".") for d in base_domains_raw)
    for i, domain in enumerate(base_domains):
        if not _HOST_RE.fullmatch(domain):
            raise loc.error(f"base_domains[{i}]", f"{domain!r} is not a domain name")

    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise loc.error("defaults", "want a mapping")
    _check_keys(loc, "defaults", defaults, _DEFAULT_KEYS)

    routes_raw = data.get("routes")
    if not isinstance(routes_raw, dict) or not routes_raw:
        raise loc.error("routes", "want a mapping of registry names to routes, e.g. docker.io: {}")
    routes = tuple(_route(loc, str(name), spec, defaults, env) for name, spec in routes_raw.items())

    # Names, aliases, labels and hosts must each pick exactly one route.
    seen: dict[tuple[str, str], str] = {}
    for route in routes:
        for kind, values in (("name", (route.name, *route.aliases)),
                             ("label", (route.label,) if route.label else ()),
                             ("host", route.hosts)):
            for value in values:
                owner = seen.setdefault((kind, value), route.name)
                if owner != route.name:
                    raise loc.error(f"routes.{route.name}",
                                    f"{kind} {value!r} is already used by route {owner}")

    default_route = data.get("default_route", "docker.io" if "docker.io" in routes_raw else None)
    if default_route is not None and not isinstance(default_route, str):
        raise loc.error("default_route", "want the name of one route, e.g. docker.io, or null")
    if default_route is not None:
        names = {r.name for r in routes}
        if default_route not in names:
            raise loc.error("default_route", f"{default_route!r} is not one of the routes: "
                                             f"{', '.join(sorted(names))}")
    trusted_proxies = _trusted_proxies(loc, data.get("trusted_proxies"))
    return Config(routes=routes, base_domains=base_domains, default_route=default_route,
                  trusted_proxies=trusted_proxies,
                  source=source)


def load_config_file(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(file)) from None
    return load_config(text, str(file), env)
