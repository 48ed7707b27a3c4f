"""The composition root: builds the app (live config, store, index, cache, upstreams,
pipeline, handlers) and runs it (listeners, TLS with its reloader, signals, logging).

The only place that wires parts together; nothing here runs at import time, and the
command line only fills in `ServeOptions`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from . import admin, api, listen, pipeline, proxy
from .cache import BlobStore, Cache, FsStore, MemoryIndex, ProcessDir
from .cache.contents_sqlite import SqliteContents
from .cache.pinning import PinKeeper
from .config import Config, Route
from .config.storage import check_reload
from .logs import start_logging
from .looplag import LoopLag
from .metrics import Metrics
from .pipeline.users import Logins
from .reload import WATCH_INTERVAL, Live, Reloader, secret_files
from .tls import RELOAD_INTERVAL, CertTable, TlsCertificates
from .upstream import Upstream
from .upstream_pool import UpstreamPool

if TYPE_CHECKING:
    from .cache.s3 import S3Store

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
               limits: pipeline.ClientLimits | None = None) -> web.Application:
    """The gateway as one aiohttp app. `https_port`: plain HTTP is redirected there.
    `clock` (wall seconds) drives every TTL. `config_file`: reloaded on SIGHUP and when it
    changes (looked at every `watch_interval` s; 0: never). `limits`: the buckets."""
    metrics = Metrics()
    live = Live(config)
    data_dir = Path(data_dir)
    spool = ProcessDir(data_dir / ".spool")
    store, remote = _store(config, data_dir, spool, live)
    contents = SqliteContents(data_dir, clock=clock, metrics=metrics, store_files=not remote)
    cache = Cache(config, data_dir, store, MemoryIndex(clock), contents, metrics, spool, clock)
    limits = limits or pipeline.ClientLimits()
    upstreams = UpstreamPool(_upstream_factory(metrics, clock, limits, live))

    # Logins outlive config swaps; the forward proxy's connections use them and this app.
    forward = proxy.ForwardProxy(live, metrics, logins=(logins := Logins()))
    app = web.Application(middlewares=pipeline.build(
        live, metrics, https_port=https_port, logins=logins, limits=limits,
        proxied=forward.connections.lookup), client_max_size=1 << 20)
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
        pins.start()
        await reloader.start()
        yield
        await reloader.close()
        await pins.close()
        await cache.close()
        await upstreams.close()

    app.cleanup_ctx.extend((watch_loop, *_opened(remote), lifecycle))
    pulls = _add_status(app, live, cache, data_dir)  # after lifecycle: ready once started
    _add_handlers(app, serve_metrics, pulls, forward)
    return app


def _add_status(app: web.Application, live: Live, cache: Cache,
                data_dir: Path) -> admin.Pulls:
    """/readyz (data directory, store; ready from the end of start-up to the beginning of
    shutdown) and the status page's sources; the pull counter sees every answer."""
    readiness = admin.Readiness([
        ("data_dir", admin.writable(data_dir)),
        ("storage", admin.store_reachable(cache.store, data_dir)),
    ])
    pulls = admin.Pulls()
    app[admin.READINESS] = readiness
    app[admin.STATUS] = admin.Sources(app[METRICS], live, cache.blobs.flights.items, pulls,
                                      readiness)

    async def serving(app: web.Application) -> AsyncIterator[None]:
        readiness.serving = True
        yield
        await readiness.close()

    async def stopping(app: web.Application) -> None:
        # Listeners are closed; connections still open while transfers finish hear 503.
        readiness.serving = False

    app.cleanup_ctx.append(serving)
    app.on_shutdown.append(stopping)
    return pulls


def _store(config: Config, data_dir: Path, spool: ProcessDir,
           live: Live) -> tuple[BlobStore, S3Store | None]:
    """`storage:`: the data directory (default), or an S3 bucket (opened and closed with
    the app). A reload may change its keys and redirects, never where it is."""
    if config.storage.type != "s3":
        async def keep_place(new: Config) -> None:
            check_reload(config.storage, new.storage, new.source)

        live.check_before_swap(keep_place)
        return FsStore(data_dir, spool.path), None
    from .cache.s3 import S3Store  # botocore loads only for S3

    store = S3Store(config.storage)

    async def check(new: Config) -> None:
        check_reload(store.settings, new.storage, new.source)
        await store.use_keys(new.storage)

    live.check_before_swap(check)
    live.subscribe(lambda _old, new: store.reconfigure(new.storage))
    return store, store


def _opened(remote: S3Store | None) -> tuple[Callable[[web.Application],
                                                      AsyncIterator[None]], ...]:
    """The remote store's client, open before the cache opens and after it closes."""
    if remote is None:
        return ()

    async def open_store(app: web.Application) -> AsyncIterator[None]:
        await remote.open()
        yield
        await remote.close()

    return (open_store,)


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


def _add_handlers(app: web.Application, serve_metrics: bool, pulls: admin.Pulls,
                  forward: proxy.ForwardProxy) -> None:
    # One hook for every answer: each signal receiver is a coroutine per response.
    app.on_response_prepare.append(pipeline.on_prepare(pulls.count))
    router = app.router
    proxy.add_routes(app, forward)  # /_gateway/ca.crt, and the CA loaded at start
    for path in ("/v2", "/v2/"):
        router.add_get(path, api.base, allow_head=False)
        router.add_route("HEAD", path, api.base)
    router.add_get("/v2/{tail:.+}", api.dispatch, allow_head=False)
    router.add_route("HEAD", "/v2/{tail:.+}", api.dispatch)
    admin.add_routes(app, serve_metrics=serve_metrics)
    router.add_route("*", "/{tail:.*}", admin.not_found)


Address = tuple[str, int]


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
    proxy_listens: tuple[Address, ...] = ()  # forward proxy (CONNECT) addresses


def _relative(path: Path, directory: Path) -> str:
    try:
        return str(path.relative_to(directory))
    except ValueError:  # a symlink's target outside certs/ (certbot's live/ -> archive/)
        return str(path)


def _with_certificates(app: web.Application, certificates: TlsCertificates) -> None:
    """Load the certificates (TlsError if there are none) and watch them for the app's life."""

    def expiry(table: CertTable) -> None:
        app[METRICS].certificates_loaded(
            (_relative(c.chain_path, certificates.directory),
             (c.names or c.addresses or ("-",))[0], c.not_after.timestamp())
            for c in table.certificates)

    async def watch(app: web.Application) -> AsyncIterator[None]:
        certificates.on_change(expiry)
        await certificates.start()
        yield
        await certificates.close()

    app.cleanup_ctx.insert(0, watch)


async def _serve(options: ServeOptions) -> None:
    certificates = (TlsCertificates(options.certs, reload_interval=options.tls_reload)
                    if options.tls_listens else None)
    https_port = options.tls_listens[0][1] if certificates and options.redirect_http else None
    app = create_app(options.config, options.data_dir,
                     serve_metrics=options.metrics_listen is None, https_port=https_port,
                     config_file=options.config_file, watch_interval=options.config_poll)
    if certificates is not None:
        _with_certificates(app, certificates)
    server_limits = options.config.limits.server
    guard = listen.ConnectionGuard(app[LIVE], listen.max_connections(
        server_limits, listen.raise_descriptor_limit()), app[METRICS])
    listen.quiet_accept_errors(asyncio.get_running_loop())
    runners = [web.AppRunner(app, access_log=None, **listen.handler_options(server_limits))]
    await runners[0].setup()
    proxies: list[asyncio.Server] = []
    try:
        sites = [site for host, port in options.listens
                 for site in listen.guarded_sites(runners[0], host, port, guard)]
        for host, port in options.tls_listens:
            assert certificates is not None
            sites += listen.guarded_sites(runners[0], host, port, guard,
                                          ssl_context=certificates.context)
        for site in sites:
            await site.start()
        proxies += await _start_proxy(app, runners[0], options.proxy_listens, guard)
        if options.metrics_listen is not None:
            runners.append(web.AppRunner(admin.metrics_app(app[METRICS]), access_log=None))
            await runners[-1].setup()
            await web.TCPSite(runners[-1], *options.metrics_listen).start()
        log.info("serving %d routes on %s, data in %s", len(options.config.routes),
                 ", ".join([f"http://{h}:{p}" for h, p in options.listens] +
                           [f"https://{h}:{p}" for h, p in options.tls_listens]),
                 options.data_dir)
        await _until_stopped(certificates, app[RELOADER])
    finally:
        for listener in proxies:
            listener.close()
        for runner in reversed(runners):
            await runner.cleanup()
        guard.close()


async def _start_proxy(app: web.Application, runner: web.AppRunner,
                       addresses: tuple[Address, ...],
                       guard: listen.ConnectionGuard) -> list[asyncio.Server]:
    """The forward-proxy listeners (same connection caps); intercepted connections are
    handed to `runner`'s protocol factory."""
    if not addresses:
        return []
    forward = app[proxy.PROXY]
    assert runner.server is not None
    forward.server = runner.server
    loop = asyncio.get_running_loop()
    listeners = []
    for host, port in addresses:
        for sock in listen.listening_sockets(host, port, guard):
            listeners.append(await loop.create_server(forward.protocol, sock=sock))
    where = ", ".join(f"http://{h}:{p}" for h, p in addresses)
    if forward.authority is None:
        log.warning("forward proxy on %s: no forward_proxy.ca, so allowed registry hosts are "
                    "tunnelled byte for byte and NOTHING IS CACHED (registry-gateway ca init)",
                    where)
    else:
        log.info("forward proxy on %s: registry hosts answered by the gateway (CA %s)", where,
                 forward.authority.certificate.subject.rfc4514_string())
    return listeners


async def _until_stopped(certificates: TlsCertificates | None, reloader: Reloader) -> None:
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
