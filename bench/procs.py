"""Processes the benchmark starts: start, wait until they answer, measure, stop.

Every process is started in its own process group and stopped by its own id (TERM,
then KILL); nothing here stops a process it did not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """One child process with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, *,
                 cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(self.argv, stdout=self._out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """This process and its descendants (nginx workers)."""
        found = [self.pid]
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        queue = [self.pid]
        while queue:
            for child in children.get(queue.pop(), []):
                found.append(child)
                queue.append(child)
        return found

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._out.close()


@contextlib.contextmanager
def running(name: str, argv: Sequence[str], log: Path, **kwargs: Any) -> Iterator[Proc]:
    proc = Proc(name, argv, log, **kwargs)
    try:
        yield proc
    finally:
        proc.stop()


def wait_http(proc: Proc, url: str, *, timeout: float = 30.0, ok: Sequence[int] = (200, 401),
              context: Any = None) -> None:
    """Poll `url` until it answers one of `ok`; fail with the process's log if it dies."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                if resp.status in ok:
                    return
                last = str(resp.status)
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
            last = str(exc.code)
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not answer {url} in {timeout}s ({last}):\n{proc.tail()}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


# ---------------------------------------------------------------- /proc


def reset_peak_rss(pids: Sequence[int]) -> None:
    """Reset VmHWM (write 5 to clear_refs, Linux 4.0+) so the next peak is this window's."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mb(pids: Sequence[int]) -> float:
    """Sum of VmHWM over the processes (nginx: master and workers), in MB (10^6)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return round(total / 1e6, 1)


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def _machine_busy() -> float:
    """Non-idle CPU seconds of the whole machine since boot (all cores)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class _QuietBudget:
    seconds = 60.0  # at most this long waited in one run, in all


def set_quiet_budget(seconds: float) -> None:
    _QuietBudget.seconds = seconds


def wait_quiet(*, threshold_cores: float = 0.3, max_wait: float = 10.0) -> float:
    """Before a measurement: write back dirty pages (cold runs leave GBs of them, and
    their writeback would land in the next window), then wait (bounded) until other work
    on the machine is below `threshold_cores`; our own servers are idle between windows.
    Returns the load seen last."""
    os.sync()
    deadline = time.monotonic() + min(max_wait, _QuietBudget.seconds)
    load = 0.0
    while True:
        began, busy0 = time.monotonic(), _machine_busy()
        time.sleep(1.0)
        elapsed = time.monotonic() - began
        load = (_machine_busy() - busy0) / elapsed
        _QuietBudget.seconds = max(0.0, _QuietBudget.seconds - elapsed)
        if load < threshold_cores or time.monotonic() >= deadline:
            return load


class OtherLoad:
    """Measures CPU that neither the given processes nor our child commands used: other
    work on the machine while a measurement ran (in cores, averaged)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.began = time.monotonic()
        self.busy = _machine_busy()
        self.ours = cpu_seconds(self.pids) + self._children()

    @staticmethod
    def _children() -> float:
        return children_cpu()

    def cores(self) -> float:
        elapsed = time.monotonic() - self.began
        busy = _machine_busy() - self.busy
        ours = cpu_seconds(self.pids) + self._children() - self.ours
        return round(max(busy - ours, 0.0) / elapsed, 2) if elapsed > 0 else 0.0


def children_cpu() -> float:
    """CPU seconds of our finished child commands (the Go client runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
