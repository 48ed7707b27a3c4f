"""The request pipeline, outermost first:

    observe (the config snapshot; edge: trusted X-Forwarded-*; errors, log, metrics) →
    redirect to HTTPS → admit: resolve (read-only guard, → RegistryRequest) → access →
    limits → handler

Two drivers run the same stages: aiohttp's middleware (`Pipeline.middlewares`, every
request the app routes) and the server's registry lane (server/lane.py: manifest
requests, without aiohttp's router and middleware chain), through `Pipeline.observer`
and `Pipeline.admit`.

`access` (access.py: address rules, logins, repository rules, admin-only endpoints) and
`limits` run on a resolved request, so a rule sees the route and repository, never a raw
path. Edge is a step of observe, and resolve, access and limits are steps of one
middleware (admit.py): each layer of middleware is a coroutine and a call more on every
request. Every step gets the config the request started with (`RequestState.config`,
read once by observe), the same for all its stages however many reloads happen
meanwhile. What a step compiles from it is memoised against the config's identity
(`PerConfig`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..config import Config
from ..metrics import Metrics
from ..state import ProxiedLookup
from .access import access_step
from .admit import Admit, admit_middleware
from .edge import edge_step, forwarded_middleware, redirect_middleware
from .limits import ClientLimits, limits_step
from .observe import Observer, observe_middleware, on_prepare, render
from .resolve import resolve_step
from .snapshot import PerConfig
from .users import Logins

__all__ = ["Admit", "ClientLimits", "Observer", "PerConfig", "Pipeline", "build",
           "forwarded_middleware", "on_prepare", "render"]


@dataclass(frozen=True)
class Pipeline:
    """The stages, built once: as aiohttp middleware (`middlewares`, for the app), and
    the same `observer` and `admit` for a driver that runs them without aiohttp's
    router (the server's registry lane). `redirects`: plain HTTP is sent to HTTPS."""

    observer: Observer
    admit: Admit
    middlewares: list[Middleware]
    redirects: bool


def build(current: Callable[[], Config], metrics: Metrics, *,
          https_port: int | None = None, logins: Logins | None = None,
          limits: ClientLimits | None = None,
          proxied: ProxiedLookup | None = None,
          access_log: Callable[[str], None] | None = None,
          internal: Callable[[web.Request], bool] | None = None) -> Pipeline:
    """The stages over `current` (the running config: `Live`, or `lambda: config`).
    `logins` and `limits` (htpasswd tables and bcrypt cache; per-client buckets) are kept
    by the composition root across reloads. `proxied`: the forward proxy's lookup of the
    connections it terminated (their requests are routed by the CONNECTed host).
    `access_log`: where the access log's lines go (the log writer; None: as records of
    the "gateway.access" logger). `internal`: is a request to /_gateway/internal/ signed
    by a replica (`redis:`; None: every such request is refused)."""
    # The edge first, so the log, the routing and the rules see the real client and host.
    observer = Observer(metrics, current, edge_step(), access_log=access_log)
    stages: list[Middleware] = [observe_middleware(observer)]
    if https_port is not None:
        stages.append(redirect_middleware(https_port))
    admit = Admit(resolve_step(proxied),
                        access_step(metrics, logins=logins, internal=internal),
                        limits_step(limits or ClientLimits(), metrics))
    stages.append(admit_middleware(admit))
    return Pipeline(observer, admit, stages, https_port is not None)
