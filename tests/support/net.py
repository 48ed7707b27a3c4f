"""Loopback helpers: free ports, whether a server answers HTTP, stopping a process.

Only 127.0.0.0/8 addresses are ever used; nothing here may reach another host.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import subprocess


def ensure_loopback(host: str) -> None:
    """Refuse anything that is not a loopback address: tests must never leave the machine."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address")


def free_port(*hosts: str) -> int:
    """A TCP port that is free on every one of `hosts` (default 127.0.0.1) right now."""
    hosts = hosts or ("127.0.0.1",)
    for host in hosts:
        ensure_loopback(host)
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port: int = probe.getsockname()[1]
        if all(_port_is_free(host, port) for host in hosts[1:]):
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def http_answers(host: str, port: int, path: str = "/v2/") -> bool:
    """True when something at host:port answers an HTTP GET with any status."""
    connection = http.client.HTTPConnection(host, port, timeout=2)
    try:
        connection.request("GET", path)
        connection.getresponse().read()
    except OSError:
        return False
    finally:
        connection.close()
    return True


def stop_process(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. Safe to call twice."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
