"""The composition root, second half: runs the app of app.py (listeners, TLS with its
reloader, the forward proxy's listeners, signals, logging), in one process or as one
worker of `serve --workers` (workers.py binds the sockets then).

The command line only fills in `ServeOptions`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .. import admin, listen, proxy
from ..config import Config
from ..eventloop import Loop
from ..logs import start_logging
from ..reload import WATCH_INTERVAL, Reloader
from ..tls import RELOAD_INTERVAL, CertTable, TlsCertificates
from .app import LIVE, METRICS, RELOADER, Worker, create_app
from .runner import GatewayRunner

log = logging.getLogger("gateway")
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
    workers: int = 1  # processes serving the same listeners and data directory
    worker: Worker | None = None  # set in each of them by workers.py


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


async def _serve(options: ServeOptions, access_log: Callable[[str], None]) -> None:
    certificates = (TlsCertificates(options.certs, reload_interval=options.tls_reload)
                    if options.tls_listens else None)
    https_port = options.tls_listens[0][1] if certificates and options.redirect_http else None
    worker = options.worker
    app = create_app(options.config, options.data_dir,
                     serve_metrics=options.metrics_listen is None, https_port=https_port,
                     config_file=options.config_file, watch_interval=options.config_poll,
                     worker=worker, access_log=access_log,
                     internal_url=_internal_url(options))
    if certificates is not None:
        _with_certificates(app, certificates)
    server_limits = options.config.limits.server
    guard = listen.ConnectionGuard(app[LIVE], listen.max_connections(
        server_limits, listen.raise_descriptor_limit()), app[METRICS])
    listen.quiet_accept_errors(asyncio.get_running_loop())
    runners: list[web.AppRunner] = [
        GatewayRunner(app, access_log=None, **listen.handler_options(server_limits))]
    await runners[0].setup()
    proxies: list[asyncio.Server] = []
    try:
        sites = _sites(options, runners[0], guard, certificates)
        for site in sites:
            await site.start()
        proxies += await _start_proxy(app, runners[0], options.proxy_listens, guard, worker)
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
        for listener in proxies:
            listener.close()
        for runner in reversed(runners):
            await runner.cleanup()
        guard.close()


async def _start_proxy(app: web.Application, runner: web.AppRunner,
                       addresses: tuple[Address, ...], guard: listen.ConnectionGuard,
                       worker: Worker | None) -> list[asyncio.Server]:
    """The forward-proxy listeners (same connection caps; a worker's are bound by the
    supervisor); intercepted connections are handed to `runner`'s protocol factory."""
    if not addresses:
        return []
    forward = app[proxy.PROXY]
    assert runner.server is not None
    forward.server = runner.server
    loop = asyncio.get_running_loop()
    listeners = []
    sockets = (listen.adopted_sockets(worker.proxy, guard) if worker is not None else
               [sock for host, port in addresses
                for sock in listen.listening_sockets(host, port, guard)])
    for sock in sockets:
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


def _internal_url(options: ServeOptions) -> str | None:
    """Where other replicas reach this one if `redis.advertise` does not say: the first
    plain listener (a wildcard address: this host's name)."""
    if not options.listens:
        return None
    host, port = options.listens[0]
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


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
        with asyncio.Runner(loop_factory=Loop) as runner:
            runner.run(_serve(options, listener.line))
    finally:
        listener.stop()
