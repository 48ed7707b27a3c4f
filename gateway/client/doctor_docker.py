"""`doctor`'s check of the local Docker daemon: does it use the gateway as its docker.io
mirror, and does it trust the gateway's CA. Asks the daemon over its unix socket and reads
daemon.json; changes nothing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from .checkup import Checkup, Report
from .target import DOCKER_HUB, Endpoint, GatewayInfo, docker_hub_mirror


async def check_docker(checkup: Checkup, report: Report, info: GatewayInfo) -> None:
    mirror = docker_hub_mirror(checkup.target, info)
    if mirror is None or checkup.docker_host is None:
        return
    if not checkup.docker_host.startswith("unix://"):
        report.ok(f"Docker daemon at {checkup.docker_host}: not checked (only unix:// "
                  "sockets are)")
        return
    mirrors = await _daemon_mirrors(checkup, report, checkup.docker_host[len("unix://"):])
    if mirrors is None:
        return
    fix_command = f"sudo {checkup.command} client docker {checkup.name}{checkup.ca_option}"
    if mirror.url in mirrors:
        position = mirrors.index(mirror.url)
        report.ok(f"the Docker daemon uses {mirror.url} as its docker.io mirror" +
                  (f" (after {', '.join(mirrors[:position])})" if position else ""))
    elif mirror.url in await asyncio.to_thread(_daemon_json_mirrors, checkup):
        report.problem(f"{checkup.daemon_json} lists {mirror.url} but the running "
                       "Docker daemon does not use it yet",
                       "sudo systemctl reload docker")
    else:
        shown = ", ".join(mirrors) or "none"
        report.problem(f"the Docker daemon does not use the gateway for docker.io "
                       f"(its registry-mirrors: {shown})",
                       f"{fix_command} && sudo systemctl reload docker")
    if checkup.ca is not None:
        await _check_certs(checkup, report, info, mirror, fix_command)


async def _daemon_mirrors(checkup: Checkup, report: Report, path: str) -> list[str] | None:
    """The running daemon's registry mirrors; None (with the finding) when it cannot say."""
    try:
        connector = aiohttp.UnixConnector(path=path)
        async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=checkup.timeout)
        ) as session, session.get("http://docker/info") as response:
            document = await response.json(content_type=None)
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, FileNotFoundError | ConnectionRefusedError):
            report.ok(f"no Docker daemon at {path}: skipped")
            return None
        report.problem(f"cannot ask the Docker daemon at {path}: {exc.os_error}",
                       "run doctor as a user in the docker group (or with sudo)")
        return None
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
        report.problem(f"cannot ask the Docker daemon at {path}: {exc}",
                       "run doctor as a user in the docker group (or with sudo)")
        return None
    return [str(m).rstrip("/") for m in
            (document.get("RegistryConfig") or {}).get("Mirrors") or []]


async def _check_certs(checkup: Checkup, report: Report, info: GatewayInfo, mirror: Endpoint,
                       fix_command: str) -> None:
    netlocs = dict.fromkeys([mirror.netloc] + [
        e.netloc for e in checkup.target.endpoints(info) if e.route != DOCKER_HUB])
    missing = await asyncio.to_thread(lambda: [
        n for n in netlocs if not (checkup.docker_certs_dir / n / "ca.crt").exists()])
    if missing:
        report.problem(
            "Docker does not trust the gateway's CA for "
            f"{', '.join(missing)} (no ca.crt in {checkup.docker_certs_dir})",
            fix_command)


def _daemon_json_mirrors(checkup: Checkup) -> list[str]:
    try:
        document: Any = json.loads(checkup.daemon_json.read_text())
        return [str(m).rstrip("/") for m in document.get("registry-mirrors", [])]
    except (OSError, ValueError, AttributeError, TypeError):
        return []
