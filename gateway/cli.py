"""The command line: `serve` and `check`; `client` and `doctor` (clientconf.py, doctor.py).

Parses arguments, loads the config, configures logging and runs the server; the
only module that reads the environment (through `load_config_file`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from . import __version__, clientconf, doctor
from .config import Config, load_config_file
from .errors import ConfigError
from .server import MAX_LINE, METRICS, create_app, create_metrics_app
from .tls import RELOAD_INTERVAL, TlsCertificates, TlsError


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "gateway.access":
            return record.getMessage()
        data = {"level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage()}
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r}: want HOST:PORT, e.g. 127.0.0.1:5000")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="registry-gateway", description=(
        "A read-only OCI registry mirror for many upstreams, routed by Host."))
    parser.add_argument("--version", action="version", version=f"registry-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the registry API")
    serve.add_argument("--routes", default="routes.yaml", help="route table (default routes.yaml)")
    serve.add_argument("--data-dir", default="data", help="cache directory (default ./data)")
    serve.add_argument("--listen", action="append", type=_listen, metavar="HOST:PORT",
                       help="address to listen on; repeatable (default 127.0.0.1:5000)")
    serve.add_argument("--metrics-listen", type=_listen, metavar="HOST:PORT",
                       help="serve /metrics here only, instead of on every listener")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--tls-listen", action="append", type=_listen, metavar="HOST:PORT",
                       help="address to serve HTTPS on; repeatable (certificates from --certs)")
    serve.add_argument("--certs", default="certs", help="certificate directory: a wildcard "
                       "or per-host certificates, chosen by SNI, reloaded when replaced "
                       "(default ./certs; see certs/README.md)")
    serve.add_argument("--redirect-http", action="store_true",
                       help="plain --listen addresses redirect to HTTPS instead of serving")
    serve.add_argument("--tls-reload", type=float, default=RELOAD_INTERVAL, metavar="SECONDS",
                       help=f"how often to look for replaced certificates (default "
                            f"{RELOAD_INTERVAL:g}; SIGHUP looks at once)")

    check = sub.add_parser("check", help="validate a route table and print the routes")
    check.add_argument("routes", nargs="?", default="routes.yaml")

    clientconf.add_commands(sub)
    doctor.add_command(sub)
    return parser


def _describe(config: Config) -> str:
    lines = [f"{config.source}: {len(config.routes)} routes, default route "
             f"{config.default_route or '(none)'}"]
    for route in config.routes:
        hosts = list(route.hosts)
        if route.label:
            hosts += [f"{route.label}.{d}" for d in config.base_domains] or [f"{route.label}.*"]
        credentials = route.upstream.credentials
        auth = f", credentials for {credentials.username}" if credentials else ""
        lines.append(f"  {route.name:<20} -> {route.upstream.url}  hosts: "
                     f"{', '.join(hosts) or '-'}  tag_ttl: {route.cache.tag_ttl:g}s{auth}")
    return "\n".join(lines)


async def _serve(config: Config, data_dir: Path, listens: list[tuple[str, int]],
                 metrics_listen: tuple[str, int] | None, *,
                 tls_listens: list[tuple[str, int]] | None = None, certs: Path = Path("certs"),
                 redirect_http: bool = False, tls_reload: float = RELOAD_INTERVAL) -> None:
    tls_listens = tls_listens or []
    certificates = None
    if tls_listens:
        certificates = TlsCertificates(certs, reload_interval=tls_reload)
        await certificates.start()  # TlsError when certs/ holds no usable certificate
    https_port = tls_listens[0][1] if tls_listens and redirect_http else None
    app = create_app(config, data_dir, serve_metrics=metrics_listen is None,
                     https_port=https_port)
    runner = web.AppRunner(app, access_log=None, max_line_size=MAX_LINE, max_field_size=MAX_LINE)
    await runner.setup()
    runners = [runner]
    for host, port in listens:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    for host, port in tls_listens:
        assert certificates is not None
        await web.TCPSite(runner, host, port, backlog=1024,
                          ssl_context=certificates.context).start()
    if metrics_listen is not None:
        metrics_runner = web.AppRunner(create_metrics_app(app[METRICS]), access_log=None)
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, *metrics_listen).start()
        runners.append(metrics_runner)
    logging.getLogger("gateway").info(
        "serving %d routes on %s, data in %s", len(config.routes),
        ", ".join([f"http://{h}:{p}" for h, p in listens] +
                  [f"https://{h}:{p}" for h, p in tls_listens]), data_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if certificates is not None:
        loop.add_signal_handler(signal.SIGHUP, certificates.reload_soon)
    try:
        await stop.wait()
    finally:
        for r in reversed(runners):
            await r.cleanup()
        if certificates is not None:
            await certificates.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("client", "doctor"):  # client machines: no routes.yaml
        return int(args.run(args, os.environ))
    try:
        config = load_config_file(args.routes)
    except ConfigError as exc:
        print(f"registry-gateway: {exc}", file=sys.stderr)
        return 1
    if args.command == "check":
        print(_describe(config))
        return 0
    if args.redirect_http and not args.tls_listen:
        print("registry-gateway: --redirect-http needs a --tls-listen address", file=sys.stderr)
        return 1
    _setup_logging(args.log_level)
    listens = args.listen or ([] if args.tls_listen else [("127.0.0.1", 5000)])
    try:
        asyncio.run(_serve(config, Path(args.data_dir), listens, args.metrics_listen,
                           tls_listens=args.tls_listen, certs=Path(args.certs),
                           redirect_http=args.redirect_http, tls_reload=args.tls_reload))
    except TlsError as exc:
        print(f"registry-gateway: certificates: {exc}", file=sys.stderr)
        return 1
    return 0
