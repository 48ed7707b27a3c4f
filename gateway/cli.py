"""The command line: `serve` and `check`; `client`, `doctor` and `warm` (gateway/client/).

Parses arguments and hands them over: the server side is built and run by
server.py, the client-machine tools by gateway/client/.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__, server
from .client import commands as client_commands
from .config import Config, load_config_file
from .errors import ConfigError
from .maintenance import add_commands as add_cache_commands
from .net import parse_hostport
from .tls import RELOAD_INTERVAL, TlsError


def _listen(value: str) -> tuple[str, int]:
    try:
        return parse_hostport(value)
    except ValueError as exc:  # argparse keeps the message of ArgumentTypeError only
        raise argparse.ArgumentTypeError(str(exc)) from None


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

    client_commands.add_commands(sub)
    client_commands.add_doctor(sub)
    client_commands.add_warm(sub)
    add_cache_commands(sub)
    return parser


def _describe(config: Config) -> str:
    lines = [f"{config.source}: {len(config.routes)} routes, default route "
             f"{config.default_route or '(none)'}"]
    for route in config.routes:
        hosts = list(route.hosts)
        if route.label:
            hosts += [f"{route.label}.{d}" for d in config.base_domains] or [f"{route.label}.*"]
        accounts = [account.username for account in route.upstream.pool]
        auth = f", credentials for {', '.join(accounts)}" if accounts else ""
        lines.append(f"  {route.name:<20} -> {route.upstream.url}  hosts: "
                     f"{', '.join(hosts) or '-'}  tag_ttl: {route.cache.tag_ttl:g}s{auth}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("client", "doctor", "warm", "cache"):  # they read their own inputs
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
    listens = args.listen or ([] if args.tls_listen else [("127.0.0.1", 5000)])
    try:
        server.run(server.ServeOptions(
            config, Path(args.data_dir), listens=tuple(listens),
            tls_listens=tuple(args.tls_listen or ()), metrics_listen=args.metrics_listen,
            certs=Path(args.certs), redirect_http=args.redirect_http,
            tls_reload=args.tls_reload, log_level=args.log_level))
    except TlsError as exc:
        print(f"registry-gateway: certificates: {exc}", file=sys.stderr)
        return 1
    return 0
