"""`registry-gateway ca init`: the forward proxy's CA, name-constrained to the registry
hosts of the routes (or of every preset) plus `--permit` names, written to a directory.

Parses arguments and reports; the certificate work is authority.py's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import PRESETS, parse_config_file
from ..errors import ConfigError
from ..routing import registry_hosts
from .authority import AuthorityError, write_ca

DEFAULT_DIR = Path("certs/proxy-ca")


def _names(args: argparse.Namespace) -> list[str]:
    names: list[str] = []
    routes = Path(args.routes) if args.routes else None
    if routes is not None and routes.exists():
        config = parse_config_file(routes)
        for route in config.routes:
            names += registry_hosts(route)
    elif args.routes_given:
        raise ConfigError("no such file", file=str(routes))
    else:  # no route table yet: the hosts of every preset registry
        for name, preset in PRESETS.items():
            names += [name, *preset.aliases]
    return [*names, *(n.lower() for n in args.permit or ())]


def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        names = sorted(set(_names(args)))
        path = write_ca(Path(args.dir), names, force=args.force)
    except (ConfigError, AuthorityError) as exc:
        print(f"registry-gateway ca: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"registry-gateway ca: cannot write {args.dir}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {path} and {path.with_name('ca.key')} (keep the key secret: 0600)")
    print("the CA may only sign for these names and their subdomains (NameConstraints, "
          "critical):")
    print("".join(f"  {name}\n" for name in names), end="")
    print(f"set in routes.yaml:\n  forward_proxy:\n    ca: {args.dir}\nand install {path} on "
          "client machines: registry-gateway client docker|containerd --proxy URL")
    return 0


def add_commands(sub: Any) -> None:
    """`ca init` on the CLI's subparsers."""
    ca = sub.add_parser("ca", help="the forward proxy's certificate authority")
    actions = ca.add_subparsers(dest="action", required=True)
    init = actions.add_parser("init", help="make a CA limited to the registry host names "
                              "(NameConstraints) for `serve --proxy-listen`")
    init.add_argument("--dir", default=str(DEFAULT_DIR),
                      help=f"where to write ca.crt and ca.key (default {DEFAULT_DIR})")
    init.add_argument("--routes", "--config", dest="routes", default=None,
                      help="permit the registry hosts of this route table's routes (default "
                      "routes.yaml if it exists, else every preset registry)")
    init.add_argument("--permit", action="append", metavar="NAME",
                      help="also permit NAME and its subdomains; repeatable")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(run=_run_with_defaults)


def _run_with_defaults(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    args.routes_given = args.routes is not None
    if args.routes is None:
        args.routes = "routes.yaml"
    return _run(args, env)
