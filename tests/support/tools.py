"""Finding the external tools a test needs (docker-registry, dockerd, skopeo, curl).

A missing tool skips the test on a developer's machine and fails it under CI,
where a skip would hide that the suite did not really run.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """Return the path of `name` (a command or an absolute path); skip or fail without it."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"required tool {name!r} is not installed (not on PATH)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
