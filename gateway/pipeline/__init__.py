"""The request pipeline, outermost first:

    edge (config snapshot, trusted X-Forwarded-*) → observe (errors, log, metrics) →
    redirect to HTTPS → resolve (read-only guard, → RegistryRequest) → access → limits →
    handler

`access` (access.py: address rules, logins, repository rules, admin-only endpoints) and
`limits` run on a resolved request, so a rule sees the route and repository, never a raw
path.
Every stage gets `snapshot` (a `Callable[[], Config]`): the config the request started
with, the same for all its stages however many reloads happen meanwhile. What a stage
compiles from it is memoised against the config's identity (`PerConfig`).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp.typedefs import Middleware

from ..config import Config
from ..metrics import Metrics
from ..routing import Router
from ..state import ProxiedLookup
from .access import access_middleware
from .edge import edge_middleware, forwarded_middleware, redirect_middleware
from .limits import ClientLimits, limits_middleware
from .observe import add_common_headers, observe_middleware, render
from .resolve import resolve_middleware
from .snapshot import PerConfig, Snapshot
from .users import Logins

__all__ = ["ClientLimits", "PerConfig", "Snapshot", "add_common_headers", "build",
           "forwarded_middleware", "render"]


def build(current: Callable[[], Config], metrics: Metrics, *,
          https_port: int | None = None, logins: Logins | None = None,
          limits: ClientLimits | None = None,
          proxied: ProxiedLookup | None = None) -> list[Middleware]:
    """The stages over `current` (the running config: `Live`, or `lambda: config`).
    `logins` and `limits` (htpasswd tables and bcrypt cache; per-client buckets) are kept
    by the composition root across reloads. `proxied`: the forward proxy's lookup of the
    connections it terminated (their requests are routed by the CONNECTed host)."""
    snapshot = Snapshot(current)
    # First, so the log, the routing and the rules see the real client and host.
    stages: list[Middleware] = [edge_middleware(snapshot), observe_middleware(metrics)]
    if https_port is not None:
        stages.append(redirect_middleware(https_port))
    stages.append(resolve_middleware(PerConfig(snapshot, Router), proxied))
    stages.append(access_middleware(snapshot, metrics, logins=logins))
    stages.append(limits_middleware(snapshot, limits or ClientLimits(), metrics))
    return stages
