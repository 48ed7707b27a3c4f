"""`serve --workers N`: a supervisor that binds every listener once, forks N worker
processes that serve them (server.py), restarts one that dies, forwards SIGHUP (reload)
and SIGTERM/SIGINT (drain) to all of them, and exits once they have.

The supervisor runs no event loop and no thread (it forks) and never serves a request.
Each listening address gets one SO_REUSEPORT socket per worker: the kernel spreads
connections over them, and a restarted worker finds the connections queued for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import server
from .config import load_config_file
from .errors import ConfigError
from .logs import JsonFormatter
from .metrics import forget_process, use_multiprocess

log = logging.getLogger("gateway.workers")

_SIGNALS = {signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
_TICK = 0.2  # seconds between looks at signals and readiness
DRAIN_SECONDS = 75.0  # after SIGTERM, workers still running then are killed
_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)  # between restarts of a worker that keeps dying
_STEADY = 30.0  # a worker that ran this long starts its back-off anew
_PR_SET_PDEATHSIG = 1


def bind(address: server.Address, count: int) -> list[list[socket.socket]]:
    """For each worker, listening sockets on every address `address` resolves to, all
    with SO_REUSEPORT. Port 0: the port the first one got, for all of them."""
    host, port = address
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    per_worker: list[list[socket.socket]] = [[] for _ in range(count)]
    seen: set[object] = set()
    for family, kind, proto, _name, sockaddr in infos:
        if sockaddr in seen:
            continue
        seen.add(sockaddr)
        for sockets in per_worker:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)  # closed by the caller on failure too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sockaddr = sock.getsockname()[:len(sockaddr)]
            sock.listen(1024)
            sock.setblocking(False)
    return per_worker


@dataclass
class _Child:
    index: int
    pid: int = 0
    started: float = 0.0
    ready_fd: int = -1
    ready: bool = False
    failures: int = 0
    restart_at: float | None = None
    reload_when_ready: bool = False  # a SIGHUP came while it was starting


@dataclass
class Supervisor:
    options: server.ServeOptions
    count: int
    metrics_dir: Path
    plain: list[list[socket.socket]] = field(default_factory=list)
    tls: list[list[socket.socket]] = field(default_factory=list)
    metrics: list[list[socket.socket]] = field(default_factory=list)
    proxy: list[list[socket.socket]] = field(default_factory=list)
    children: dict[int, _Child] = field(default_factory=dict)  # index -> child
    stopping: float | None = None  # when SIGTERM came

    def bind_all(self) -> None:
        n, o = self.count, self.options
        self.plain = _merge(n, [bind(a, n) for a in o.listens])
        self.tls = _merge(n, [bind(a, n) for a in o.tls_listens])
        self.metrics = _merge(n, [bind(o.metrics_listen, n)] if o.metrics_listen else [])
        self.proxy = _merge(n, [bind(a, n) for a in o.proxy_listens])

    def close_sockets(self) -> None:
        for group in (self.plain, self.tls, self.metrics, self.proxy):
            for sockets in group:
                for sock in sockets:
                    sock.close()

    # ------------------------------------------------------------ one worker

    def start(self, child: _Child) -> None:
        restarted, child.ready = child.failures > 0 or child.ready, False
        ready_r, ready_w = os.pipe()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            os.close(ready_r)
            self._work(child.index, ready_w, supervisor, restarted=restarted)
        os.close(ready_w)
        child.pid, child.started, child.ready_fd, child.restart_at = pid, time.monotonic(), \
            ready_r, None
        log.info("worker %d started (pid %d)", child.index, pid)

    def _work(self, index: int, ready_w: int, supervisor: int, *, restarted: bool) -> None:
        code = 1
        try:
            # Until its loop handles SIGHUP (reload), one must not end it: the supervisor
            # sends it again once the worker is ready.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            _end_with_supervisor(supervisor)
            use_multiprocess(self.metrics_dir)
            options = self.options
            if restarted and options.config_file is not None:
                # A worker started again loads the file the others reloaded since.
                with contextlib.suppress(ConfigError, OSError):
                    options = dataclasses.replace(options,
                                                  config=load_config_file(options.config_file))

            def ready() -> None:
                with contextlib.suppress(OSError):
                    os.write(ready_w, b"r")
                    os.close(ready_w)

            worker = server.Worker(index, self.count, tuple(self.plain[index]),
                                   tuple(self.tls[index]) if self.tls else (),
                                   tuple(self.metrics[index]) if self.metrics else (), ready,
                                   tuple(self.proxy[index]) if self.proxy else ())
            server.run(dataclasses.replace(options, worker=worker))
            code = 0
        except BaseException:  # a worker reports whatever ended it, and exits
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)

    # ------------------------------------------------------------ the loop

    def run(self) -> int:
        """Start the workers and look after them; the exit status."""
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        for index in range(self.count):
            self.children[index] = child = _Child(index)
            self.start(child)
        while self.children:
            received = signal.sigtimedwait(_SIGNALS, _TICK)
            if received is not None:
                self._signalled(received.si_signo)
            if self._reap() is False:
                return 1
            self._note_ready()
            self._restart_due()
            if self.stopping is not None and time.monotonic() - self.stopping > DRAIN_SECONDS:
                self._send(signal.SIGKILL)
        return 0

    def _signalled(self, signo: int) -> None:
        if signo == signal.SIGHUP:
            log.info("SIGHUP: every worker reloads")
            for child in self.children.values():
                if child.pid and child.ready:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGHUP)
                else:
                    child.reload_when_ready = True
        elif signo in (signal.SIGTERM, signal.SIGINT) and self.stopping is None:
            log.info("%s: workers finish what they serve and stop",
                     signal.Signals(signo).name)
            self.stopping = time.monotonic()
            for index, child in list(self.children.items()):
                if not child.pid:  # waiting to be started again: not any more
                    del self.children[index]
            self._send(signal.SIGTERM)

    def _send(self, signo: int) -> None:
        for child in self.children.values():
            if child.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signo)

    def _reap(self) -> bool:
        """Collect ended workers; schedule restarts. False: a first start failed."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return True
            child = next((c for c in self.children.values() if c.pid == pid), None)
            forget_process(self.metrics_dir, pid)
            if child is None:
                continue
            self._note_ready()
            if child.ready_fd >= 0:
                os.close(child.ready_fd)
                child.ready_fd = -1
            child.pid = 0
            if self.stopping is not None:
                del self.children[child.index]
                continue
            if not child.ready and child.failures == 0:
                log.error("worker %d (pid %d) failed to start (%s): stopping", child.index,
                          pid, _how(status))
                self._signalled(signal.SIGTERM)
                self._wait_all()
                return False
            if time.monotonic() - child.started > _STEADY:
                child.failures = 0
            delay = _BACKOFF[min(child.failures, len(_BACKOFF) - 1)]
            child.failures += 1
            child.restart_at = time.monotonic() + delay
            log.error("worker %d (pid %d) ended (%s); starting it again in %g s",
                      child.index, pid, _how(status), delay)

    def _wait_all(self) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        while any(c.pid for c in self.children.values()) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                pid, _status = os.waitpid(-1, os.WNOHANG)
                for child in self.children.values():
                    if child.pid == pid:
                        child.pid = 0
            time.sleep(0.05)
        self._send(signal.SIGKILL)

    def _note_ready(self) -> None:
        waiting = {c.ready_fd: c for c in self.children.values() if c.ready_fd >= 0}
        if not waiting:
            return
        readable, _, _ = select.select(list(waiting), [], [], 0)
        for fd in readable:
            child = waiting[fd]
            if os.read(fd, 1):
                child.ready = True
                log.info("worker %d (pid %d) serves", child.index, child.pid)
                if child.reload_when_ready:
                    child.reload_when_ready = False
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGHUP)
            os.close(fd)
            child.ready_fd = -1

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.restart_at is not None and now >= child.restart_at:
                self.start(child)


def _end_with_supervisor(supervisor: int) -> None:
    """A supervisor killed outright (SIGKILL) must not leave workers serving on: the
    kernel sends each SIGTERM when it goes (Linux's PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != supervisor:  # it went before the call took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _merge(count: int, groups: list[list[list[socket.socket]]]) -> list[list[socket.socket]]:
    """Per worker, its sockets of every address."""
    return [[sock for group in groups for sock in group[index]] for index in range(count)]


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _metrics_directory() -> tuple[Path, bool]:
    """PROMETHEUS_MULTIPROC_DIR if the operator set one (emptied: old values would add
    up), else a new temporary directory (True: ours to remove)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.db"):
            old.unlink(missing_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix="registry-gateway-metrics-")), True


def run(options: server.ServeOptions) -> int:
    """Serve with `options.workers` processes until SIGTERM/SIGINT; the exit status."""
    handler = logging.StreamHandler(sys.stderr)  # no thread here: workers fork from us
    handler.setFormatter(JsonFormatter())
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(options.log_level.upper())
    directory, ours = _metrics_directory()
    supervisor = Supervisor(options, options.workers, directory)
    try:
        supervisor.bind_all()
        log.info("starting %d workers on one data directory (%s)", options.workers,
                 options.data_dir)
        return supervisor.run()
    finally:
        supervisor.close_sockets()
        if ours:
            shutil.rmtree(directory, ignore_errors=True)
