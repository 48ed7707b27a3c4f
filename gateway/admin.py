"""Operator endpoints: /healthz, /metrics and /_gateway/routes (what client machines read).

Never shows upstream URLs or credentials. Serving these to admin addresses only is the
access stage's job; here they are plain handlers over the config and the metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from . import __version__
from .config import Config
from .errors import RegistryError
from .metrics import Metrics
from .wire import ROUTES_PATH, GatewayListing, RouteListing

# The running config (it changes on reload): read it per request, never keep it.
CURRENT: web.AppKey[Callable[[], Config]] = web.AppKey("current config")
METRICS = web.AppKey("metrics", Metrics)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    collected = request.app[METRICS]
    return web.Response(body=collected.render(), headers={"Content-Type": collected.content_type})


async def routes(request: web.Request) -> web.Response:
    """Route names and the hosts that pick them, for `registry-gateway client` and `doctor`."""
    config = request.app[CURRENT]()
    return web.json_response(GatewayListing(
        routes=tuple(RouteListing(r.name, r.label, r.hosts, r.aliases) for r in config.routes),
        base_domains=config.base_domains, default_route=config.default_route,
        version=__version__).to_json())


async def not_found(request: web.Request) -> web.Response:
    raise RegistryError("NOT_FOUND", "not a registry API path; registry clients use /v2/")


def add_routes(app: web.Application, *, serve_metrics: bool) -> None:
    router = app.router
    router.add_get("/healthz", healthz)
    router.add_get(ROUTES_PATH, routes)
    if serve_metrics:
        router.add_get("/metrics", metrics)


def metrics_app(collected: Metrics) -> web.Application:
    """The app of a separate `--metrics-listen` address."""
    app = web.Application()
    app[METRICS] = collected
    app.router.add_get("/metrics", metrics)
    return app
