"""Running skopeo against the gateway with a private configuration: an empty
registries.conf (no mirrors or search registries from the machine), an accept-all
policy, its own HOME and tmpdir, and proxies pointed at nothing so that only
loopback can be reached. Plus readers for the dir: and oci: layouts it writes."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tools import require_tool


@dataclass
class Skopeo:
    workdir: Path
    binary: str = field(default_factory=lambda: require_tool("skopeo"))

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "registries.conf").write_text("")
        (self.workdir / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        (self.workdir / "tmp").mkdir(exist_ok=True)
        # A loopback port with nothing listening: anything skopeo might try to proxy fails.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self._dead_proxy = f"http://127.0.0.1:{probe.getsockname()[1]}"

    def _env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.workdir),
            "XDG_RUNTIME_DIR": str(self.workdir),
            "CONTAINERS_REGISTRIES_CONF": str(self.workdir / "registries.conf"),
            "HTTP_PROXY": self._dead_proxy,
            "HTTPS_PROXY": self._dead_proxy,
        }

    def run(self, *args: str, global_args: tuple[str, ...] = (),
            timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        command = [self.binary, "--policy", str(self.workdir / "policy.json"),
                   "--tmpdir", str(self.workdir / "tmp"), *global_args, *args]
        done = subprocess.run(command, capture_output=True, env=self._env(), timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {done.returncode}\n"
                f"stderr:\n{done.stderr.decode(errors='replace')[-4000:]}")
        return done

    def inspect_raw(self, reference: str) -> bytes:
        return self.run("inspect", "--raw", "--tls-verify=false", f"docker://{reference}").stdout

    def copy(self, reference: str, destination: str, *flags: str,
             architecture: str | None = None) -> None:
        global_args = ("--override-arch", architecture) if architecture else ()
        self.run("copy", "--src-tls-verify=false", *flags, f"docker://{reference}", destination,
                 global_args=global_args)


def _digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class DirLayout:
    """What `skopeo copy ... dir:PATH` wrote: manifest.json plus blobs named by hex digest."""

    path: Path

    def manifest(self, instance: str | None = None) -> bytes:
        name = "manifest.json" if instance is None else f"{instance.split(':', 1)[1]}.manifest.json"
        return (self.path / name).read_bytes()

    def blob_digests(self) -> dict[str, str]:
        """{file name's digest: digest of the content} for every blob file."""
        found = {}
        for file in self.path.iterdir():
            if len(file.name) == 64 and all(c in "0123456789abcdef" for c in file.name):
                found["sha256:" + file.name] = _digest_of(file)
        return found


@dataclass
class OciLayout:
    """What `skopeo copy ... oci:PATH:TAG` wrote: index.json and blobs/sha256/<hex>."""

    path: Path

    def index(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads((self.path / "index.json").read_text())
        return document

    def manifest_digest(self, tag: str) -> str:
        for entry in self.index()["manifests"]:
            if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return str(entry["digest"])
        raise KeyError(tag)

    def blob(self, digest: str) -> bytes:
        return (self.path / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()

    def blob_digests(self) -> dict[str, str]:
        return {"sha256:" + f.name: _digest_of(f)
                for f in (self.path / "blobs" / "sha256").iterdir()}
