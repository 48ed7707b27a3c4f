"""Launching the gateway under test as a real subprocess.

`python -m gateway serve --routes ROUTES --data-dir DIR --listen HOST:PORT ...` with a
routes.yaml written from a dict. Every route must name a loopback upstream (the
presets default to the real registries, which tests must never reach). stderr
goes to a file that fixtures show when a test fails.
"""

from __future__ import annotations

import functools
import os
import resource
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .client import RegistryClient
from .net import ensure_loopback, free_port, http_answers, stop_process
from .wait import wait_for

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]

# Variables that could make the gateway talk to something other than loopback.
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                    "all_proxy", "NO_PROXY", "no_proxy")


def check_loopback_routes(routes: dict[str, Any]) -> None:
    for name, route in (routes.get("routes") or {}).items():
        upstream = (route or {}).get("upstream")
        if not upstream:
            raise ValueError(f"route {name!r} has no upstream: presets point at the internet")
        fallbacks = (route or {}).get("fallbacks") or []
        for url in [upstream, *([fallbacks] if isinstance(fallbacks, str) else fallbacks)]:
            host = urllib.parse.urlsplit(url).hostname
            assert host is not None, url
            ensure_loopback(host)


@dataclass
class Gateway:
    """One gateway process listening on the same port on each of `listen_hosts`."""

    workdir: Path
    routes: dict[str, Any]
    listen_hosts: tuple[str, ...] = ("127.0.0.1",)
    env: dict[str, str] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()
    nofile: int | None = None  # the process's descriptor limit (soft and hard)
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def routes_path(self) -> Path:
        return self.workdir / "routes.yaml"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "gateway.stderr.log"

    @property
    def host(self) -> str:
        return self.listen_hosts[0]

    def url(self, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}"

    def address(self, host: str | None = None) -> str:
        """host:port as a client image reference wants it."""
        return f"{host or self.host}:{self.port}"

    def client(self, *, host: str | None = None, host_header: str | None = None) -> RegistryClient:
        return RegistryClient(host or self.host, self.port, host_header=host_header)

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logged(self, text: str, *, count: int = 1, timeout: float = 10.0) -> str:
        """The log once `text` is in it `count` times: the gateway's writer thread batches
        lines (up to 50 ms late), so a line is not on disk the moment its effect is seen."""
        wait_for(lambda: self.log().count(text) >= count, what=f"{text!r} logged {count}x",
                 timeout=timeout, diagnostics=self.log)
        return self.log()

    def write_routes(self) -> None:
        check_loopback_routes(self.routes)
        self.routes_path.write_text(yaml.safe_dump(self.routes, sort_keys=False))

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError("gateway already running")
        for host in self.listen_hosts:
            ensure_loopback(host)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_routes()
        if not self.port:
            self.port = free_port(*self.listen_hosts)
        command = [sys.executable, "-m", "gateway", "serve", "--routes", str(self.routes_path),
                   "--data-dir", str(self.data_dir)]
        for host in self.listen_hosts:
            command += ["--listen", f"{host}:{self.port}"]
        # One process unless the test asks for workers: the default (one per core) would
        # make every test's counts, logs and injected faults span processes.
        if "--workers" not in self.extra_args:
            command += ["--workers", "1"]
        command += list(self.extra_args)
        environment = {k: v for k, v in os.environ.items() if k not in _PROXY_VARIABLES}
        environment.update(self.env)
        nofile = self.nofile

        def limit_descriptors() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with self.stderr_path.open("ab") as stderr:
            self.process = subprocess.Popen(
                command, cwd=REPOSITORY_ROOT, env=environment, stdin=subprocess.DEVNULL,
                stdout=stderr, stderr=stderr,
                preexec_fn=limit_descriptors if nofile is not None else None,
            )
        try:
            for host in self.listen_hosts:
                wait_for(functools.partial(http_answers, host, self.port),
                         what=f"gateway on {host}", process=self.process, diagnostics=self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


@contextmanager
def run_gateway(workdir: Path, routes: dict[str, Any], *,
                listen_hosts: tuple[str, ...] = ("127.0.0.1",), env: dict[str, str] | None = None,
                extra_args: tuple[str, ...] = (),
                nofile: int | None = None) -> Iterator[Gateway]:
    gateway = Gateway(workdir, routes, listen_hosts, dict(env or {}), extra_args, nofile)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()
