"""Real `redis-server` (Debian's) for the replica tests: on a loopback port, with a
temporary directory and no persistence; stopped by the context that started it, and
stoppable and startable again on the same port mid-test (Redis going away and back).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .net import free_port, stop_process
from .tools import require_tool
from .wait import wait_for


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    workdir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        server = require_tool("redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        command = [server, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
                   "--daemonize", "no", "--protected-mode", "yes", "--logfile", ""]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log)
        wait_for(lambda: _pings(self.port), what="redis-server", timeout=30,
                 process=self.process, diagnostics=self.log)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=3)
            self.process = None


@contextmanager
def run_redis(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
