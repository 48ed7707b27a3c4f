"""Resolve before policy: a `/v2/` request becomes one typed `RegistryRequest` (route,
repository, kind, parsed reference) before access rules, limits or handlers run.

Also the read-only guard (one stage with it: a middleware layer costs on every request).
Parsing only: no upstream, no cache, no policy decisions.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from aiohttp import web

from ..config import Config
from ..errors import RegistryError
from ..reference import Digest, Reference, parse_digest
from ..routing import Router
from ..state import Kind, ProxiedLookup, RegistryRequest, RequestState
from .snapshot import PerConfig

READ_ONLY = ("GET", "HEAD")
V2_PREFIX = "/v2/"
# Names may contain "manifests" etc. as components: the lazy name grows until the rest
# is one endpoint keyword and one segment.
_PATH_RE = re.compile(r"(?P<name>.+?)/(?P<kind>manifests|blobs|tags|referrers)/(?P<rest>[^/]+)")
_KINDS: dict[str, Kind] = {"manifests": "manifest", "blobs": "blob", "tags": "tags",
                           "referrers": "referrers"}


def parse(host: str | None, tail: str, ns: str | None, router: Router, *,
          proxied: str | None = None) -> RegistryRequest:
    """`tail` is the path after /v2/ (still percent-decoded by aiohttp). `proxied`: the
    registry host of the CONNECT the request came through, which alone picks the route."""
    if "/blobs/uploads" in f"/{tail}":
        raise RegistryError("UNSUPPORTED", "this registry mirror is read-only: no uploads", 405,
                            headers={"Allow": "GET, HEAD"})
    match = _PATH_RE.fullmatch(tail)
    if match is None:
        # Length first: a huge path is a name problem, not an unknown endpoint.
        if len(tail) > 512:
            raise RegistryError("NAME_INVALID", f"request path of {len(tail)} characters is "
                                "too long for a repository")
        raise RegistryError("NOT_FOUND", "no such registry API endpoint")
    kind, rest = _KINDS[match.group("kind")], match.group("rest")
    resolved = (router.resolve(host, match.group("name"), ns) if proxied is None
                else router.resolve_proxied(proxied, match.group("name")))
    target: Reference | Digest | None
    if kind == "manifest":
        target = Reference.parse(rest)
    elif kind == "tags":
        if rest != "list":
            raise RegistryError("NOT_FOUND", "no such registry API endpoint")
        target = None
    else:
        target = parse_digest(rest)
    return RegistryRequest(resolved.route, resolved.repository, kind, target, resolved.via)


# Resolved calls kept per config: a cluster pulls the same few (host, path) pairs over
# and over, and parsing one (the path pattern, the route, the reference) was a tenth of
# a cached manifest GET. Cleared when full, and only calls of up to KEPT_CHARS (host,
# path and ns= together) are kept: a stranger's 64 KiB request lines cannot fill memory.
RESOLVED_KEPT = 4096
KEPT_CHARS = 512


class _Resolver:
    """A config's Router and the calls it resolved (immutable: shared by requests)."""

    __slots__ = ("calls", "router")

    def __init__(self, config: Config) -> None:
        self.router = Router(config)
        self.calls: dict[tuple[str | None, str, str | None, str | None], RegistryRequest] = {}

    def parse(self, host: str | None, tail: str, ns: str | None,
              proxied: str | None) -> RegistryRequest:
        key = (host, tail, ns, proxied)
        found = self.calls.get(key)
        if found is None:
            found = parse(host, tail, ns, self.router, proxied=proxied)  # raises: not kept
            if len(host or "") + len(tail) + len(ns or "") + len(proxied or "") > KEPT_CHARS:
                return found
            if len(self.calls) >= RESOLVED_KEPT:
                self.calls.clear()
            self.calls[key] = found
        return found


def resolve_step(proxied: ProxiedLookup | None = None
                 ) -> Callable[[web.Request, RequestState], None]:
    """The stage (run by `admit`): the request's call as the Router of its config
    (compiled once per config) resolves it. `proxied`: the forward proxy's lookup of
    terminated CONNECTs (None: no proxy)."""
    resolvers = PerConfig(_Resolver)

    def resolve(request: web.Request, state: RequestState) -> None:
        # The nginx recipe's `limit_except GET { deny all; }`, built in.
        if request.method not in READ_ONLY:
            raise RegistryError("UNSUPPORTED", f"{request.method} is not allowed: this registry "
                                "mirror is read-only", 405, headers={"Allow": "GET, HEAD"})
        path = request.path
        through = proxied(request) if proxied is not None else None
        if through is not None:
            state.user = through.user  # logged in to the proxy: Proxy-Authorization
        if path.startswith(V2_PREFIX) and len(path) > len(V2_PREFIX):
            state.registry = resolvers.of(state.config).parse(
                request.host, path[len(V2_PREFIX):], request.query.get("ns"),
                through.host if through else None)

    return resolve
