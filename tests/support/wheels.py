"""A wheelhouse for offline installs of the gateway: binary wheels of its dependencies and
of its build backend, downloaded once per clone into .tools/images/wheels-<hash> (the hash
of pyproject.toml's requirements) with this machine's pip.

The container build and the install-script test point pip at it (PIP_FIND_LINKS with
PIP_NO_INDEX), so neither needs a package index while it runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.tags import sys_tags

from .base_image import IMAGES

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def requirements() -> list[str]:
    """What installing the gateway's wheel, and building it, needs."""
    project = tomllib.loads((REPOSITORY_ROOT / "pyproject.toml").read_text())
    return [*project["build-system"]["requires"], "wheel",
            *project["project"]["dependencies"]]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def wheelhouse(python_version: str | None = None, *, timeout: float = 600) -> Path:
    """Wheels for this machine's Python, or for `python_version` ("3.11": the container
    base's) on this machine's platforms."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    version = python_version or here
    wanted = requirements()
    if python_version is not None and _version(python_version) < (3, 11, 3):
        # pip download judges a dependency's markers by this Python, not the target's:
        # redis wants async-timeout below 3.11.3 (bookworm's python3 is 3.11.2).
        wanted.append("async-timeout>=4.0.3")
    key = hashlib.sha256("\n".join(sorted(wanted)).encode()).hexdigest()[:12]
    house = IMAGES / f"wheels-py{version.replace('.', '')}-{key}"
    target: list[str] = []
    if version != here:
        platforms = sorted({tag.platform for tag in sys_tags()})
        target = ["--python-version", version, *(f"--platform={p}" for p in platforms)]
    IMAGES.mkdir(parents=True, exist_ok=True)
    with (IMAGES / ".lock-wheels").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if house.is_dir():
            return house
        partial = Path(tempfile.mkdtemp(prefix="wheels-", dir=IMAGES))
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                 *target, "--dest", str(partial), *wanted],
                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                raise AssertionError(f"pip download exited {done.returncode}\n"
                                     f"{done.stderr[-3000:]}")
            partial.rename(house)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return house
