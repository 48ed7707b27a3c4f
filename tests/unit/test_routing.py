"""routing.py: Host, then path prefix, then ns=, then the default; Docker Hub's library/."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import Config, load_config
from gateway.errors import RegistryError
from gateway.routing import Router
from gateway.state import RegistryRequest

ROUTES = textwrap.dedent("""
    base_domains: [example.com, mirror.test]
    default_route: docker.io
    routes:
      docker.io:
        hosts: [hub-mirror.corp, 127.0.0.2]
      ghcr.io:
        hosts: [ghcr-mirror.corp]
      quay.io: {}
      localhost:5000:
        upstream: http://127.0.0.1:5000
        label: local
""")


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(load_config(ROUTES, "routes.yaml", env={}))


def resolve(router: Router, host: str | None, name: str,
            ns: str | None = None) -> tuple[str, str, str]:
    resolved = router.resolve(host, name, ns)
    return resolved.route.name, resolved.repository, resolved.via


# -------------------------------------------------------------------- Host


@pytest.mark.parametrize(("host", "route"), [
    ("hub-mirror.corp", "docker.io"),
    ("ghcr-mirror.corp", "ghcr.io"),
    ("GHCR-Mirror.CORP", "ghcr.io"),
    ("ghcr-mirror.corp:5000", "ghcr.io"),
    ("ghcr-mirror.corp.", "ghcr.io"),
    ("127.0.0.2:5000", "docker.io"),
    ("ghcr.example.com", "ghcr.io"),
    ("quay.mirror.test", "quay.io"),
    ("hub.example.com:443", "docker.io"),
    ("QUAY.Example.Com", "quay.io"),
    ("local.example.com", "localhost:5000"),
])
def test_host_picks_the_route(router: Router, host: str, route: str) -> None:
    name, repository, via = resolve(router, host, "owner/img")
    assert (name, repository, via) == (route, "owner/img", "host")


@pytest.mark.parametrize("host", [
    "example.com", "a.ghcr.example.com", "ghcr.example.org", "nope.example.com",
    "ghcr-mirror.corp.evil", "xghcr.example.com.evil", "[::1]:5000", "", None,
])
def test_hosts_that_pick_no_route_fall_through(router: Router, host: str | None) -> None:
    assert router.by_host(host) is None
    assert resolve(router, host, "owner/img") == ("docker.io", "owner/img", "default")


def test_host_wins_over_path_prefix_and_ns(router: Router) -> None:
    # On a route's own host, "quay.io/x" is just a repository name of that route.
    assert resolve(router, "ghcr.example.com", "quay.io/owner/img", "docker.io") == (
        "ghcr.io", "quay.io/owner/img", "host")


# ------------------------------------------------------------ path and ns


@pytest.mark.parametrize(("name", "route", "repository"), [
    ("ghcr.io/owner/img", "ghcr.io", "owner/img"),
    ("GHCR.IO/owner/img", "ghcr.io", "owner/img"),
    ("quay.io/a/b/c", "quay.io", "a/b/c"),
    ("docker.io/nginx", "docker.io", "library/nginx"),
    ("docker.io/bitnami/redis", "docker.io", "bitnami/redis"),
    ("index.docker.io/library/alpine", "docker.io", "library/alpine"),
    ("registry-1.docker.io/alpine", "docker.io", "library/alpine"),
    ("localhost:5000/team/app", "localhost:5000", "team/app"),
])
def test_path_prefix_names_the_registry(router: Router, name: str, route: str,
                                        repository: str) -> None:
    assert resolve(router, "127.0.0.1:5000", name) == (route, repository, "path")


def test_path_prefix_wins_over_ns(router: Router) -> None:
    assert resolve(router, None, "ghcr.io/owner/img", "quay.io") == (
        "ghcr.io", "owner/img", "path")


@pytest.mark.parametrize(("ns", "route", "repository"), [
    ("ghcr.io", "ghcr.io", "owner/img"),
    ("Quay.IO", "quay.io", "owner/img"),
    ("docker.io", "docker.io", "owner/img"),
    ("registry-1.docker.io", "docker.io", "owner/img"),
])
def test_ns_parameter_picks_the_route(router: Router, ns: str, route: str,
                                      repository: str) -> None:
    assert resolve(router, "127.0.0.1", "owner/img", ns) == (route, repository, "ns")


def test_ns_for_docker_hub_applies_the_library_rule(router: Router) -> None:
    assert resolve(router, None, "nginx", "docker.io") == ("docker.io", "library/nginx", "ns")


def test_default_route_and_library_rule(router: Router) -> None:
    assert resolve(router, None, "nginx") == ("docker.io", "library/nginx", "default")
    assert resolve(router, None, "library/nginx") == ("docker.io", "library/nginx", "default")
    assert resolve(router, None, "bitnami/redis") == ("docker.io", "bitnami/redis", "default")


def test_library_rule_applies_only_to_docker_hub(router: Router) -> None:
    assert resolve(router, "ghcr.example.com", "img") == ("ghcr.io", "img", "host")
    assert resolve(router, None, "quay.io/img") == ("quay.io", "img", "path")


# ------------------------------------------------------------- refusals


@pytest.mark.parametrize(("name", "ns"), [
    ("evil.example/owner/img", None),
    ("gcr.io/owner/img", None),  # a preset, but not configured here
    ("localhost/img", None),
    ("owner/img", "evil.example"),
    ("owner/img", "gcr.io"),
])
def test_unconfigured_registry_is_name_unknown_404(router: Router, name: str,
                                                   ns: str | None) -> None:
    with pytest.raises(RegistryError) as caught:
        router.resolve(None, name, ns)
    assert (caught.value.code, caught.value.status) == ("NAME_UNKNOWN", 404)
    assert "not configured" in caught.value.message


def test_without_a_default_route_unrouted_requests_are_refused() -> None:
    config = load_config("default_route: null\nroutes: {docker.io: {}, ghcr.io: {}}\n",
                         env={})
    router = Router(config)
    with pytest.raises(RegistryError) as caught:
        router.resolve("127.0.0.1:5000", "library/nginx", None)
    assert (caught.value.code, caught.value.status) == ("NAME_UNKNOWN", 404)
    # The other ways still work.
    assert router.resolve(None, "ghcr.io/o/i", None).route.name == "ghcr.io"
    assert router.resolve(None, "o/i", "docker.io").route.name == "docker.io"


@pytest.mark.parametrize("name", ["Owner/Img", "ghcr.io/Owner/img", "ghcr.io/", "a//b",
                                  "x" * 300])
def test_bad_repository_names_are_name_invalid(router: Router, name: str) -> None:
    with pytest.raises(RegistryError) as caught:
        router.resolve(None, name, None)
    assert (caught.value.code, caught.value.status) == ("NAME_INVALID", 400)


def test_long_unknown_registry_is_not_echoed_whole(router: Router) -> None:
    with pytest.raises(RegistryError) as caught:
        router.resolve(None, "a." + "b" * 5000 + "/img", None)
    assert caught.value.status == 404
    assert len(caught.value.message) < 400


@given(st.one_of(st.none(), st.text(max_size=40)), st.text(max_size=60),
       st.one_of(st.none(), st.text(max_size=20)))
def test_random_requests_resolve_or_raise_registry_errors(
        host: str | None, name: str, ns: str | None) -> None:
    router = Router(load_config(ROUTES, "routes.yaml", env={}))
    try:
        resolved = router.resolve(host, name, ns)
    except RegistryError as exc:
        assert exc.status in (400, 404)
        return
    assert resolved.via in ("host", "path", "ns", "default")
    assert resolved.route.name in {"docker.io", "ghcr.io", "quay.io", "localhost:5000"}



def test_resolved_calls_are_kept_per_config_bounded_and_never_when_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp.test_utils import make_mocked_request

    from gateway.pipeline import resolve as resolve_module
    from gateway.state import RequestState

    monkeypatch.setattr(resolve_module, "RESOLVED_KEPT", 8)
    step = resolve_module.resolve_step()
    first = load_config("default_route: docker.io\nroutes: {docker.io: {upstream: 'http://a'}}")
    second = load_config("default_route: docker.io\nroutes: {docker.io: {upstream: 'http://b'}}")

    def resolved(path: str, config: Config) -> RegistryRequest | None:
        state = RequestState("id", config)
        step(make_mocked_request("GET", path, headers={"Host": "gw.test"}), state)
        return state.registry

    a = resolved("/v2/library/app/manifests/v1", first)
    assert a is not None and resolved("/v2/library/app/manifests/v1", first) is a  # kept
    b = resolved("/v2/library/app/manifests/v1", second)  # after a reload: its own routes
    assert b is not None and b is not a and str(b.route.upstream.url) == "http://b"
    resolver = resolve_module._Resolver(first)
    for _ in range(2):  # refused every time, and nothing kept for it
        with pytest.raises(RegistryError):
            resolver.parse("gw.test", "Bad_Name/manifests/v1", None, None)
    assert resolver.calls == {}
    for n in range(20):  # many names: the memo stays within its bound
        assert resolver.parse("gw.test", f"library/app{n}/manifests/v1", None, None)
        assert len(resolver.calls) <= 8


def test_a_long_call_is_resolved_but_not_kept() -> None:
    from gateway.pipeline import resolve as resolve_module

    config = load_config("routes: {docker.io: {upstream: 'http://a'}}")
    resolver = resolve_module._Resolver(config)
    long_ns = "x" * resolve_module.KEPT_CHARS
    found = resolver.parse("gw.test", "docker.io/library/app/manifests/v1", long_ns, None)
    assert found.repository == "library/app" and resolver.calls == {}
    assert resolver.parse("gw.test", "docker.io/library/app/manifests/v1", None, None)
    assert len(resolver.calls) == 1
