"""The request pipeline, outermost first:

    edge (trusted X-Forwarded-*) → observe (errors, log, metrics) → redirect to HTTPS →
    resolve (read-only guard, → RegistryRequest) → access → limits → handler

`access` and `limits` are the slots for who-may-pull rules and token buckets: they run
on a resolved request, so a rule sees the route and repository, never a raw path.
"""

from __future__ import annotations

from aiohttp.typedefs import Middleware

from ..config import Config
from ..metrics import Metrics
from ..routing import Router
from .edge import forwarded_middleware, redirect_middleware
from .limits import ClientLimits, limits_middleware
from .observe import add_common_headers, observe_middleware, render
from .resolve import resolve_middleware

__all__ = ["ClientLimits", "add_common_headers", "build", "render"]


def build(config: Config, router: Router, metrics: Metrics, *,
          https_port: int | None = None,
          limits: ClientLimits | None = None) -> list[Middleware]:
    """`limits`: the per-client buckets, kept by the composition root across reloads."""
    stages: list[Middleware] = []
    if config.trusted_proxies:
        # First, so the log, the routing and the rules see the real client and host.
        stages.append(forwarded_middleware(config.trusted_proxies))
    stages.append(observe_middleware(metrics))
    if https_port is not None:
        stages.append(redirect_middleware(https_port))
    stages.append(resolve_middleware(router))
    # access: (none yet) allow/deny CIDRs, users, repository rules
    stages.append(limits_middleware(lambda: config, limits or ClientLimits(), metrics))
    return stages
