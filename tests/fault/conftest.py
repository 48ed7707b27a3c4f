"""Fixtures of the fault tests: fake upstreams, and removing the large test data that a
test leaves in its temporary directory (registry storage, cache, spool), so that
pytest's kept temporary directories do not fill the disk. Logs stay for debugging.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_registry import RunningFake, run_fake_registry

LARGE = 1 << 20


@pytest.fixture(autouse=True)
def _drop_large_files(tmp_path: Path) -> Iterator[None]:
    # Autouse and first: its teardown runs after every server of the test has stopped.
    yield
    for directory, _, names in os.walk(tmp_path):
        for name in names:
            path = Path(directory) / name
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_size >= LARGE:
                    path.unlink()
            except OSError:
                pass


@pytest.fixture
def fake_upstream() -> Iterator[RunningFake]:
    """The scripted fake registry, served from a thread; stopped at the end."""
    with run_fake_registry() as running:
        yield running
