"""Operator endpoints: /healthz and /readyz (open to every address, revealing nothing),
and for admin addresses (the access stage guards them) /metrics, /_gateway/routes (no
upstream URLs, no credentials) and the status page at /_gateway/ with its JSON.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from .. import __version__
from ..config import Config
from ..errors import RegistryError
from ..metrics import Metrics
from ..wire import ROUTES_PATH, GatewayListing, RouteListing
from .page import Page
from .pulls import Pulls, TopK
from .ready import Check, Readiness, ReadyStore, readyz, store_reachable, writable
from .status import Sources, document

__all__ = ["CURRENT", "METRICS", "READINESS", "STATUS", "STATUS_JSON", "STATUS_PAGE", "Check",
           "Pulls", "Readiness", "ReadyStore", "Sources", "TopK", "add_routes", "metrics_app",
           "not_found", "store_reachable", "writable"]

# The running config (it changes on reload): read it per request, never keep it.
CURRENT: web.AppKey[Callable[[], Config]] = web.AppKey("current config")
METRICS = web.AppKey("metrics", Metrics)
READINESS = web.AppKey("readiness", Readiness)
STATUS = web.AppKey("status sources", Sources)
PAGE = web.AppKey("status page", Page)

STATUS_PAGE = "/_gateway/"
STATUS_JSON = "/_gateway/status.json"


async def healthz(request: web.Request) -> web.Response:
    """Alive: the loop answers. Nothing is checked, so it costs nothing."""
    return web.Response(text="ok\n")


async def ready_handler(request: web.Request) -> web.Response:
    return await readyz(request, request.app[READINESS])


async def metrics(request: web.Request) -> web.Response:
    collected = request.app[METRICS]
    return web.Response(body=await collected.scrape(),
                        headers={"Content-Type": collected.content_type})


async def routes(request: web.Request) -> web.Response:
    """Route names and the hosts that pick them, for `registry-gateway client` and `doctor`."""
    config = request.app[CURRENT]()
    return web.json_response(GatewayListing(
        routes=tuple(RouteListing(r.name, r.label, r.hosts, r.aliases) for r in config.routes),
        base_domains=config.base_domains, default_route=config.default_route,
        version=__version__).to_json())


async def status_json(request: web.Request) -> web.Response:
    return web.json_response(await document(request.app[STATUS]),
                             headers={"Cache-Control": "no-store"})


async def status_page(request: web.Request) -> web.Response:
    return await request.app[PAGE].index(request)


async def status_asset(request: web.Request) -> web.Response:
    return await request.app[PAGE].asset(request)


async def to_status_page(request: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect(STATUS_PAGE)


async def not_found(request: web.Request) -> web.Response:
    raise RegistryError("NOT_FOUND", "not a registry API path; registry clients use /v2/")


def add_routes(app: web.Application, *, serve_metrics: bool) -> None:
    """The operator endpoints. /readyz needs app[READINESS]; the status page app[STATUS]
    (without it, those paths are not served)."""
    router = app.router
    router.add_get("/healthz", healthz)
    if READINESS in app:
        router.add_get("/readyz", ready_handler)
    router.add_get(ROUTES_PATH, routes)
    if serve_metrics:
        router.add_get("/metrics", metrics)
    if STATUS in app:
        app[PAGE] = Page()
        router.add_get("/_gateway", to_status_page)
        router.add_get(STATUS_PAGE, status_page)
        router.add_get(STATUS_JSON, status_json)
        router.add_get("/_gateway/static/{name}", status_asset)


def metrics_app(collected: Metrics) -> web.Application:
    """The app of a separate `--metrics-listen` address."""
    app = web.Application()
    app[METRICS] = collected
    app.router.add_get("/metrics", metrics)
    return app
