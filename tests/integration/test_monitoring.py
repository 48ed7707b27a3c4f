"""The monitoring files of deploy/: promtool accepts the alert rules and prometheus.yml,
the rules fire on the series they are about (promtool test rules), the Grafana dashboard
parses and its queries are valid PromQL, and every metric that either names exists in the
/metrics of a live gateway (with TLS) that served a few pulls.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.support.gateway import Gateway
from tests.support.images import ACCEPT_ALL_MANIFESTS, make_image
from tests.support.net import free_port
from tests.support.tls_gateway import make_pki, tls_answers
from tests.support.tools import local_tool
from tests.support.upstreams import Upstream, route_entry, unique_repository
from tests.support.wait import wait_for
from tests.support.wheels import REPOSITORY_ROOT

pytestmark = pytest.mark.integration

DEPLOY = REPOSITORY_ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "registry-gateway.json"
# Recorded by Prometheus itself for every scrape, not exported by the gateway.
PROMETHEUS_OWN = {"up"}
_METRIC = re.compile(r"\bgateway_[a-z0-9_]+")
_SELECTED = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([local_tool("promtool"), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"]
               for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def as_promql(grafana: str) -> str:
    """A dashboard query as Prometheus sees it once Grafana has filled in its variables."""
    return (grafana.replace("$__rate_interval", "5m").replace("$__range", "1h")
            .replace("$route", ".*"))


def test_promtool_accepts_the_rules_and_the_config() -> None:
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout
    config = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    names = {rule["alert"] for rule in alert_rules()}
    # What the issue asks to be alerted on, each by at least one rule.
    for wanted in ("UpstreamDown", "UpstreamRateLimited", "QuotaNearlyOut", "DiskNearlyFull",
                   "ErrorRate", "CertificateExpiresSoon"):
        assert f"RegistryGateway{wanted}" in names, wanted


def test_the_alerts_fire_on_what_they_watch(tmp_path: Path) -> None:
    """promtool's rule unit tests: a certificate 10 days from expiry, an account with 5 of
    100 pulls left, an open breaker, 429s; and none of them fires on healthy series."""
    day = 86400
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'gateway_tls_certificate_expiry_timestamp_seconds{certificate='
                           '"fullchain.pem",name="*.example.com",instance="gw"}',
                 "values": f"{10 * day}x120"},
                {"series": 'gateway_tls_certificate_expiry_timestamp_seconds{certificate='
                           '"other.pem",name="other.example.com",instance="gw"}',
                 "values": f"{60 * day}x120"},
                {"series": 'gateway_upstream_ratelimit_remaining{route="docker.io",'
                           'account="bot",instance="gw"}', "values": "5x120"},
                {"series": 'gateway_upstream_ratelimit_limit{route="docker.io",'
                           'account="bot",instance="gw"}', "values": "100x120"},
                {"series": 'gateway_upstream_breaker_state{route="ghcr.io",'
                           'upstream="https://ghcr.io",instance="gw"}', "values": "1x120"},
                {"series": 'gateway_upstream_rate_limited_total{route="docker.io",'
                           'account="bot",kind="pull_limit",instance="gw"}',
                 "values": "0+1x120"},
            ],
            "alert_rule_test": [
                {"eval_time": "90m", "alertname": "RegistryGatewayCertificateExpiresSoon",
                 "exp_alerts": [{"exp_labels": {
                     "severity": "warning", "certificate": "fullchain.pem",
                     "name": "*.example.com", "instance": "gw"},
                     "exp_annotations": _annotations("RegistryGatewayCertificateExpiresSoon",
                                                     certificate="fullchain.pem",
                                                     name="*.example.com")}]},
                {"eval_time": "90m", "alertname": "RegistryGatewayCertificateExpiring",
                 "exp_alerts": []},
                {"eval_time": "10m", "alertname": "RegistryGatewayQuotaNearlyOut",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "route": "docker.io",
                                                "account": "bot", "instance": "gw"},
                                 "exp_annotations": _annotations(
                                     "RegistryGatewayQuotaNearlyOut", route="docker.io",
                                     account="bot", value="5%")}]},
                {"eval_time": "10m", "alertname": "RegistryGatewayUpstreamDown",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "route": "ghcr.io",
                                                "upstream": "https://ghcr.io",
                                                "instance": "gw"},
                                 "exp_annotations": _annotations(
                                     "RegistryGatewayUpstreamDown", route="ghcr.io",
                                     upstream="https://ghcr.io")}]},
                {"eval_time": "30m", "alertname": "RegistryGatewayUpstreamRateLimited",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "route": "docker.io",
                                                "account": "bot", "kind": "pull_limit",
                                                "instance": "gw"},
                                 "exp_annotations": _annotations(
                                     "RegistryGatewayUpstreamRateLimited", route="docker.io",
                                     account="bot", kind="pull_limit")}]},
                {"eval_time": "10m", "alertname": "RegistryGatewayDiskFull", "exp_alerts": []},
            ],
        }],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def _annotations(alert: str, **labels: str) -> dict[str, str]:
    """The rule's annotations with its templates filled in the simple way they are written."""
    rule = next(r for r in alert_rules() if r.get("alert") == alert)
    filled = {}
    for key, text in rule["annotations"].items():
        text = text.replace("{{ $value | humanizePercentage }}", labels.get("value", ""))
        for name, value in labels.items():
            text = text.replace("{{ $labels." + name + " }}", value)
        filled[key] = text
    return filled


def test_the_dashboard_parses_and_its_queries_are_promql(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "registry-gateway"
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for wanted in ("hit ratio", "served vs fetched", "upstream errors", "upstream latency",
                   "rate-limit remaining", "cache usage vs cap", "in-flight", "refusals"):
        assert wanted in titles, wanted
    # Every query, as a recording rule: promtool parses each expression.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": as_promql(query)}
        for n, query in enumerate(dashboard_queries())
        if not query.startswith("label_values(")]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics page can have: sample names and, for each family in a
    # TYPE line, its name with the suffixes of its type (a family without samples yet,
    e.g. no upstream error so far, still exists)."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                                 "_created"),
                "gauge": ("",), "summary": ("_sum", "_count", "_created")}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            base = family.removesuffix("_total")
            names |= {base + suffix for suffix in suffixes.get(kind, ("",))}
    return names


def test_every_metric_the_dashboard_and_alerts_name_is_exported(
        start_gateway: Callable[..., Gateway], start_upstream: Callable[..., Upstream],
        tmp_path: Path) -> None:
    upstream = start_upstream("docker.io")
    pki = make_pki(tmp_path / "pki", "gw.test")
    tls_port = free_port()
    gateway = start_gateway({"base_domains": ["gw.test"], "default_route": "docker.io",
                             "routes": {"docker.io": route_entry(upstream)}},
                            extra_args=("--tls-listen", f"127.0.0.1:{tls_port}",
                                        "--certs", str(pki.certs)))
    wait_for(lambda: tls_answers(tls_port, pki.ca_path, "hub.gw.test"), what="TLS listener",
             process=gateway.process, diagnostics=gateway.log)
    repository = unique_repository("team")
    image = upstream.push(repository, make_image(), tags=("1.0",))
    client = gateway.client()
    for _ in range(3):  # a miss, then hits
        manifest = client.request("GET", f"/v2/{repository}/manifests/1.0",
                                  headers={"Accept": ACCEPT_ALL_MANIFESTS})
        assert manifest.status == 200
        for blob in image.blobs:
            assert client.request("GET", f"/v2/{repository}/blobs/{blob.digest}").status == 200
    assert client.request("GET", f"/v2/{repository}/manifests/absent").status == 404

    with urllib.request.urlopen(f"{gateway.url()}/metrics", timeout=10) as response:
        text = response.read().decode()
    exported = exported_names(text)

    used: dict[str, set[str]] = {}
    sources = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    sources += [("dashboard", query) for query in dashboard_queries()]
    for where, expression in sources:
        for name in _METRIC.findall(expression):
            used.setdefault(name, set()).add(where)
        for name in _SELECTED.findall(expression):  # a selector on anything else
            assert name.startswith("gateway_") or name in PROMETHEUS_OWN, (where, name)
    missing = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not missing, missing
    assert len(used) >= 20, sorted(used)

    # The certificate metric says when the served certificate expires.
    leaf = next((pki.certs / "gw.test_ecc").glob("gw.test.cer")).read_bytes()
    not_after = x509.load_pem_x509_certificate(leaf).not_valid_after_utc.timestamp()
    line = next(line for line in text.splitlines()
                if line.startswith("gateway_tls_certificate_expiry_timestamp_seconds{"))
    assert 'certificate="gw.test_ecc/fullchain.cer"' in line and 'name="gw.test"' in line
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(not_after)
