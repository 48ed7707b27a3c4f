"""The private dockerd on its own: it starts with its own root, sends anything not on
loopback to a refusing loopback proxy, and leaves no dockerd or containerd behind."""

from __future__ import annotations

import os

import pytest

from tests.support.dockerd import run_dockerd

pytestmark = pytest.mark.e2e


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if text.encode() in cmdline.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def test_private_dockerd_is_isolated_and_cleaned_up() -> None:
    with run_dockerd() as daemon:
        root = str(daemon.root)
        assert daemon.docker("info", "--format", "{{.DockerRootDir}}").stdout.strip() == str(
            daemon.data_root)
        assert _processes_mentioning(root), "dockerd should be running"
        proxy = daemon.docker("info", "--format", "{{.HTTPSProxy}}").stdout.strip()
        assert proxy.startswith("http://127.0.0.1:"), "Docker Hub must be unreachable"
    assert not _processes_mentioning(root), "dockerd or containerd outlived the fixture"
    assert not os.path.exists(root)
