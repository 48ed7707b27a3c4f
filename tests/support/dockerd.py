"""A private dockerd for end-to-end pulls: its own socket, data root and exec root in a
short temporary directory, vfs storage, no iptables and no bridge.

dockerd falls back to registry-1.docker.io when a mirror fails; tests must never
reach the internet, so the daemon runs with HTTP(S)_PROXY pointing at a loopback
port that refuses connections (Go never proxies loopback addresses, so the
gateway is still reached directly). A pull that succeeds therefore came through
the gateway. Teardown stops dockerd and the containerd it started, and unmounts
anything left under its directories.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .net import stop_process
from .tools import require_tool
from .wait import wait_for


def docker_client() -> str:
    # /usr/bin/docker comes with docker.io and matches the daemon's version; any other
    # client on PATH negotiates the API version down and works too.
    if os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"
    return require_tool("docker")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Dockerd:
    registry_mirrors: tuple[str, ...] = ()
    insecure_registries: tuple[str, ...] = ()
    # vfs works wherever dockerd does; overlay2 (cheaper for image builds) needs a data
    # root that is not itself on overlayfs.
    storage_driver: str = "vfs"
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rgw-dk-", dir="/tmp")))
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _refusing: socket.socket | None = field(default=None, repr=False)

    @property
    def socket_path(self) -> Path:
        return self.root / "docker.sock"

    @property
    def exec_root(self) -> Path:
        return self.root / "exec"

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        binary = require_tool("dockerd")
        self._client = docker_client()
        require_tool("containerd")
        config = {
            "registry-mirrors": list(self.registry_mirrors),
            "insecure-registries": list(self.insecure_registries),
            "storage-driver": self.storage_driver,
            "iptables": False,
            "ip6tables": False,
            "bridge": "none",
            "debug": True,
        }
        config_path = self.root / "daemon.json"
        config_path.write_text(json.dumps(config, indent=2))
        # A bound socket that never listens: connecting to it is refused at once.
        self._refusing = socket.socket()
        self._refusing.bind(("127.0.0.1", 0))
        dead_proxy = f"http://127.0.0.1:{self._refusing.getsockname()[1]}"
        environment = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.root),
            "HTTP_PROXY": dead_proxy,
            "HTTPS_PROXY": dead_proxy,
            "NO_PROXY": "",
        }
        self._launch(self.command(binary, config_path), environment)

    def command(self, binary: str, config_path: Path) -> list[str]:
        """dockerd's command line: its own config file, socket, roots and pidfile."""
        return [
            binary, "--config-file", str(config_path),
            "--host", f"unix://{self.socket_path}",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.root / "docker.pid"),
        ]

    def _launch(self, command: list[str], environment: dict[str, str]) -> None:
        """Start dockerd and wait until it answers; stop it again if it never does."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, start_new_session=True)
        try:
            wait_for(self._answers, what="dockerd", timeout=60, process=self.process,
                     diagnostics=lambda: self.log()[-4000:])
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if not self.socket_path.exists():
            return False
        done = subprocess.run([self._client, "-H", f"unix://{self.socket_path}", "version"],
                              capture_output=True, env=self._client_env(), timeout=30)
        return done.returncode == 0

    def _client_env(self) -> dict[str, str]:
        config = self.root / "client-config"
        config.mkdir(exist_ok=True)
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.root),
                "DOCKER_CONFIG": str(config), "DOCKER_HOST": f"unix://{self.socket_path}"}

    def docker(self, *args: str, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the docker client against this daemon; raise with its output on failure."""
        done = subprocess.run([self._client, *args], capture_output=True, text=True,
                              env=self._client_env(), timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {done.returncode}\nstdout:\n{done.stdout}\n"
                f"stderr:\n{done.stderr}\ndockerd log (tail):\n{self.log()[-3000:]}"
            )
        return done

    def pull(self, reference: str) -> subprocess.CompletedProcess[str]:
        return self.docker("pull", reference)

    def inspect_image(self, reference: str) -> dict[str, Any]:
        done = self.docker("image", "inspect", reference)
        found: list[dict[str, Any]] = json.loads(done.stdout)
        return found[0]

    def remove_image(self, reference: str) -> None:
        self.docker("image", "rm", "--force", reference, check=False)

    def stop(self) -> None:
        containerd_pid = self._containerd_pid()
        if self.process is not None:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
            stop_process(self.process, grace=30)
            self.process = None
        # dockerd starts containerd in a session of its own; make sure it is gone too.
        if containerd_pid is not None and self._is_ours(containerd_pid):
            os.kill(containerd_pid, signal.SIGTERM)
            try:
                wait_for(lambda: not _pid_alive(containerd_pid), what="containerd to exit",
                         timeout=15, interval=0.1)
            except AssertionError:
                os.kill(containerd_pid, signal.SIGKILL)
        if self._refusing is not None:
            self._refusing.close()
            self._refusing = None
        self._unmount_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def _containerd_pid(self) -> int | None:
        try:
            return int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _is_ours(self, pid: int) -> bool:
        try:
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return False
        return str(self.exec_root).encode() in command_line

    def _unmount_leftovers(self) -> None:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        ours = [line.split()[1] for line in mounts if line.split()[1].startswith(str(self.root))]
        for target in sorted(ours, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)


@contextmanager
def run_dockerd(*, registry_mirrors: tuple[str, ...] = (),
                insecure_registries: tuple[str, ...] = (),
                storage_driver: str = "vfs") -> Iterator[Dockerd]:
    daemon = Dockerd(registry_mirrors, insecure_registries, storage_driver)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
