"""The client sandbox of the end-to-end tests: a network and mount namespace of its own,
where chosen host names resolve (through a private /etc/hosts) to SANDBOX_ADDRESS, an
address on the namespace's loopback that relays connect to servers on this machine's
127.0.0.1. There is no other route out, so a pull that works came through the gateway,
and a client falling back to the real docker.io or ghcr.io cannot reach the internet.

The address is not in 127.0.0.0/8 on purpose: dockerd treats registries there as
insecure and skips certificate checks, which would hide a wrong CA setup. /etc/docker
and /etc/containers are private directories inside, so client tools write their
default paths without touching the machine's. Everything started here is stopped by
`stop()`; it needs root (namespaces) and never leaves loopback.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dockerd import Dockerd, docker_client
from .gateway import REPOSITORY_ROOT
from .net import ensure_loopback, stop_process
from .tools import require_tool, unavailable
from .wait import wait_for

SANDBOX_ADDRESS = "198.18.0.2"  # RFC 2544 test range; exists only inside the sandbox
CLONE_NEWNET = 0x40000000


def require_root() -> None:
    """Skip without root (namespaces need it); under CI fail instead."""
    if os.geteuid() != 0:
        unavailable("namespaces for the client sandbox need root")


def listening_socket_in(netns: str, address: tuple[str, int]) -> socket.socket:
    """A listening socket created inside another network namespace: a thread moves into
    it (setns only affects that thread), binds, and ends; the socket stays there."""
    made: dict[str, Any] = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns into the sandbox failed")
            finally:
                os.close(fd)
            made["socket"] = socket.create_server(address, reuse_port=False)
        except BaseException as error:  # handed to the caller's thread
            made["error"] = error

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    listening: socket.socket = made["socket"]
    return listening


class Relay:
    """Accepts inside the sandbox on `listen`, connects to `target` on this machine's
    loopback, and copies bytes both ways (TLS passes through untouched)."""

    def __init__(self, netns: str, listen: tuple[str, int], target: tuple[str, int],
                 source: str | None = None) -> None:
        self.target = target
        # The loopback address the target sees the client at (rules by client address).
        self.source = (source, 0) if source is not None else None
        self.listener = listening_socket_in(netns, listen)
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10,
                                                    source_address=self.source)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with self._lock:
                if source in self._sockets:
                    self._sockets.discard(source)
                    with contextlib.suppress(OSError):
                        source.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(10)
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            self._sockets.clear()


@dataclass
class Sandbox:
    """A holder process owning a new network + mount namespace, and what runs in it.
    `names` resolve to SANDBOX_ADDRESS inside (a private /etc/hosts)."""

    root: Path
    names: tuple[str, ...] = ()
    holder: subprocess.Popen[bytes] | None = None
    relays: list[Relay] = field(default_factory=list)

    @property
    def etc_docker(self) -> Path:
        return self.root / "etc-docker"  # is /etc/docker inside

    @property
    def etc_containers(self) -> Path:
        return self.root / "etc-containers"  # is /etc/containers inside

    @property
    def pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    def start(self) -> None:
        for name in ("unshare", "nsenter", "ip", "mount"):
            require_tool(name)
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "--",
             "sleep", "infinity"], stdin=subprocess.DEVNULL, start_new_session=True)
        ours = os.readlink("/proc/self/ns/net")
        wait_for(lambda: Path(f"/proc/{self.pid}/comm").read_text().strip() == "sleep"
                 and os.readlink(self.netns) != ours, what="sandbox namespaces",
                 timeout=10, process=self.holder)
        self.run("ip", "link", "set", "lo", "up")
        self.run("ip", "addr", "add", f"{SANDBOX_ADDRESS}/32", "dev", "lo")
        (self.root / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{SANDBOX_ADDRESS} {n}\n" for n in self.names))
        (self.root / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        self.etc_docker.mkdir()
        shutil.copytree("/etc/containers", self.etc_containers, symlinks=True)
        for source, target in ((self.root / "hosts", "/etc/hosts"),
                               (self.root / "resolv.conf", "/etc/resolv.conf"),
                               (self.etc_docker, "/etc/docker"),
                               (self.etc_containers, "/etc/containers")):
            self.run("mount", "--bind", str(source), target, mount_only=True)
        # Never write through to the machine's files: check the binds took.
        marker = self.etc_docker / ".sandbox"
        marker.write_text("ok")
        assert self.run("cat", "/etc/docker/.sandbox").stdout == "ok"
        assert not Path("/etc/docker/.sandbox").exists()

    def command(self, *argv: str, mount_only: bool = False) -> list[str]:
        namespaces = ["-m"] if mount_only else ["-m", "-n"]
        # Entering a mount namespace moves to its /: start where the checkout is.
        return ["nsenter", "-t", str(self.pid), *namespaces, f"--wd={REPOSITORY_ROOT}", "--",
                *argv]

    def run(self, *argv: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 300, mount_only: bool = False) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.command(*argv, mount_only=mount_only), capture_output=True,
                              text=True, env=env, timeout=timeout, cwd=REPOSITORY_ROOT)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {done.returncode}\n"
                                 f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
        return done

    def gateway_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`registry-gateway ...` as a user on a client machine runs it."""
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root)}
        return self.run(sys.executable, "-m", "gateway", *args, env=environment, check=check)

    def forward(self, listen: tuple[str, int], target: tuple[str, int], *,
                source: str | None = None) -> None:
        """Relay `listen` inside to `target` on this machine's loopback, connecting from
        `source` (a 127.0.0.0/8 address) when given: clients at different addresses."""
        if source is not None:
            ensure_loopback(source)
        self.relays.append(Relay(self.netns, listen, target, source))

    def stop(self) -> None:
        for relay in self.relays:
            relay.stop()
        self.relays.clear()
        if self.holder is not None:
            stop_process(self.holder, grace=5)  # the namespaces die with their last process
            self.holder = None


@contextlib.contextmanager
def run_sandbox(names: tuple[str, ...]) -> Iterator[Sandbox]:
    """A started sandbox in a fresh directory under /tmp; stopped and removed at the end."""
    require_root()
    root = Path(tempfile.mkdtemp(prefix="rgw-sbx-", dir="/tmp"))
    box = Sandbox(root, names)
    try:
        box.start()
        yield box
    finally:
        box.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class SandboxDockerd(Dockerd):
    """dockerd inside the sandbox, started with the daemon.json given (--config-file)."""

    config_file: Path = Path()
    sandbox: Sandbox | None = None

    def start(self) -> None:
        binary = require_tool("dockerd")
        require_tool("containerd")
        self._client = docker_client()
        assert self.sandbox is not None
        environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                       "HOME": str(self.root)}
        self._launch(self.sandbox.command(*self.command(binary, self.config_file)), environment)


@dataclass
class Containerd:
    """containerd (without CRI) inside the sandbox, with its own socket and roots."""

    root: Path
    sandbox: Sandbox
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "containerd.log"

    def start(self) -> None:
        binary = require_tool("containerd")
        require_tool("ctr")
        config = self.root / "config.toml"
        config.write_text("\n".join([
            "version = 2",
            f'root = "{self.root / "root"}"',
            f'state = "{self.root / "state"}"',
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            # Keep everything under our directory (the opt plugin defaults to /opt/containerd).
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{self.root / "opt"}"',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.root / "ttrpc.sock"}"',
            "[debug]",
            '  level = "debug"',
        ]) + "\n")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.sandbox.command(binary, "--config", str(config)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: self.ctr("version", check=False).returncode == 0, what="containerd",
                 process=self.process, timeout=30,
                 diagnostics=lambda: self.log_path.read_text(errors="replace")[-3000:])

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run("ctr", "--address", str(self.address), "--namespace", "rgw",
                                *args, check=check)

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            stop_process(self.process, grace=15)
            self.process = None


@contextlib.contextmanager
def run_containerd(sandbox: Sandbox) -> Iterator[Containerd]:
    """A containerd of its own inside `sandbox`; stopped and its directory removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="rgw-ctd-", dir="/tmp"))
    daemon = Containerd(root, sandbox)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def containers_env(root: Path) -> dict[str, str]:
    """The environment podman, skopeo and crane run with: a HOME of their own under root."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(home)}
