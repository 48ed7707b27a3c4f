"""The request pipeline, outermost first:

    edge (trusted X-Forwarded-*) → observe (errors, log, metrics) → redirect to HTTPS →
    resolve (read-only guard, → RegistryRequest) → access → limits → handler

`access` (access.py: address rules, logins, repository rules, admin-only endpoints) and
`limits` run on a resolved request, so a rule sees the route and repository, never a raw
path.
"""

from __future__ import annotations

from aiohttp.typedefs import Middleware

from ..config import Config
from ..metrics import Metrics
from ..routing import Router
from .access import access_middleware
from .edge import forwarded_middleware, redirect_middleware
from .observe import add_common_headers, observe_middleware, render
from .resolve import resolve_middleware

__all__ = ["add_common_headers", "build", "render"]


def build(config: Config, router: Router, metrics: Metrics, *,
          https_port: int | None = None) -> list[Middleware]:
    stages: list[Middleware] = []
    if config.trusted_proxies:
        # First, so the log, the routing and the rules see the real client and host.
        stages.append(forwarded_middleware(config.trusted_proxies))
    stages.append(observe_middleware(metrics))
    if https_port is not None:
        stages.append(redirect_middleware(https_port))
    stages.append(resolve_middleware(router))
    # Until live reload: the one Config (current() is read once per request).
    stages.append(access_middleware(lambda: config, metrics))
    # limits: (none yet) per-client token buckets
    return stages
