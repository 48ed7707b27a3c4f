"""The README's first promise: on a checkout, `make run` serves and `/v2/` answers 200;
`registry-gateway check` explains a broken routes.yaml with its file, line and key."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.net import free_port, http_answers
from tests.support.tools import require_tool
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_make_run_serves_v2(tmp_path: Path) -> None:
    require_tool("make")
    port = free_port()
    log = tmp_path / "make-run.log"
    with log.open("wb") as out:
        # Its own process group: make starts the gateway as a child, and both must stop.
        process = subprocess.Popen(
            ["make", "run", f"LISTEN=127.0.0.1:{port}", f"DATA={tmp_path / 'data'}"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: http_answers("127.0.0.1", port), what="make run", timeout=300,
                 process=process, diagnostics=log.read_text)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/v2/")
        response = connection.getresponse()
        body = response.read()
        connection.close()
        assert response.status == 200
        assert body == b"{}"
        assert response.getheader("Docker-Distribution-API-Version") == "registry/2.0"
        assert (tmp_path / "data").is_dir()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def test_check_accepts_the_shipped_routes_and_names_the_line_of_a_mistake(
        tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "gateway", "check", str(ROOT / "routes.yaml")],
                        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "9 routes" in ok.stdout and "hub.example.com" in ok.stdout

    broken = tmp_path / "routes.yaml"
    broken.write_text("routes:\n  docker.io: {}\n  ghcr.io:\n    tag_ttl: soon\n")
    bad = subprocess.run([sys.executable, "-m", "gateway", "check", str(broken)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 1
    assert f"{broken}:4: routes.ghcr.io.tag_ttl" in bad.stderr
    assert "Traceback" not in bad.stderr
