"""The command line: `serve`, `check` and `init`; `client`, `doctor` and `warm` (gateway/client/).

Parses arguments and hands them over: the server side is built and run by
server.py, the client-machine tools by gateway/client/.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__, server, workers
from . import init as init_command
from .client import commands as client_commands
from .config import load_config_file
from .errors import ConfigError
from .maintenance import add_commands as add_cache_commands
from .net import parse_hostport
from .proxy import AuthorityError
from .proxy.commands import add_commands as add_ca_commands
from .reload import WATCH_INTERVAL, check_file
from .tls import RELOAD_INTERVAL, TlsError


def _listen(value: str) -> tuple[str, int]:
    try:
        return parse_hostport(value)
    except ValueError as exc:  # argparse keeps the message of ArgumentTypeError only
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--workers wants a whole number of at least 1, "
                                         f"not {value!r}")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="registry-gateway", description=(
        "A read-only OCI registry mirror for many upstreams, routed by Host."))
    parser.add_argument("--version", action="version", version=f"registry-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the registry API")
    serve.add_argument("--routes", "--config", dest="routes", default="routes.yaml",
                       help="route table (default routes.yaml); reloaded on SIGHUP and "
                            "when it changes")
    serve.add_argument("--config-poll", type=float, default=WATCH_INTERVAL, metavar="SECONDS",
                       help=f"how often to look for a changed route table (default "
                            f"{WATCH_INTERVAL:g}; 0: only on SIGHUP)")
    serve.add_argument("--data-dir", default="data", help="cache directory (default ./data)")
    serve.add_argument("--listen", action="append", type=_listen, metavar="HOST:PORT",
                       help="address to listen on; repeatable (default 127.0.0.1:5000)")
    serve.add_argument("--metrics-listen", type=_listen, metavar="HOST:PORT",
                       help="serve /metrics here only, instead of on every listener")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--workers", type=_workers, default=os.cpu_count() or 1, metavar="N",
                       help="processes serving the same listeners and data directory "
                            "(default: the number of cores; 1: one process, no supervisor)")
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

    serve.add_argument("--proxy-listen", action="append", type=_listen, metavar="HOST:PORT",
                       help="also serve as an HTTP forward proxy (CONNECT) for clients with "
                            "HTTPS_PROXY; repeatable (see docs/proxy-mode.md)")

    check = sub.add_parser("check", help="validate a route table (as a reload would: "
                           "secrets resolved) and print the routes; exit 1 if invalid")
    check.add_argument("file", nargs="?", help="the route table (default routes.yaml)")
    check.add_argument("--config", "--routes", dest="routes", default="routes.yaml",
                       help="the route table, as `serve --config` takes it")

    client_commands.add_commands(sub)
    client_commands.add_doctor(sub)
    client_commands.add_warm(sub)
    add_cache_commands(sub)
    init_command.add_command(sub)
    add_ca_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # These read their own inputs.
    if args.command in ("client", "doctor", "warm", "cache", "init", "ca"):
        return int(args.run(args, os.environ))
    if args.command == "check":
        ok, text = check_file(Path(args.file or args.routes))
        print(text if ok else f"registry-gateway: {text}", file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    try:
        config = load_config_file(args.routes)
    except ConfigError as exc:
        print(f"registry-gateway: {exc}", file=sys.stderr)
        return 1
    if args.redirect_http and not args.tls_listen:
        print("registry-gateway: --redirect-http needs a --tls-listen address", file=sys.stderr)
        return 1
    listens = args.listen or ([] if args.tls_listen else [("127.0.0.1", 5000)])
    options = server.ServeOptions(
        config, Path(args.data_dir), listens=tuple(listens),
        tls_listens=tuple(args.tls_listen or ()), metrics_listen=args.metrics_listen,
        certs=Path(args.certs), redirect_http=args.redirect_http,
        tls_reload=args.tls_reload, log_level=args.log_level,
        config_file=Path(args.routes), config_poll=args.config_poll,
        proxy_listens=tuple(args.proxy_listen or ()), workers=args.workers)
    try:
        if options.workers > 1:  # a supervisor and its workers (gateway/workers.py)
            return workers.run(options)
        server.run(options)
    except TlsError as exc:
        print(f"registry-gateway: certificates: {exc}", file=sys.stderr)
        return 1
    except AuthorityError as exc:
        print(f"registry-gateway: forward_proxy.ca: {exc}", file=sys.stderr)
        return 1
    return 0
