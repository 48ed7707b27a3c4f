"""Real SeaweedFS for the S3 store's tests: `weed server -filer -s3` (built into
./.tools/bin by scripts/install-test-deps) on loopback ports, with a temporary data
directory, one S3 identity (access key and secret) and one bucket; stopped by the fixture
that started it.

The test's own view of the bucket goes through botocore's plain (sync) client, not the
gateway's code; the S3 requests SeaweedFS served are read from its Prometheus metrics
(`SeaweedFS_s3_request_total`, every method, HEAD included).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config as BotoConfig

from .net import free_port, http_answers, stop_process
from .tools import local_tool
from .wait import wait_for

_REQUESTS = re.compile(r'^SeaweedFS_s3_request_total\{([^}]*)\} (\S+)$', re.MULTILINE)


@dataclass
class SeaweedFS:
    workdir: Path
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    s3_port: int = 0
    metrics_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _client: Any = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def storage(self, **extra: Any) -> dict[str, Any]:
        """A routes.yaml `storage:` section for this bucket (the secret in a file)."""
        secret_file = self.workdir / "s3-secret"
        secret_file.write_text(self.secret_key + "\n")
        return {"type": "s3", "endpoint": self.endpoint, "bucket": self.bucket,
                "region": "us-east-1", "path_style": True, "access_key": self.access_key,
                "secret_key_file": str(secret_file), **extra}

    @property
    def client(self) -> Any:
        """botocore's sync S3 client for this bucket (the test's own view)."""
        if self._client is None:
            self._client = botocore.session.get_session().create_client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1",
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                config=BotoConfig(s3={"addressing_style": "path"},
                                  request_checksum_calculation="when_required",
                                  response_checksum_validation="when_required"))
        return self._client

    def keys(self, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix`: key -> size."""
        found: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = item["Size"]
        return found

    def object(self, key: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body

    def uploads(self) -> list[str]:
        """Keys of multipart uploads begun and neither completed nor aborted."""
        answer = self.client.list_multipart_uploads(Bucket=self.bucket)
        return [upload["Key"] for upload in answer.get("Uploads", [])]

    def requests(self) -> dict[tuple[str, str], int]:
        """S3 requests served for our bucket so far: (method, status) -> count."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as answer:
            text = answer.read().decode()
        counts: dict[tuple[str, str], int] = {}
        for labels, value in _REQUESTS.findall(text):
            found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if found.get("bucket") == self.bucket:
                key = (found.get("type", ""), found.get("code", ""))
                counts[key] = counts.get(key, 0) + int(float(value))
        return counts

    def request_count(self) -> int:
        return sum(self.requests().values())

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=3)  # a test directory: no need to wait long
            self.process = None


def _ports(count: int) -> list[int]:
    """`count` distinct free loopback ports whose +10000 neighbour is free too (SeaweedFS
    puts a service's gRPC port there unless told; we tell it, but keep clear anyway)."""
    found: list[int] = []
    while len(found) < count:
        port = free_port()
        if port < 55000 and port not in found and port + 10000 not in found:
            found.append(port)
    return found


@contextmanager
def run_seaweed(workdir: Path, *, bucket: str = "gateway-test") -> Iterator[SeaweedFS]:
    """SeaweedFS with S3 on loopback, one identity, `bucket` created; stopped after."""
    weed = local_tool("weed")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    seaweed = SeaweedFS(workdir, bucket, access_key="gw" + secrets.token_hex(6),
                        secret_key=secrets.token_urlsafe(24))
    identities = workdir / "s3-identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "gateway",
        "credentials": [{"accessKey": seaweed.access_key, "secretKey": seaweed.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, volume, filer, s3, metrics, *grpc = _ports(9)
    seaweed.s3_port, seaweed.metrics_port = s3, metrics
    command = [
        weed, "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={grpc[0]}",
        f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}", f"-s3.config={identities}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-metricsPort={metrics}",
        # Small volumes: the tests store megabytes, not the default 30 GB volumes.
        "-master.volumeSizeLimitMB=64", "-volume.max=32",
    ]
    with seaweed.log_path.open("ab") as log:
        seaweed.process = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=log)
    try:
        wait_for(lambda: http_answers("127.0.0.1", s3, "/"), what="SeaweedFS S3",
                 timeout=60, process=seaweed.process, diagnostics=seaweed.log)

        def bucket_made() -> bool:
            try:
                seaweed.client.create_bucket(Bucket=bucket)
            except seaweed.client.exceptions.BucketAlreadyOwnedByYou:
                return True
            except Exception:  # the filer may still be starting: try again
                return False
            return True

        wait_for(bucket_made, what=f"bucket {bucket}", timeout=60, interval=0.2,
                 process=seaweed.process, diagnostics=seaweed.log)
        # The first write grows the bucket's volumes (~8 s): pay it here, not in a test.
        seaweed.client.put_object(Bucket=bucket, Key="warm-up", Body=b"x")
        seaweed.client.delete_object(Bucket=bucket, Key="warm-up")
        yield seaweed
    finally:
        seaweed.stop()
