"""SIGHUP means "reload", never "stop": a gateway serving plain HTTP used to die on it
(the handler was installed only with TLS), failing most pulls of a running loop. And a
reload (SIGHUP or routes.yaml changed on disk) under load puts the new config in effect
without failing a request; a file that does not validate is refused and reported."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import REPOSITORY_ROOT, Gateway
from tests.support.images import ACCEPT_ALL_MANIFESTS, Image, make_image
from tests.support.net import free_port
from tests.support.pulls import fetch, pull_image
from tests.support.tls_gateway import install_acme_sh_layout
from tests.support.upstreams import Upstream, route_entry, unique_repository
from tests.support.wait import wait_for, wait_until

pytestmark = pytest.mark.integration

CLIENTS = 32
PULLS_PER_CLIENT = 15
HANGUPS = 5


async def pull(http: aiohttp.ClientSession, base: str, repository: str, image: Image) -> None:
    """One pull: the manifest by tag, then every blob, each checked against its digest."""
    async with http.get(f"{base}/v2/{repository}/manifests/latest",
                        headers={"Accept": ACCEPT_ALL_MANIFESTS}) as resp:
        assert resp.status == 200, resp.status
        assert await resp.read() == image.manifest.data
    for blob in image.blobs:
        async with http.get(f"{base}/v2/{repository}/blobs/{blob.digest}") as resp:
            assert resp.status == 200, resp.status
            assert "sha256:" + hashlib.sha256(await resp.read()).hexdigest() == blob.digest


async def test_sighup_under_a_pull_loop_never_ends_the_process(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    upstream = start_upstream("docker.io")
    repository = unique_repository("hup")
    image = upstream.push(repository, make_image(layer_sizes=(8192, 65536)))
    routes: dict[str, Any] = {"default_route": "docker.io",
                              "routes": {"docker.io": route_entry(upstream)}}
    gateway = start_gateway(routes)
    assert gateway.process is not None
    base = gateway.url()
    failures: list[BaseException] = []
    done = 0
    progressed = asyncio.Event()

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal done
        for _ in range(PULLS_PER_CLIENT):
            try:
                await pull(http, base, repository, image)
                done += 1
            except (AssertionError, aiohttp.ClientError) as exc:
                failures.append(exc)
            progressed.set()

    async def hang_up() -> None:
        # Spread over the loop by progress, not by time: each signal lands mid-run.
        assert gateway.process is not None
        total = CLIENTS * PULLS_PER_CLIENT
        for k in range(1, HANGUPS + 1):
            while done < k * total // (HANGUPS + 1) and not failures:
                progressed.clear()
                await progressed.wait()
            gateway.process.send_signal(signal.SIGHUP)

    async with aiohttp.ClientSession(trust_env=False) as http:
        await asyncio.gather(hang_up(), *(client(http) for _ in range(CLIENTS)))
        assert gateway.process.poll() is None, "SIGHUP ended the gateway"
        assert failures == [] and done == CLIENTS * PULLS_PER_CLIENT, failures[:3]
        await pull(http, base, repository, image)  # and it still serves afterwards
    wait_for(lambda: gateway.log().count('"SIGHUP') == HANGUPS, what="a log line per SIGHUP",
             diagnostics=gateway.log)


# ---------------------------------------------------------------- live reload under load

LOOP_CLIENTS = 16
RELOADS = 20


@dataclass
class PullLoop:
    """Clients pulling images in a loop until stopped; every failure kept."""

    http: aiohttp.ClientSession
    base: str
    images: list[tuple[str, Image]]
    failures: list[str] = field(default_factory=list)
    pulls: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, k: int) -> None:
        while not self._stop.is_set():
            repository, image = self.images[(k + self.pulls) % len(self.images)]
            try:
                await pull_image(self.http, self.base, repository, "latest", image)
                self.pulls += 1
            except (AssertionError, aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")

    async def run_while(self, work: Awaitable[None], clients: int = LOOP_CLIENTS) -> None:
        tasks = [asyncio.create_task(self.client(k)) for k in range(clients)]
        try:
            await work
        finally:
            self._stop.set()
            await asyncio.gather(*tasks)


async def metric(http: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == name and s.labels == labels)


async def route_names(http: aiohttp.ClientSession, base: str) -> list[str]:
    async with http.get(f"{base}/_gateway/routes") as resp:
        assert resp.status == 200
        return [r["name"] for r in (await resp.json())["routes"]]


def write_atomically(path: Path, document: dict[str, Any]) -> None:
    new = path.with_name(path.name + ".new")
    new.write_text(yaml.safe_dump(document, sort_keys=False))
    os.replace(new, path)


def with_tls(tmp_path: Path) -> tuple[tuple[str, ...], int, ssl.SSLContext]:
    """Gateway arguments for a TLS listener on 127.0.0.1, its port, and a client context
    trusting it."""
    ca = trustme.CA()
    install_acme_sh_layout(tmp_path / "certs", ca.issue_cert("127.0.0.1", "gw.test"), "gw.test")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    port = free_port()
    return ("--tls-listen", f"127.0.0.1:{port}", "--certs", str(tmp_path / "certs")), port, \
        context


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_sighup_under_load_puts_the_new_config_in_effect(
        tls: bool, tmp_path: Path, start_upstream: Callable[..., Upstream],
        start_gateway: Callable[..., Gateway]) -> None:
    hub, ghcr = start_upstream("docker.io"), start_upstream("ghcr.io")
    repository = unique_repository("hup")
    image = hub.push(repository, make_image(layer_sizes=(8192, 65536)))
    added = ghcr.push(repository, make_image(layer_sizes=(4096,)))
    before = {"default_route": "docker.io", "routes": {"docker.io": route_entry(hub)}}
    after = {"default_route": "docker.io", "routes": {"docker.io": route_entry(hub),
                                                      "ghcr.io": route_entry(ghcr)}}
    args: tuple[str, ...] = ("--config-poll", "0")  # only SIGHUP reloads here
    context: ssl.SSLContext | None = None
    tls_port = 0
    if tls:
        tls_args, tls_port, context = with_tls(tmp_path)
        args += tls_args
    gateway = start_gateway(before, extra_args=args)
    assert gateway.process is not None
    plain = gateway.url()  # the admin endpoints, and the pulls without TLS
    base = f"https://127.0.0.1:{tls_port}" if tls else plain

    async def reload_twice(http: aiohttp.ClientSession) -> None:
        assert gateway.process is not None
        for document, names in ((after, ["docker.io", "ghcr.io"]), (before, ["docker.io"])):
            target = loop.pulls + 20  # mid-run: with pulls before and after each signal
            await wait_until(lambda t=target: loop.pulls >= t or bool(loop.failures),
                             what="pulls before the signal")
            gateway.routes_path.write_text(yaml.safe_dump(document, sort_keys=False))
            gateway.process.send_signal(signal.SIGHUP)

            async def applied(names: list[str] = names) -> bool:
                return await route_names(http, plain) == names

            await wait_until(applied, what=f"routes {names} after SIGHUP",
                             diagnostics=gateway.log)
            if "ghcr.io" in names:  # the new route serves, under load
                await pull_image(http, base, f"ghcr.io/{repository}", "latest", added)
            else:
                gone = await fetch(http, f"{base}/v2/ghcr.io/{repository}/manifests/latest")
                assert gone.status == 404, gone.describe()

    connector = aiohttp.TCPConnector(ssl=context) if context is not None else None
    async with aiohttp.ClientSession(trust_env=False, connector=connector) as http:
        loop = PullLoop(http, base, [(repository, image)])
        await loop.run_while(reload_twice(http))
        assert gateway.process.poll() is None, "SIGHUP ended the gateway"
        assert loop.failures == [], loop.failures[:3]
        assert await metric(http, plain, "gateway_config_reloads_total", result="ok") == 2
    assert gateway.logged('"SIGHUP', count=2).count('"SIGHUP') == 2


async def test_twenty_reloads_during_a_pull_loop_fail_nothing_and_a_bad_file_is_refused(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway]) -> None:
    hub, ghcr = start_upstream("docker.io"), start_upstream("ghcr.io")
    images = [(repository, hub.push(repository, make_image(layer_sizes=(16384, 300_000))))
              for repository in (unique_repository("reload") for _ in range(4))]

    def variant(k: int) -> dict[str, Any]:
        # tag_ttl 0s: every manifest by tag asks the upstream, so its client is in use
        # all the time; it alternates, so the docker.io client itself is replaced.
        routes = {"docker.io": route_entry(hub, tag_ttl="0s" if k % 2 else "1s")}
        if k % 4 < 2:
            routes["ghcr.io"] = route_entry(ghcr)
        return {"default_route": "docker.io", "routes": routes}

    gateway = start_gateway(variant(0), extra_args=("--config-poll", "0.2"))
    assert gateway.process is not None
    base = gateway.url()

    async def reload_twenty_times(http: aiohttp.ClientSession) -> None:
        assert gateway.process is not None
        for k in range(1, RELOADS + 1):
            ok = await metric(http, base, "gateway_config_reloads_total", result="ok")
            if k % 2:  # SIGHUP (after a write in place, which the poll may see first)
                gateway.routes_path.write_text(yaml.safe_dump(variant(k), sort_keys=False))
                gateway.process.send_signal(signal.SIGHUP)
            else:  # a change on disk only, by rename as editors and config tools do
                write_atomically(gateway.routes_path, variant(k))
            names = list(variant(k)["routes"])

            async def applied(ok: float = ok, names: list[str] = names) -> bool:
                return (await metric(http, base, "gateway_config_reloads_total",
                                     result="ok") > ok
                        and await route_names(http, base) == names)

            await wait_until(applied, what=f"reload {k}", diagnostics=gateway.log)
            await asyncio.sleep(0.1)  # some pulls in between

    async with aiohttp.ClientSession(trust_env=False) as http:
        loop = PullLoop(http, base, images)
        await loop.run_while(reload_twenty_times(http))
        assert gateway.process.poll() is None
        assert loop.failures == [] and loop.pulls > LOOP_CLIENTS, (loop.pulls, loop.failures[:3])
        assert await metric(http, base, "gateway_config_reloads_total", result="error") == 0

        # A file that does not validate: refused whole, the old config stays, and says so.
        names = await route_names(http, base)
        broken = yaml.safe_dump(variant(0), sort_keys=False) + "cache:\n  max_size: lots\n"
        new = gateway.routes_path.with_name("routes.yaml.new")
        new.write_text(broken)
        os.replace(new, gateway.routes_path)
        line = broken.splitlines().index("  max_size: lots") + 1
        await wait_until(lambda: _metric_is(http, base, "gateway_config_reloads_total", 1,
                                            result="error"),
                         what="the refused reload to be counted", diagnostics=gateway.log)
        # The log is written by its own thread, a moment after the metric moved.
        await wait_until(lambda: f"{gateway.routes_path}:{line}: cache.max_size"
                         in gateway.log(), what="the refusal logged", timeout=5,
                         diagnostics=gateway.log)
        assert "the running config stays" in gateway.log()
        assert await metric(http, base, "gateway_config_last_reload_successful") == 0
        assert await route_names(http, base) == names
        repository, image = images[0]
        await pull_image(http, base, repository, "latest", image)
        check = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", "check", "--config",
                             str(gateway.routes_path)], capture_output=True, text=True,
            cwd=REPOSITORY_ROOT, timeout=60)
        assert check.returncode == 1
        assert f"{gateway.routes_path}:{line}: cache.max_size" in check.stderr

        # Fixed: reloaded again.
        write_atomically(gateway.routes_path, variant(2))
        await wait_until(lambda: _metric_is(http, base, "gateway_config_last_reload_successful",
                                            1), what="the fixed file to reload",
                         diagnostics=gateway.log)
        assert await route_names(http, base) == list(variant(2)["routes"])
        assert gateway.process.poll() is None


async def _metric_is(http: aiohttp.ClientSession, base: str, name: str, value: float,
                     **labels: str) -> bool:
    return await metric(http, base, name, **labels) == value
