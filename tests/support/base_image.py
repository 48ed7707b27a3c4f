"""A container base image the tests make themselves: a minimal Debian bookworm with
python3 and python3-venv, built by debootstrap from Debian's archive (no container
registry is reachable from these machines) and kept as a tarball under .tools/images/.

The tarball is made once per clone (a lock file keeps two test runs from building it at
once) and `docker import`ed into each daemon that needs it. Nothing here pulls an image.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .tools import LOCAL_TOOLS, require_tool

IMAGES = LOCAL_TOOLS.parent / "images"
SUITE = "bookworm"
# What the image needs beyond minbase: the interpreter and ensurepip's bundled wheels.
PACKAGES = ("python3", "python3-venv")
TARBALL = IMAGES / f"{SUITE}-python3.tar"
# Bookworm's python3, exactly: what wheels for the image must fit, and what markers such
# as python_full_version < "3.11.3" (redis needs async-timeout below it) must see.
PYTHON_VERSION = "3.11.2"
# Debian's archive as this machine's apt reaches it; DEBOOTSTRAP_MIRROR overrides.
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Trimmed after debootstrap: nothing the gateway runs reads these.
_TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
         "usr/share/info", "usr/share/locale", "var/log")


def base_tarball(*, timeout: float = 1200) -> tuple[Path, float]:
    """The base image's tarball and the seconds spent making it now (0.0 when cached)."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    with (IMAGES / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits for the first one's tarball
        if TARBALL.is_file():
            return TARBALL, 0.0
        started = time.monotonic()
        _debootstrap_into(TARBALL, timeout=timeout)
        return TARBALL, time.monotonic() - started


def _debootstrap_into(tarball: Path, *, timeout: float) -> None:
    debootstrap = require_tool("debootstrap")
    mirror = os.environ.get("DEBOOTSTRAP_MIRROR", DEFAULT_MIRROR)
    work = Path(tempfile.mkdtemp(prefix="rgw-base-", dir=IMAGES))
    root = work / "root"
    try:
        done = subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
             str(root), mirror],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            log = root / "debootstrap" / "debootstrap.log"
            detail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise AssertionError(f"debootstrap exited {done.returncode}\n{done.stderr[-3000:]}"
                                 f"\n{detail}")
        for relative in _TRIM:
            target = root / relative
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir()
        partial = work / "base.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."],
                       check=True, capture_output=True, timeout=timeout)
        partial.rename(tarball)  # whole or not at all: a killed run leaves no half tarball
    finally:
        shutil.rmtree(work, ignore_errors=True)
