"""`registry-gateway init --domain example.com`: write a commented routes.yaml for a domain
and print the next steps (DNS, certificate, service, clients) in English and 简体中文.

Never overwrites a file without --force and never touches anything but that one file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from .routes import mirror_hosts, routes_yaml
from .steps import next_steps

__all__ = ["add_command", "mirror_hosts", "next_steps", "routes_yaml", "valid_domain"]

# A DNS name of at least two labels (LDH labels, RFC 1123), no wildcard, no scheme.
_DOMAIN = re.compile(r"^(?=.{4,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")


def valid_domain(value: str) -> str:
    domain = value.strip().lower().rstrip(".")
    if not _DOMAIN.match(domain) or domain.endswith("-"):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a domain name: give the base domain, e.g. example.com "
            "(the mirror hosts become hub.example.com, ghcr.example.com, ...)")
    return domain


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = sub.add_parser("init", help="write a commented routes.yaml for a domain and "
                          "print the next steps (DNS, certificate, service, clients)")
    init.add_argument("--domain", required=True, type=valid_domain,
                      help="the base domain: hub.DOMAIN, ghcr.DOMAIN, ... become mirrors")
    init.add_argument("--output", "-o", default="routes.yaml", metavar="PATH",
                      help="where to write the route table (default ./routes.yaml; "
                           "- prints it, and the steps go to stderr)")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.set_defaults(run=run)


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    domain: str = args.domain
    if args.output == "-":
        sys.stdout.write(routes_yaml(domain))
        print(next_steps(domain, Path("routes.yaml")), file=sys.stderr)
        return 0
    path = Path(args.output)
    text = routes_yaml(domain, path.name)
    try:
        _write(path, text, force=args.force)
    except FileExistsError:
        print(f"registry-gateway init: {path} exists; not replacing it (--force replaces "
              "it, --output writes elsewhere)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"registry-gateway init: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(next_steps(domain, path.absolute()))
    return 0


def _write(path: Path, text: str, *, force: bool) -> None:
    """Write whole or not at all: a temporary file beside it, renamed into place (a
    running gateway that watches the file never reads half of it)."""
    if path.exists() and not force:
        raise FileExistsError(path)
    temporary = path.with_name(f".{path.name}.init-{os.getpid()}")
    try:
        with temporary.open("x", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
