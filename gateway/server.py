"""Building the aiohttp `Application`: routes, middlewares, and what the app owns.

`create_app(config, data_dir)` builds everything; sessions, the store and cache tasks
are opened and closed in `cleanup_ctx`. Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from . import __version__, api
from .cache import Cache
from .cache.fs import FsStore
from .config import Config
from .errors import RegistryError
from .metrics import Metrics
from .middleware import add_common_headers, make_middlewares
from .pipeline.edge import forwarded_middleware, redirect_middleware
from .routing import Router
from .upstream import Upstream

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)

# A 10 KB repository name must reach the handler (and get an OCI 400), not the parser's
# plain-text 400; far beyond this the parser refuses on its own.
MAX_LINE = 65536


def create_app(config: Config, data_dir: Path, *, serve_metrics: bool = True,
               https_port: int | None = None) -> web.Application:
    """`https_port`: plain-HTTP requests are redirected to HTTPS on this port."""
    metrics = Metrics()
    store = FsStore(Path(data_dir))
    cache = Cache(store, metrics)
    upstreams = {route.name: Upstream(route, metrics) for route in config.routes}
    services = api.Services(Router(config), cache, upstreams)

    # Outermost: a trusted proxy's X-Forwarded-* become the request's host, scheme and
    # remote before anything logs or routes it. Innermost: the HTTPS redirect.
    middlewares = make_middlewares(metrics)
    if config.trusted_proxies:
        middlewares.insert(0, forwarded_middleware(config.trusted_proxies))
    if https_port is not None:
        middlewares.append(redirect_middleware(https_port))
    app = web.Application(middlewares=middlewares, client_max_size=1 << 20)
    app[CONFIG] = config
    app[METRICS] = metrics
    app[api.SERVICES] = services

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await store.open()  # clears leftovers of transfers cut by a crash
        for upstream in upstreams.values():
            await upstream.start()
        yield
        await cache.close()
        await asyncio.gather(*(u.close() for u in upstreams.values()))

    app.cleanup_ctx.append(lifecycle)
    app.on_response_prepare.append(add_common_headers)

    router = app.router
    for path in ("/v2", "/v2/"):
        router.add_get(path, api.base, allow_head=False)
        router.add_route("HEAD", path, api.base)
    router.add_get("/v2/{tail:.+}", api.dispatch, allow_head=False)
    router.add_route("HEAD", "/v2/{tail:.+}", api.dispatch)
    router.add_get("/healthz", healthz)
    router.add_get("/_gateway/routes", gateway_routes)
    if serve_metrics:
        add_metrics_route(app, metrics)
    router.add_route("*", "/{tail:.*}", not_found)
    return app


def add_metrics_route(app: web.Application, metrics: Metrics) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})

    app.router.add_get("/metrics", handler)


def create_metrics_app(metrics: Metrics) -> web.Application:
    app = web.Application()
    add_metrics_route(app, metrics)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def gateway_routes(request: web.Request) -> web.Response:
    """Route names and the hosts that pick them, for `registry-gateway client` and `doctor`
    on client machines. Never upstream URLs or credentials."""
    config = request.app[CONFIG]
    return web.json_response({
        "gateway": "registry-gateway",
        "version": __version__,
        "base_domains": list(config.base_domains),
        "default_route": config.default_route,
        "routes": [{"name": r.name, "label": r.label, "hosts": list(r.hosts),
                    "aliases": list(r.aliases)} for r in config.routes],
    })


async def not_found(request: web.Request) -> web.Response:
    raise RegistryError("NOT_FOUND", "not a registry API path; registry clients use /v2/")
