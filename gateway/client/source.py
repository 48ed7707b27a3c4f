"""Where the client tools learn the gateway's routes (its `/_gateway/routes` listing, a
routes.yaml, or the presets) and the TLS trust they use to ask it. Reads only what the
user names; never a secret."""

from __future__ import annotations

import argparse
import asyncio
import ssl
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from cryptography import x509

from ..wire import ROUTES_PATH, GatewayListing
from .routes_file import read_routes_file
from .target import ClientConfError, GatewayInfo, Target, probe_urls

PROXY_CA_PATH = "/_gateway/ca.crt"  # served by the gateway when forward_proxy.ca is set


def tls_context(ca: Path | None) -> ssl.SSLContext:
    """The system's trust store, plus the gateway's private CA if one is given."""
    context = ssl.create_default_context()
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    return context


def listing_refused(url: str, status: int) -> str | None:
    """What to tell the user when the gateway will not list its routes to this machine
    (its /_gateway/ endpoints answer `access.admin` addresses only), None otherwise."""
    if status not in (401, 403):
        return None
    return (f"{url} answered {status}: the gateway lists its routes only to the addresses "
            "in access.admin of its routes.yaml (default: the gateway machine itself); add "
            "this machine's address there, or pass --routes with a copy of the gateway's "
            "routes.yaml")


def info_from_listing(document: Any, source: str) -> GatewayInfo:
    """A decoded `/_gateway/routes` answer, refused with a message if it is not one."""
    try:
        listing = GatewayListing.from_json(document)
    except ValueError as exc:
        raise ClientConfError(f"{source} did not answer with a route list ({exc}); is it a "
                              "registry-gateway?") from None
    if not listing.routes:
        raise ClientConfError(f"{source} serves no routes")
    return GatewayInfo(listing, source)


async def fetch_info(target: Target, ca: Path | None, seconds: float) -> GatewayInfo:
    errors = []
    context = tls_context(ca)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds),
                                     trust_env=False) as session:
        for base in probe_urls(target):
            url = base + ROUTES_PATH
            try:
                async with session.get(url, ssl=context, allow_redirects=False) as response:
                    if response.status != 200:
                        errors.append(listing_refused(url, response.status)
                                      or f"{url}: HTTP {response.status}")
                        continue
                    document = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                errors.append(f"{url}: {exc or type(exc).__name__}")
                continue
            return info_from_listing(document, f"the gateway at {base}")
    raise ClientConfError("could not ask the gateway for its routes: " + "; ".join(errors))


def gateway_info(args: argparse.Namespace, target: Target, err: TextIO) -> GatewayInfo:
    """From --routes, --presets, or the gateway itself (the presets if it cannot say)."""
    if args.routes:
        return GatewayInfo(read_routes_file(args.routes), str(Path(args.routes)))
    if args.presets:
        return GatewayInfo.presets(target.host if target.base_domain else None)
    try:
        return asyncio.run(fetch_info(target, args.ca, args.timeout))
    except ClientConfError as exc:
        print(f"warning: {exc}\nwarning: assuming the preset routes; pass --routes "
              "routes.yaml (or fix the problem above; `registry-gateway doctor` helps)",
              file=err)
        return GatewayInfo.presets(target.host if target.base_domain else None)


async def _fetch_ca(target: Target, ca: Path | None, seconds: float) -> bytes | None:
    context = tls_context(ca)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds),
                                     trust_env=False) as session:
        for base in probe_urls(target):
            try:
                async with session.get(base + PROXY_CA_PATH, ssl=context,
                                       allow_redirects=False) as response:
                    if response.status == 200:
                        return await response.read()
            except (aiohttp.ClientError, TimeoutError):
                continue
    return None


def proxy_ca(args: argparse.Namespace, target: Target, err: TextIO) -> tuple[Path, bytes] | None:
    """The forward proxy's CA: --ca, else the gateway's /_gateway/ca.crt (public)."""
    if args.ca is not None:
        return read_ca(args.ca)
    pem = asyncio.run(_fetch_ca(target, None, args.timeout))
    if pem is None or b"BEGIN CERTIFICATE" not in pem or b"PRIVATE KEY" in pem:
        print(f"warning: no --ca and {probe_urls(target)[0]}{PROXY_CA_PATH} gave no CA "
              "certificate: the daemon will not trust an intercepting proxy", file=err)
        return None
    return Path(probe_urls(target)[0] + PROXY_CA_PATH), pem


def read_ca(path: Path | None) -> tuple[Path, bytes] | None:
    """The --ca file, checked to be CA certificates only (never a private key)."""
    if path is None:
        return None
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ClientConfError(f"cannot read the CA file {path}: {exc.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise ClientConfError(f"{path} holds no PEM certificate; --ca wants the CA that "
                              "signed the gateway's certificate")
    if b"PRIVATE KEY" in pem:
        raise ClientConfError(f"{path} contains a private key: give the CA certificate only")
    return path, pem
