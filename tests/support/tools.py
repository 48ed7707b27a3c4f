"""Finding the external tools a test needs (docker-registry, dockerd, skopeo, curl, and
the ones built into ./.tools/bin).

A missing tool skips the test on a developer's machine and fails it under CI,
where a skip would hide that the suite did not really run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

# What scripts/install-test-deps builds (crane, the conformance suite) lands here.
LOCAL_TOOLS = Path(__file__).resolve().parents[2] / ".tools" / "bin"


def require_tool(name: str) -> str:
    """Return the path of `name` (a command or an absolute path); skip or fail without it."""
    path = shutil.which(name)
    if path is not None:
        return path
    unavailable(f"required tool {name!r} is not installed (not on PATH)")


def unavailable(message: str) -> NoReturn:
    """The rule for anything a test needs from the machine: skip on a developer's
    machine, fail under CI (where `make test` installed everything)."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def local_tool(name: str) -> str:
    """`name` from ./.tools/bin if it is there, else from PATH (skip or fail without it)."""
    local = LOCAL_TOOLS / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return require_tool(name)
