"""The composition root, first half: builds the app (live config, store, index, cache,
upstreams, pipeline, handlers). run.py runs it.

The only place that wires parts together; nothing here runs at import time.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from yarl import URL

from .. import admin, api, pipeline, proxy
from ..api import internal as replica_flights
from ..cache import BlobStore, Cache, FsStore, MemoryIndex, ProcessDir
from ..cache.contents_sqlite import SqliteContents
from ..cache.coordinate import Coordinator, InProcess
from ..cache.coordinate_files import FileCoordinator
from ..cache.pinning import PinKeeper
from ..config import Config, Route
from ..config import redis as redis_config
from ..config.storage import check_reload
from ..looplag import LoopLag
from ..metrics import Metrics
from ..pipeline.users import Logins
from ..reload import WATCH_INTERVAL, Live, Reloader, secret_files
from ..upstream import Upstream
from ..upstream_pool import UpstreamPool
from .lane import LANE, RegistryLane

if TYPE_CHECKING:
    from ..cache.s3 import S3Store

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
               worker: Worker | None = None,
               access_log: Callable[[str], None] | None = None,
               internal_url: str | None = None) -> web.Application:
    """The gateway as one aiohttp app. `https_port`: plain HTTP is redirected there. `clock`
    (wall seconds) drives every TTL. `config_file`: reloaded on SIGHUP and when it changes
    (looked at every `watch_interval` s; 0: never). `limits`: the buckets. `worker`: one of
    several processes on this data directory. `internal_url`: other replicas reach us there."""
    metrics = Metrics()
    live = Live(config)
    cache, remote = _build_cache(config, Path(data_dir), metrics, clock, live, worker,
                                 internal_url)
    limits = limits or pipeline.ClientLimits()
    upstreams = UpstreamPool(_upstream_factory(metrics, clock, limits, live))
    # Logins outlive config swaps; the forward proxy's connections use them and this app.
    forward = proxy.ForwardProxy(live, metrics, logins=(logins := Logins()))
    stages = pipeline.build(live, metrics, https_port=https_port, logins=logins,
                            limits=limits, proxied=forward.connections.lookup,
                            access_log=access_log, internal=_replica_check(cache))
    app = web.Application(middlewares=stages.middlewares, client_max_size=1 << 20)
    current: Callable[[], Config] = live  # admin's view of the running config
    app[CURRENT] = current
    app[LIVE] = live
    app[METRICS] = metrics
    app[api.SERVICES] = api.Services(cache, upstreams)
    pins = PinKeeper(config, cache, upstreams, metrics)
    app[RELOADER] = reloader = Reloader(live, upstreams, metrics, source=config_file,
                                        interval=watch_interval)
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
        if cache.primary:  # pinned images are fetched once per data directory
            pins.start()
        await reloader.start()
        yield
        await reloader.close()
        await pins.close()
        await cache.close()
        await upstreams.close()

    app.cleanup_ctx.extend((watch_loop, *_opened(remote), lifecycle))
    pulls = _add_status(app, live, cache, data_dir)  # after lifecycle: ready once started
    _add_handlers(app, stages, serve_metrics, pulls, forward, worker)
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


def _build_cache(config: Config, data_dir: Path, metrics: Metrics,
                 clock: Callable[[], float], live: Live, worker: Worker | None,
                 internal_url: str | None) -> tuple[Cache, S3Store | None]:
    """The store (`storage:`), the sqlite catalogue; with workers, single flight across
    them and the once-per-data-directory work in the primary one; with `redis:`, single
    flight across replicas over that."""
    primary = worker is None or worker.index == 0
    spool = ProcessDir(data_dir / ".spool")
    store, remote = _store(config, data_dir, spool, live)
    contents = SqliteContents(data_dir, clock=clock, metrics=metrics, store_files=not remote,
                              primary=primary)
    coordinator: Coordinator = FileCoordinator(data_dir) if worker is not None else InProcess()

    async def keep_redis(new: Config) -> None:  # built once: a change would not apply
        redis_config.check_reload(config.redis, new.redis, new.source)

    live.check_before_swap(keep_redis)
    if not config.redis.enabled:
        return Cache(config, data_dir, store, MemoryIndex(clock), contents, metrics, spool,
                     clock, coordinator=coordinator, primary=primary), remote
    # Replicas: redis loads only here.
    from ..cache.coordinate_redis import RedisCoordinator
    from ..cache.index_redis import RedisIndex
    from ..cache.usage_redis import ReplicaUsage

    advertise = config.redis.advertise or URL(internal_url or "http://127.0.0.1:5000")
    replicas = RedisCoordinator(config.redis, coordinator, advertise, metrics)
    cache = Cache(config, data_dir, store,
                  RedisIndex(config.redis.prefix, lambda: replicas.client, clock), contents,
                  metrics, spool, clock, coordinator=replicas, primary=primary)
    if remote is not None:  # the cap bounds the whole bucket
        cache.evictor.elsewhere = ReplicaUsage(config.redis.prefix, replicas.advertise,
                                               lambda: replicas.client)
    return cache, remote


def _replica_check(cache: Cache) -> Callable[[web.Request], bool] | None:
    """Whether a request to /_gateway/internal/ is signed by a replica (`redis:`)."""
    coordinator = cache.coordinator
    verify = getattr(coordinator, "verify", None)
    if verify is None:
        return None

    def check(request: web.Request) -> bool:
        return bool(verify(request.method, request.path_qs,
                           request.headers.get("X-Gateway-Replica")))

    return check


def _store(config: Config, data_dir: Path, spool: ProcessDir,
           live: Live) -> tuple[BlobStore, S3Store | None]:
    """`storage:`: the data directory (default), or an S3 bucket (opened and closed with
    the app). A reload may change its keys and redirects, never where it is."""
    if config.storage.type != "s3":
        async def keep_place(new: Config) -> None:
            check_reload(config.storage, new.storage, new.source)

        live.check_before_swap(keep_place)
        return FsStore(data_dir, spool.path), None
    from ..cache.s3 import S3Store  # botocore loads only for S3

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


def _add_handlers(app: web.Application, stages: pipeline.Pipeline, serve_metrics: bool,
                  pulls: admin.Pulls, forward: proxy.ForwardProxy,
                  worker: Worker | None) -> None:
    """The routes, the one `on_response_prepare` receiver, and the registry lane (which
    runs that receiver too). A worker's answers carry X-Gateway-Worker: which worker
    process answered (operators, and the tests that prove every worker serves)."""
    always = (("X-Gateway-Worker", str(os.getpid())),) if worker is not None else ()
    # One hook for every answer: each signal receiver is a coroutine per response.
    prepared = pipeline.on_prepare(pulls.count, *(_header(*h) for h in always))
    app.on_response_prepare.append(prepared)
    app[LANE] = RegistryLane(stages, app[api.SERVICES], prepared, pulls.pulled, always)
    router = app.router
    proxy.add_routes(app, forward)  # /_gateway/ca.crt, and the CA loaded at start
    replica_flights.add_routes(app)  # replicas' flights (refused unless a replica signed)
    for path in ("/v2", "/v2/"):
        router.add_get(path, api.base, allow_head=False)
        router.add_route("HEAD", path, api.base)
    router.add_get("/v2/{tail:.+}", api.dispatch, allow_head=False)
    router.add_route("HEAD", "/v2/{tail:.+}", api.dispatch)
    admin.add_routes(app, serve_metrics=serve_metrics)
    router.add_route("*", "/{tail:.*}", admin.not_found)


def _header(name: str, value: str) -> Callable[[web.Request, web.StreamResponse, object],
                                               None]:
    def add(request: web.Request, response: web.StreamResponse, state: object) -> None:
        response.headers[name] = value

    return add


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
    proxy: tuple[socket.socket, ...] = ()  # --proxy-listen
