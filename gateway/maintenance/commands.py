"""The `cache` subcommand on the CLI's subparsers, and running one action: read routes.yaml
(no secrets needed: only routes, caps and pins), open the data directory, report.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..cache.contents import ContentsError
from ..config import parse_config_file
from ..errors import ConfigError
from . import gc, listing, remove, verify
from .session import Session, opened

_IMAGE_HELP = ("an image as clients name it (ghcr.io/org/app:tag, ghcr.io/org/app@sha256:..., "
               "nginx:1.27 for docker.io) or a glob as in pins: (registry.k8s.io/pause:*, "
               "ghcr.io/org/*); a repository without a tag means every image of it")


async def _act(args: argparse.Namespace, session: Session) -> int:
    if args.action == "du":
        return await listing.du(session, top=args.top, as_json=args.json)
    if args.action == "ls":
        return await listing.ls(session, route=args.route, as_json=args.json)
    if args.action == "rm":
        return await remove.rm(session, args.images, dry_run=args.dry_run, as_json=args.json)
    if args.action == "gc":
        return await gc.gc(session, dry_run=args.dry_run, as_json=args.json)
    return await verify.verify(session, as_json=args.json)


async def _main(args: argparse.Namespace) -> int:
    config = parse_config_file(args.routes)
    async with opened(Path(args.data_dir), config, sys.stdout, sys.stderr) as session:
        return await _act(args, session)


def _run(args: argparse.Namespace, _env: Mapping[str, str]) -> int:
    if not Path(args.data_dir).is_dir():
        print(f"registry-gateway cache: {args.data_dir} is not a directory (--data-dir)",
              file=sys.stderr)
        return 1
    # The catalogue's warnings (a rebuild, a broken file) are the operator's to see.
    logging.basicConfig(level=logging.WARNING, format="registry-gateway cache: %(message)s")
    try:
        return asyncio.run(_main(args))
    except ConfigError as exc:
        print(f"registry-gateway cache: {exc}", file=sys.stderr)
    except ContentsError as exc:
        print(f"registry-gateway cache: {exc}", file=sys.stderr)
    return 1


def add_commands(sub: Any) -> None:
    """`cache du|ls|rm|gc|verify` on the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--routes", default="routes.yaml",
                        help="route table: routes, caps and pins (default routes.yaml)")
    common.add_argument("--data-dir", default="data", help="cache directory (default ./data)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cache = sub.add_parser("cache", help="inspect the cache in a data directory, remove "
                           "images, preview eviction, verify every file (safe while the "
                           "gateway runs)")
    actions = cache.add_subparsers(dest="action", required=True)
    du = actions.add_parser("du", parents=[common], help="usage by route and top "
                            "repositories, against the caps")
    du.add_argument("--top", type=int, default=10, help="repositories to list (default 10)")
    ls = actions.add_parser("ls", parents=[common], help="cached images with size and last "
                            "access, most recent first")
    ls.add_argument("route", nargs="?", help="only this route's images")
    rm = actions.add_parser("rm", parents=[common], help="remove images and the blobs only "
                            "they hold")
    rm.add_argument("images", nargs="+", metavar="IMAGE", help=_IMAGE_HELP)
    rm.add_argument("-n", "--dry-run", action="store_true", help="say what would go")
    collect = actions.add_parser("gc", parents=[common], help="what eviction would remove "
                                 "next to get within the caps (--dry-run)")
    collect.add_argument("--dry-run", action="store_true", help="preview only (required)")
    actions.add_parser("verify", parents=[common], help="re-hash every blob and manifest; "
                       "remove corrupt files; exit 1 if there were any")
    cache.set_defaults(run=_run)
