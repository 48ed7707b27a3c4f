"""`client docker`: registry-mirrors (and insecure-registries for plain HTTP) merged into
daemon.json, the CA under certs.d, and how to name the other registries. Builds a Plan;
writes nothing itself."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .plan import FileWrite, Plan, ca_writes
from .target import (
    DOCKER_HUB,
    ClientConfError,
    GatewayInfo,
    Target,
    check_target,
    docker_hub_mirror,
)


def _json_document(text: str | None, path: Path) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClientConfError(f"{path} is not valid JSON (line {exc.lineno}, column "
                              f"{exc.colno}: {exc.msg}); fix it first, nothing was "
                              "written") from None
    if not isinstance(document, dict):
        raise ClientConfError(f"{path} must hold a JSON object; nothing was written")
    return document


def _merge_list(document: dict[str, Any], key: str, first: list[str], path: Path,
                normalise: Callable[[str], str]) -> None:
    existing = document.get(key, [])
    if not isinstance(existing, list) or not all(isinstance(v, str) for v in existing):
        raise ClientConfError(f"{path}: {key!r} must be a list of strings; nothing was written")
    ours = {normalise(v) for v in first}
    document[key] = [*first, *(v for v in existing if normalise(v) not in ours)]


def merge_daemon_json(text: str | None, path: Path, mirror: str | None,
                      insecure: list[str]) -> str:
    """daemon.json with the mirror first in registry-mirrors; every other key kept."""
    document = _json_document(text, path)
    if mirror is not None:
        _merge_list(document, "registry-mirrors", [mirror], path, lambda v: v.rstrip("/"))
    if insecure:
        _merge_list(document, "insecure-registries", insecure, path, lambda v: v)
    merged = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if json.loads(merged) != document:  # what Docker will read is what we meant
        raise ClientConfError(f"{path}: the merged document does not read back; nothing written")
    return merged


def docker_plan(info: GatewayInfo, target: Target, *, daemon_json: Path,
                existing: str | None, certs_dir: Path,
                ca: tuple[Path, bytes] | None = None) -> Plan:
    check_target(target, info)
    plan = Plan()
    mirror = docker_hub_mirror(target, info)
    endpoints = [e for e in target.endpoints(info) if e.route != DOCKER_HUB]
    netlocs = ([mirror.netloc] if mirror else []) + [e.netloc for e in endpoints]
    insecure = list(dict.fromkeys(netlocs)) if target.scheme == "http" else []
    merged = merge_daemon_json(existing, daemon_json, mirror.url if mirror else None, insecure)
    plan.writes.append(FileWrite(daemon_json, merged.encode(), backup=True))
    plan.writes += ca_writes(ca, certs_dir, netlocs)
    if mirror is not None:
        plan.notes += [f"docker.io: pulls go through {mirror.url} (registry-mirrors); Docker",
                       "  still falls back to Docker Hub itself when the mirror fails.",
                       "Apply it: sudo systemctl reload docker  (dockerd re-reads "
                       "registry-mirrors on SIGHUP)"]
    else:
        plan.notes.append(f"docker.io: {info.source} has no docker.io route for "
                          "registry-mirrors; nothing to mirror")
    if endpoints:
        plan.notes.append("Other registries have no mirror setting in Docker: put the "
                          "gateway's host in the image name instead:")
        width = max(len(e.route) for e in endpoints) + len("/OWNER/IMAGE")
        for e in endpoints:
            plan.notes.append(f"  {e.route + '/OWNER/IMAGE':<{width}}  ->  "
                              f"{e.location}/OWNER/IMAGE")
    return plan
