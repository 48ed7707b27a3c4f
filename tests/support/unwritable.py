"""Making a directory refuse new files, for root too: `chattr +i` (root ignores modes but
not the immutable flag), or a plain chmod for anyone else. Always undone on the way out.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .tools import require_tool


@contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """While inside, creating a file in `directory` fails (EPERM or EACCES)."""
    if os.geteuid() == 0:
        chattr = require_tool("chattr")
        subprocess.run([chattr, "+i", str(directory)], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run([chattr, "-i", str(directory)], check=True, capture_output=True)
        return
    mode = directory.stat().st_mode
    directory.chmod(0o555)
    try:
        yield
    finally:
        directory.chmod(mode)
