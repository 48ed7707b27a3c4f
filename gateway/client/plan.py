"""A `Plan` (the files a runtime needs and their bytes, plus notes for the user) and `apply`,
which writes it atomically with backups. Builders of plans live in docker.py, containerd.py
and podman.py; nothing here knows a runtime."""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .target import ClientConfError


@dataclass(frozen=True)
class FileWrite:
    path: Path
    content: bytes
    mode: int = 0o644
    backup: bool = False  # keep a copy of the file this replaces
    summary: str | None = None  # printed by --dry-run instead of the content


@dataclass
class Plan:
    writes: list[FileWrite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        """What --dry-run prints: each file with its content, then the notes."""
        parts = []
        for write in self.writes:
            body = write.summary or write.content.decode().rstrip("\n")
            parts.append(f"# {write.path}\n{body}\n")
        if self.notes:
            parts.append("\n".join(self.notes) + "\n")
        return "\n".join(parts)


def quoted(value: str) -> str:
    """A JSON string is also a TOML basic string and a YAML double-quoted scalar."""
    return json.dumps(value)


def ca_writes(ca: tuple[Path, bytes] | None, directory: Path,
              netlocs: list[str]) -> list[FileWrite]:
    """The CA certificate as <directory>/<netloc>/ca.crt, once per netloc."""
    if ca is None:
        return []
    source, pem = ca
    return [FileWrite(directory / netloc / "ca.crt", pem,
                      summary=f"(the CA certificate from {source})")
            for netloc in dict.fromkeys(netlocs)]


def apply(plan: Plan, out: TextIO) -> None:
    """Write the plan: each file atomically (temp file, fsync, rename), keeping the mode
    of a file it replaces and a timestamped backup where the plan asks for one."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for write in plan.writes:
        try:
            current = write.path.read_bytes() if write.path.exists() else None
            if current == write.content:
                print(f"unchanged: {write.path}", file=out)
                continue
            write.path.parent.mkdir(parents=True, exist_ok=True)
            mode = write.path.stat().st_mode & 0o777 if current is not None else write.mode
            backup = None
            if current is not None and write.backup:
                backup = write.path.with_name(f"{write.path.name}.bak-{stamp}")
                backup.write_bytes(current)
                os.chmod(backup, mode)
            _replace(write.path, write.content, mode)
        except PermissionError as exc:
            raise ClientConfError(f"cannot write {exc.filename or write.path}: permission "
                                  "denied; run it with sudo (or --dry-run to see it)") from None
        except OSError as exc:
            raise ClientConfError(f"cannot write {write.path}: {exc.strerror}") from None
        print(f"wrote {write.path}" + (f" (previous one kept as {backup})" if backup else ""),
              file=out)


def _replace(path: Path, content: bytes, mode: int) -> None:
    """A reader sees the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_text(path: Path) -> str | None:
    """A file the plan merges into; None when it does not exist yet."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ClientConfError(f"cannot read {path}: {exc.strerror}") from None
