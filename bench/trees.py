"""The gateway source trees a run measures: this working tree, and optionally a baseline
revision checked out into a temporary git worktree (removed afterwards). Both run with the
same Python and packages; each as `python -m gateway` with cwd and PYTHONPATH = its tree.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import REPO


@dataclass(frozen=True)
class GatewayTree:
    """Where `python -m gateway` runs from, and the name its records carry."""

    label: str  # the target in the records: "gateway", or "gateway (<commit>)"
    root: Path
    commit: str = ""  # full hash, for a baseline

    @property
    def slug(self) -> str:
        """The label as a file name (logs, data directories)."""
        return self.label.replace(" (", "-").replace(")", "")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.root) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              cwd=self.root, env=self.env(), check=False, timeout=60)

    def module_dir(self) -> Path:
        """Where `import gateway` resolves from this tree (it must be the tree's own)."""
        proc = self.run("-c", "import gateway, os; print(os.path.dirname(gateway.__file__))")
        if proc.returncode != 0:
            raise RuntimeError(f"{self.label}: cannot import gateway: {proc.stderr.strip()}")
        return Path(proc.stdout.strip()).resolve()

    def check(self) -> Path:
        """Refuse to measure a tree whose `python -m gateway` would run other code (an
        editable install's finder, say); returns the package directory."""
        found = self.module_dir()
        if found != (self.root / "gateway").resolve():
            raise RuntimeError(f"{self.label}: `python -m gateway` from {self.root} imports "
                               f"{found}, not that tree's gateway/")
        return found

    def version(self) -> str:
        out = self.run("-m", "gateway", "--version")
        return (out.stdout or out.stderr).strip()

    def describe(self) -> dict[str, Any]:
        """What ran, for the meta record."""
        return {"label": self.label, "commit": self.commit, "version": self.version(),
                "module": str(self.check())}


CURRENT = GatewayTree("gateway", REPO)


def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          check=False, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def resolve(rev: str) -> str:
    """The full commit hash of `rev`, or a RuntimeError naming it."""
    return _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")


@contextlib.contextmanager
def baseline(rev: str, where: Path) -> Iterator[GatewayTree]:
    """`rev` checked out (detached) at `where` for the length of the run."""
    commit = resolve(rev)
    short = _git("rev-parse", "--short", commit)
    _git("worktree", "add", "--detach", "--force", str(where), commit)
    try:
        tree = GatewayTree(f"gateway ({short})", where, commit)
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=False).stdout.strip()
        if head != commit:
            raise RuntimeError(f"baseline worktree {where} is at {head!r}, not {commit}")
        tree.check()
        yield tree
    finally:
        try:
            _git("worktree", "remove", "--force", str(where))
        except RuntimeError as exc:  # say so; `git worktree prune` clears it once it is gone
            print(f"bench: could not remove the baseline worktree {where}: {exc}",
                  file=sys.stderr)
