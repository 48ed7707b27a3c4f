"""The composition root: builds the app (live config, store, index, cache, upstreams,
pipeline, handlers) and runs it (listeners, TLS with its reloader, signals, logging).

The only place that wires parts together; nothing here runs at import time, and the
command line only fills in `ServeOptions`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from . import admin, api, listen, pipeline
from .cache import Cache, FsStore, MemoryIndex, ProcessDir
from .cache.contents_sqlite import SqliteContents
from .cache.coordinate_files import FileCoordinator
from .cache.pinning import PinKeeper
from .config import Config, Route
from .logs import start_logging
from .looplag import LoopLag
from .metrics import Metrics
from .pipeline.users import Logins
from .reload import WATCH_INTERVAL, Live, Reloader, secret_files
from .tls import RELOAD_INTERVAL, TlsCertificates
from .upstream import Upstream
from .upstream_pool import UpstreamPool

log = logging.getLogger("gateway")

# A 10 KB repository name must reach the handler (and get an OCI 400), not the parser's
# plain-text 400; far beyond this the parser refuses on its own. (The default of
# limits.server.max_request_line, which the listeners use.)
MAX_LINE = 65536
CURRENT, METRICS = admin.CURRENT, admin.METRICS
LIVE = web.AppKey("live", Live)
RELOADER = web.AppKey("reloader", Reloader)


def create_app(config: Config, data_dir: Path, *, serve_metrics: bool = True,
               https_port: int | None = None,
               clock: Callable[[], float] = time.time,
               config_file: Path | None = None,
               watch_interval: float = WATCH_INTERVAL,
               limits: pipeline.ClientLimits | None = None,
               worker: Worker | None = None) -> web.Application:
    """The gateway as one aiohttp app. `https_port`: plain HTTP is redirected there.
    `clock` (wall seconds) drives every TTL. `config_file`: reloaded on SIGHUP and when it
    changes (looked at every `watch_interval` s; 0: never). `limits`: the buckets.
    `worker`: one of several processes on this data directory (workers.py)."""
    metrics = Metrics()
    live = Live(config)
    primary = worker is None or worker.index == 0
    cache = _build_cache(config, Path(data_dir), metrics, clock, worker, primary)
    limits = limits or pipeline.ClientLimits()
    upstreams = UpstreamPool(_upstream_factory(metrics, clock, limits, live))

    # Logins outlive config swaps: the htpasswd tables and the bcrypt cache stay warm.
    logins = Logins()
    app = web.Application(middlewares=pipeline.build(live, metrics, https_port=https_port,
                                                     logins=logins, limits=limits),
                          client_max_size=1 << 20)
    current: Callable[[], Config] = live  # admin's view of the running config
    app[CURRENT] = current
    app[LIVE] = live
    app[METRICS] = metrics
    app[api.SERVICES] = api.Services(cache, upstreams)

    pins = PinKeeper(config, cache, upstreams, metrics)
    reloader = Reloader(live, upstreams, metrics, source=config_file, interval=watch_interval)
    app[RELOADER] = reloader
    # The reload hooks of the parts built here; ACCESS/LIMITS add theirs the same way.
    live.subscribe(lambda _old, new: cache.reconfigure(new))
    live.subscribe(lambda _old, new: pins.reconfigure(new))
    live.watch_files(secret_files)
    live.watch_files(_htpasswd_file)
    lag = LoopLag(metrics)

    async def watch_loop(app: web.Application) -> AsyncIterator[None]:
        lag.start()  # before the cache opens: its start-up work shows as lag too
        yield
        await lag.close()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await cache.open()
        await upstreams.start(config.routes)
        if primary:  # pinned images are fetched once per data directory
            pins.start()
        await reloader.start()
        yield
        await reloader.close()
        await pins.close()
        await cache.close()
        await upstreams.close()

    app.cleanup_ctx.extend((watch_loop, lifecycle))
    app.on_response_prepare.append(pipeline.add_common_headers)
    _add_handlers(app, serve_metrics)
    return app


def _build_cache(config: Config, data_dir: Path, metrics: Metrics,
                 clock: Callable[[], float], worker: Worker | None, primary: bool) -> Cache:
    """The filesystem store, the sqlite catalogue; with workers, single flight across them
    and the once-per-data-directory work in the primary one."""
    spool = ProcessDir(data_dir / ".spool")
    store = FsStore(data_dir, spool.path)
    contents = SqliteContents(data_dir, clock=clock, metrics=metrics, primary=primary)
    return Cache(config, data_dir, store, MemoryIndex(clock), contents, metrics, spool, clock,
                 coordinator=FileCoordinator(data_dir) if worker is not None else None,
                 primary=primary)


def _upstream_factory(metrics: Metrics, clock: Callable[[], float],
                      limits: pipeline.ClientLimits, live: Live) -> Callable[[Route], Upstream]:
    def make(route: Route) -> Upstream:
        upstream = Upstream(route, metrics, clock=clock)
        # The route's upstream bandwidth cap, read from the running config at each batch.
        upstream.pace = limits.upstream_pace(route.name, live)
        return upstream

    return make


def _htpasswd_file(config: Config) -> list[Path]:
    """`access.users`: a changed file is read again (Htpasswd also looks every 2 s)."""
    return [Path(config.access.users)] if config.access.users else []


def _add_handlers(app: web.Application, serve_metrics: bool) -> None:
    router = app.router
    for path in ("/v2", "/v2/"):
        router.add_get(path, api.base, allow_head=False)
        router.add_route("HEAD", path, api.base)
    router.add_get("/v2/{tail:.+}", api.dispatch, allow_head=False)
    router.add_route("HEAD", "/v2/{tail:.+}", api.dispatch)
    admin.add_routes(app, serve_metrics=serve_metrics)
    router.add_route("*", "/{tail:.*}", admin.not_found)


Address = tuple[str, int]


@dataclass(frozen=True)
class Worker:
    """One of `serve --workers N` (workers.py): its listening sockets, bound by the
    supervisor, and `ready()` to call once it serves."""

    index: int  # 0: the primary, which also does the once-per-data-directory work
    count: int
    plain: tuple[socket.socket, ...]
    tls: tuple[socket.socket, ...]
    metrics: tuple[socket.socket, ...]
    ready: Callable[[], None]


@dataclass(frozen=True)
class ServeOptions:
    config: Config
    data_dir: Path
    listens: tuple[Address, ...] = (("127.0.0.1", 5000),)
    tls_listens: tuple[Address, ...] = ()
    metrics_listen: Address | None = None
    certs: Path = Path("certs")
    redirect_http: bool = False
    tls_reload: float = RELOAD_INTERVAL
    log_level: str = "info"
    config_file: Path | None = None  # where `config` came from: reloaded live
    config_poll: float = WATCH_INTERVAL  # seconds between looks at it (0: SIGHUP only)
    workers: int = 1  # processes serving the same listeners and data directory
    worker: Worker | None = None  # set in each of them by workers.py


def _with_certificates(app: web.Application, certificates: TlsCertificates) -> None:
    """Load the certificates (TlsError if there are none) and watch them for the app's life."""

    async def watch(app: web.Application) -> AsyncIterator[None]:
        await certificates.start()
        yield
        await certificates.close()

    app.cleanup_ctx.insert(0, watch)


async def _serve(options: ServeOptions) -> None:
    certificates = (TlsCertificates(options.certs, reload_interval=options.tls_reload)
                    if options.tls_listens else None)
    https_port = options.tls_listens[0][1] if certificates and options.redirect_http else None
    worker = options.worker
    app = create_app(options.config, options.data_dir,
                     serve_metrics=options.metrics_listen is None, https_port=https_port,
                     config_file=options.config_file, watch_interval=options.config_poll,
                     worker=worker)
    if certificates is not None:
        _with_certificates(app, certificates)
    if worker is not None:
        app.on_response_prepare.append(_worker_header(os.getpid()))
    server_limits = options.config.limits.server
    guard = listen.ConnectionGuard(app[LIVE], listen.max_connections(
        server_limits, listen.raise_descriptor_limit()), app[METRICS])
    listen.quiet_accept_errors(asyncio.get_running_loop())
    runners = [web.AppRunner(app, access_log=None, **listen.handler_options(server_limits))]
    await runners[0].setup()
    try:
        sites = _sites(options, runners[0], guard, certificates)
        for site in sites:
            await site.start()
        if options.metrics_listen is not None:
            runners.append(web.AppRunner(admin.metrics_app(app[METRICS]), access_log=None))
            await runners[-1].setup()
            if worker is None:
                await web.TCPSite(runners[-1], *options.metrics_listen).start()
            for sock in worker.metrics if worker is not None else ():
                await web.SockSite(runners[-1], sock).start()
        log.info("serving %d routes on %s, data in %s", len(options.config.routes),
                 ", ".join([f"http://{h}:{p}" for h, p in options.listens] +
                           [f"https://{h}:{p}" for h, p in options.tls_listens]),
                 options.data_dir)
        await _until_stopped(certificates, app[RELOADER],
                             ready=worker.ready if worker is not None else None)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        guard.close()


def _sites(options: ServeOptions, runner: web.AppRunner, guard: listen.ConnectionGuard,
           certificates: TlsCertificates | None) -> list[web.SockSite]:
    """The client listeners: bound here, or (a worker) the supervisor's sockets."""
    tls = {"ssl_context": certificates.context} if certificates is not None else {}
    if options.worker is not None:
        return (listen.adopted_sites(runner, options.worker.plain, guard)
                + listen.adopted_sites(runner, options.worker.tls, guard, **tls))
    sites = [site for host, port in options.listens
             for site in listen.guarded_sites(runner, host, port, guard)]
    for host, port in options.tls_listens:
        sites += listen.guarded_sites(runner, host, port, guard, **tls)
    return sites


def _worker_header(pid: int) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """X-Gateway-Worker: which worker process answered (operators, and the tests that
    prove every worker serves)."""
    value = str(pid)

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Gateway-Worker"] = value

    return add


async def _until_stopped(certificates: TlsCertificates | None, reloader: Reloader, *,
                         ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; `ready()` once the signals are handled (a worker tells
    its supervisor, which may send SIGHUP from then on)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def hangup() -> None:
        # SIGHUP is "reload", never "stop", whatever is listening.
        if certificates is not None:
            certificates.reload_soon()
        reloader.reload_soon("SIGHUP")
        log.info("SIGHUP: reloading %s%s", reloader.source or "(no config file)",
                 " and looking at the certificates again" if certificates else "")

    loop.add_signal_handler(signal.SIGHUP, hangup)
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def run(options: ServeOptions) -> None:
    """Serve until SIGINT or SIGTERM. Raises TlsError when certs/ holds no certificate."""
    listener = start_logging(options.log_level)
    try:
        asyncio.run(_serve(options))
    finally:
        listener.stop()
