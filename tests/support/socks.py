"""A real SOCKS5 server for tests: Debian's `microsocks`, on 127.0.0.1, whose outgoing
connections leave from an address of their own (`-b`), so an upstream can tell a request
that came through it from one that came straight.

Started and stopped by a context manager; loopback only.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .net import ensure_loopback, free_port, stop_process
from .tools import require_tool
from .wait import wait_for


@dataclass
class Socks:
    port: int
    source: str  # the address its outgoing connections come from
    log_path: Path

    @property
    def url(self) -> str:
        return f"socks5://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connections(self) -> list[str]:
        """host:port of each connection it made ("client[4] 127.0.0.1: connected to h:p")."""
        return [line.rsplit(" ", 1)[1] for line in self.log().splitlines()
                if "connected to " in line]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def run_microsocks(workdir: Path, *, source: str = "127.0.0.3",
                   login: tuple[str, str] | None = None) -> Iterator[Socks]:
    binary = require_tool("microsocks")
    ensure_loopback(source)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [binary, "-i", "127.0.0.1", "-p", str(port), "-b", source]
    if login is not None:
        args += ["-u", login[0], "-P", login[1]]
    log_path = workdir / "microsocks.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: _accepts(port), what="microsocks to listen", timeout=10,
                 process=process)
        yield Socks(port, source, log_path)
    finally:
        stop_process(process, grace=5)
