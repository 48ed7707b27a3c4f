"""ProcessDir: each process's own scratch directory, swept only when its owner is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from gateway.cache.spool import ProcessDir

_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gateway.cache.spool import ProcessDir
    mine = ProcessDir(Path(sys.argv[1]))
    mine.open()
    (mine.path / "live.spool").write_bytes(b"x" * 10)
    print(mine.path, flush=True)
    time.sleep(60)
""")


def _other_process(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(parent)], text=True,
                             stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


def test_a_live_owners_directory_survives_and_a_dead_ones_is_swept(tmp_path: Path) -> None:
    parent = tmp_path / ".spool"
    child, theirs = _other_process(parent)
    try:
        mine = ProcessDir(parent)
        assert mine.open() == []
        assert (theirs / "live.spool").read_bytes() == b"x" * 10
    finally:
        child.kill()
        child.wait()
    later = ProcessDir(parent)
    assert later.open() == [theirs]
    assert not theirs.exists()
    assert mine.path.exists(), "a live process's directory is never swept"
    mine.close()
    later.close()
    assert not mine.path.exists() and not later.path.exists()


def test_old_single_process_spool_files_and_unlocked_leftovers_go(tmp_path: Path) -> None:
    parent = tmp_path / ".spool"
    parent.mkdir()
    (parent / "abc.1234").write_bytes(b"partial")  # the layout before per-process spools
    stale = parent / "999-deadbeef"
    stale.mkdir()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    young = parent / "998-cafecafe"  # being made by a process that has not locked it yet
    young.mkdir()
    mine = ProcessDir(parent)
    swept = mine.open()
    assert sorted(swept) == sorted([parent / "abc.1234", stale])
    assert young.exists()
    mine.close()
