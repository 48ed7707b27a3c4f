"""The processes of a benchmark world: the upstream registry behind the "far" proxy,
the gateway, distribution in proxy mode and nginx; each a context manager that stops
what it started. All listen on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import REPO, Proc, free_port, get_json, running, wait_http
from .trees import CURRENT, GatewayTree

REGISTRY_BINARY = "/usr/bin/docker-registry"
NGINX_BINARY = "/usr/sbin/nginx"
TOKEN_SERVICE = "bench-registry"
TOKEN_ISSUER = "bench-token-issuer"
ROUTE = "far.bench.test"


@dataclass
class Tool:
    """The Go half (bench/benchtool), built into .tools/bin by scripts/install-bench-deps."""

    path: Path

    def run(self, command: str, *args: str, timeout: float = 600) -> dict[str, Any]:
        proc = subprocess.run([str(self.path), command, *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"benchtool {command} failed ({proc.returncode}): {proc.stderr}")
        lines = proc.stdout.strip().splitlines()
        result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        return result


@dataclass
class World:
    workdir: Path
    tool: Tool
    keys: Path
    storage: Path  # the seeded upstream registry's storage, shared read-only by scenarios
    image: dict[str, Any] = field(default_factory=dict)
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def fresh_dir(self, name: str) -> Path:
        path = self.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    @property
    def ca(self) -> Path:
        return self.keys / "tls.crt"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@dataclass
class Server:
    """Something a client can pull from."""

    name: str
    url: str
    proc: Proc
    data_dir: Path | None = None

    def pids(self) -> list[int]:
        return self.proc.pids()


def _write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    return path


def _registry_config(root: Path, port: int, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "fields": {"service": "registry"}},
        "storage": {"cache": {"blobdescriptor": "inmemory"},
                    "filesystem": {"rootdirectory": str(root)},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "registry-gateway-bench",
                 "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    config.update(extra)
    return config


# ---------------------------------------------------------------- seeding


@contextlib.contextmanager
def _seed_registry(world: World) -> Iterator[str]:
    """An open registry over world.storage, for pushing; its URL."""
    port = free_port()
    config = _write_config(world.workdir / "seed-registry.yml",
                           _registry_config(world.storage, port, log={"level": "warn"}))
    with running("seed-registry", [REGISTRY_BINARY, "serve", str(config)],
                 world.logs / "seed-registry.log") as proc:
        wait_http(proc, f"http://127.0.0.1:{port}/v2/")
        yield f"http://127.0.0.1:{port}"


def _mib(sizes: list[float]) -> str:
    return ",".join(f"{m:g}" for m in sizes)


def seed(world: World, *, layers_mib: list[float], extra_mib: list[float]) -> dict[str, Any]:
    """Push a random image (and the extra blobs) into world.storage through an open registry."""
    with _seed_registry(world) as url:
        image = world.tool.run("seed", "-registry", url, "-repo", "bench/app",
                               "-layers-mib", _mib(layers_mib), "-extra-mib", _mib(extra_mib))
    world.image = image
    return image


def seed_images(world: World, repositories: list[str], *,
                layers_mib: list[float]) -> list[dict[str, Any]]:
    """One random image per repository (`latest`), no layer shared with another image."""
    with _seed_registry(world) as url:
        return [world.tool.run("seed", "-registry", url, "-repo", repo, "-seed",
                               str(1000 + number), "-layers-mib", _mib(layers_mib))
                for number, repo in enumerate(repositories)]


# ---------------------------------------------------------------- the far upstream


@dataclass
class Far:
    url: str
    registry: Proc
    proxy: Proc

    def reset(self) -> None:
        get_json(f"{self.url}/__bench/reset")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = get_json(f"{self.url}/__bench/stats")
        stats["total_bytes"] = sum(stats["bytes"].values())
        stats["total_requests"] = sum(stats["requests"].values())
        return stats


@contextlib.contextmanager
def far_upstream(world: World, *, latency_ms: float, rate_mb: float,
                 total_mb: float = 0) -> Iterator[Far]:
    """The upstream registry (token auth) behind the throttling proxy with the token server
    (`rate_mb` per connection, `total_mb` over all of them if given)."""
    reg_port, far_port = free_port(), free_port()
    far_url = f"http://127.0.0.1:{far_port}"
    config = _write_config(world.workdir / "upstream-registry.yml", _registry_config(
        world.storage, reg_port, log={"level": "warn", "accesslog": {"disabled": True}},
        auth={"token": {"realm": f"{far_url}/token", "service": TOKEN_SERVICE,
                        "issuer": TOKEN_ISSUER,
                        "rootcertbundle": str(world.keys / "token.crt")}}))
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(running(
            "upstream-registry", [REGISTRY_BINARY, "serve", str(config)],
            world.logs / "upstream-registry.log"))
        wait_http(registry, f"http://127.0.0.1:{reg_port}/v2/")
        proxy = stack.enter_context(running("far-proxy", [
            str(world.tool.path), "far", "-listen", f"127.0.0.1:{far_port}",
            "-upstream", f"http://127.0.0.1:{reg_port}", "-latency", f"{latency_ms}ms",
            "-rate-mb", str(rate_mb), "-total-mb", str(total_mb),
            "-token-key", str(world.keys / "token.key"),
            "-token-cert", str(world.keys / "token.crt"), "-service", TOKEN_SERVICE,
            "-issuer", TOKEN_ISSUER], world.logs / "far-proxy.log"))
        wait_http(proxy, f"{far_url}/__bench/stats")
        yield Far(far_url, registry, proxy)


# ---------------------------------------------------------------- the gateway


def gateway_has_tls(tree: GatewayTree = CURRENT) -> bool:
    """Whether this gateway serves HTTPS (`serve --tls-listen`, certificates from --certs)."""
    return "--tls-listen" in tree.run("-m", "gateway", "serve", "--help").stdout


def gateway_has_workers(tree: GatewayTree = CURRENT) -> bool:
    """Whether this gateway runs worker processes (`serve --workers N`)."""
    return "--workers" in tree.run("-m", "gateway", "serve", "--help").stdout


def gateway_version(tree: GatewayTree = CURRENT) -> str:
    return tree.version()


@contextlib.contextmanager
def gateway(world: World, far: Far, data_dir: Path, *, tls: bool = False,
            name: str = "gateway", tree: GatewayTree = CURRENT,
            cache: dict[str, Any] | None = None,
            route: dict[str, Any] | None = None, sections: dict[str, Any] | None = None,
            label: str | None = None, workers: int = 1) -> Iterator[Server]:
    """`python -m gateway serve` from `tree` (this working tree unless a baseline), one
    route to the far upstream (with the `route` keys if given), `cache` as routes.yaml's
    `cache:` section and `sections` as more top-level sections if given; its records
    carry `label` (default `tree.label`) as the target. `workers`: processes (a tree
    without `--workers` runs one whatever is asked)."""
    port = free_port()
    config: dict[str, Any] = {"default_route": ROUTE,
                              "routes": {ROUTE: {"upstream": far.url, **(route or {})}},
                              **(sections or {})}
    if cache is not None:
        config["cache"] = cache
    routes = _write_config(data_dir.parent / f"{data_dir.name}-routes.yaml", config)
    argv = [sys.executable, "-m", "gateway", "serve", "--routes", str(routes),
            "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"]
    if gateway_has_workers(tree):  # explicit: the default is one worker per core
        argv += ["--workers", str(workers)]
    url = f"http://127.0.0.1:{port}"
    if tls:
        # Only the bench's TLS certificate (for 127.0.0.1) in the certificate directory.
        certs = data_dir.parent / f"{data_dir.name}-certs"
        certs.mkdir(exist_ok=True)
        for file in ("tls.crt", "tls.key"):
            shutil.copy(world.keys / file, certs / file)
        (certs / "tls.key").chmod(0o600)
        tls_port = free_port()
        argv += ["--tls-listen", f"127.0.0.1:{tls_port}", "--certs", str(certs)]
        url = f"https://127.0.0.1:{tls_port}"
    with running(name, argv, world.logs / f"{name}.log", cwd=tree.root,
                 env=tree.env()) as proc:
        wait_http(proc, f"{url}/v2/", context=world.ssl_context() if tls else None)
        yield Server(label or tree.label, url, proc, data_dir)


# ---------------------------------------------------------------- distribution


@contextlib.contextmanager
def distribution(world: World, far: Far, data_dir: Path, *, tls: bool = False,
                 name: str = "distribution") -> Iterator[Server]:
    """Debian's docker-registry (CNCF distribution 2.8) as a pull-through cache."""
    port = free_port()
    config = _registry_config(data_dir, port, proxy={"remoteurl": far.url})
    scheme = "http"
    if tls:
        config["http"]["tls"] = {"certificate": str(world.keys / "tls.crt"),
                                 "key": str(world.keys / "tls.key")}
        scheme = "https"
    path = _write_config(data_dir.parent / f"{data_dir.name}-config.yml", config)
    url = f"{scheme}://127.0.0.1:{port}"
    with running(name, [REGISTRY_BINARY, "serve", str(path)], world.logs / f"{name}.log") as proc:
        wait_http(proc, f"{url}/v2/", context=world.ssl_context() if tls else None)
        yield Server("distribution", url, proc, data_dir)


# ---------------------------------------------------------------- nginx

_NGINX_CONF = """\
# nginx serving the gateway's own blob files: Debian's defaults (worker_processes auto,
# sendfile, tcp_nopush, an access log), plus long keep-alive for the load generator.
worker_processes auto;
user root root;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    access_log {root}/access.log combined;
    default_type application/octet-stream;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        location ~ "^/v2/.+/blobs/(sha256:[0-9a-f]{{64}})$" {{
            alias {root}/blobs/$1;
            add_header Docker-Content-Digest $1;
        }}
        location ~ "^/v2/.+/manifests/(sha256:[0-9a-f]{{64}})$" {{
            alias {root}/manifests/$1;
            default_type application/vnd.oci.image.manifest.v1+json;
            add_header Docker-Content-Digest $1;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    plain: Server
    tls: Server


@contextlib.contextmanager
def nginx(world: World, blobs: dict[str, Path], manifests: dict[str, bytes]) -> Iterator[Nginx]:
    """nginx over the same blob files (hard links to the gateway's cache), HTTP and TLS."""
    root = world.fresh_dir("nginx")
    (root / "blobs").mkdir()
    (root / "manifests").mkdir()
    (root / "tmp").mkdir()
    for digest, path in blobs.items():
        os.link(path, root / "blobs" / digest)
    for digest, body in manifests.items():
        (root / "manifests" / digest).write_bytes(body)
    port, tls_port = free_port(), free_port()
    conf = root / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(root=root, port=port, tls_port=tls_port,
                                       cert=world.keys / "tls.crt", key=world.keys / "tls.key"))
    argv = [NGINX_BINARY, "-c", str(conf), "-p", str(root), "-e", str(root / "error.log"),
            "-g", "daemon off;"]
    with running("nginx", argv, world.logs / "nginx.log") as proc:
        wait_http(proc, f"http://127.0.0.1:{port}/", ok=(200, 404))
        wait_http(proc, f"https://127.0.0.1:{tls_port}/", ok=(200, 404),
                  context=world.ssl_context())
        yield Nginx(Server("nginx", f"http://127.0.0.1:{port}", proc),
                    Server("nginx", f"https://127.0.0.1:{tls_port}", proc))


def versions() -> dict[str, str]:
    """What ran: the comparison targets' versions, for BENCHMARKS.md."""
    def out(argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "missing"
        return (proc.stdout + proc.stderr).strip().splitlines()[0] if (
            proc.stdout or proc.stderr) else "?"

    def deb(pkg: str) -> str:
        return out(["dpkg-query", "-W", "-f=${Version}", pkg])

    dirty = out(["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway"])
    commit = out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return {
        "gateway": gateway_version(),
        "gateway_commit": commit + (" with uncommitted changes in gateway/"
                                    if dirty not in ("", "?") else ""),
        "python": sys.version.split()[0],
        "aiohttp": importlib.metadata.version("aiohttp"),
        "distribution": f"docker-registry {deb('docker-registry')} "
                        f"({out([REGISTRY_BINARY, '--version'])})",
        "nginx": f"nginx {deb('nginx')}",
        "go": out(["/usr/local/go/bin/go", "version"]),
    }
