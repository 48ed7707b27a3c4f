"""What a gateway's data directory holds, judged from outside: files by size or content,
and where the on-disk contract says a cached blob lives. Read-only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .images import sha256_digest


def files_at_least(root: Path, size: int) -> list[tuple[Path, int]]:
    """Regular files under `root` of `size` bytes or more (spool files included)."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            try:
                length = path.stat().st_size
            except FileNotFoundError:
                continue
            if length >= size:
                found.append((path, length))
    return found


def files_holding(root: Path, digest: str) -> list[Path]:
    """Files under `root` whose whole content has `digest` (sha256)."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            try:
                if sha256_digest(path.read_bytes()) == digest:
                    found.append(path)
            except FileNotFoundError:
                continue
    return found


def blob_path(data_dir: Path, route: str, digest: str) -> Path:
    """Where the contract says a cached blob lives: DIR/<ns>/blobs/sha256/<2 hex>/<hex>."""
    namespace = re.sub(r"[^a-z0-9.-]", "_", route)
    algorithm, _, hex_digest = digest.partition(":")
    return data_dir / namespace / "blobs" / algorithm / hex_digest[:2] / hex_digest
