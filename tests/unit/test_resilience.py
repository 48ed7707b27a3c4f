"""The pure parts of a failing upstream's handling: the circuit breaker's state machine,
backoff with full jitter, which failures are retried, and the route keys (fallbacks:,
timeouts:, retries:, breaker:, stale_while_revalidate:). Injected clock and randomness."""

from __future__ import annotations

import pytest
from yarl import URL

from gateway.config import load_config
from gateway.config.resilience import BreakerSettings, Retries, Timeouts
from gateway.errors import ConfigError, UpstreamError
from gateway.upstream.breaker import Breaker, State
from gateway.upstream.retry import Backoff, Verdict, error_verdict, status_verdict
from tests.support.clock import Clock


def breaker(failures: int = 3, cooldown: float = 30.0) -> tuple[Breaker, Clock, list[State]]:
    clock = Clock(frozen=1000.0)
    changes: list[State] = []
    return Breaker(failures, cooldown, clock, on_change=changes.append), clock, changes


def test_breaker_opens_after_consecutive_failures_only() -> None:
    b, _clock, changes = breaker(failures=3)
    b.failure()
    b.failure()
    b.success()  # not consecutive: counting starts again
    b.failure()
    b.failure()
    assert b.state is State.CLOSED and b.allow()
    b.failure()
    assert b.state is State.OPEN and changes == [State.OPEN]
    assert not b.allow()


def test_breaker_half_opens_after_the_cooldown_with_one_probe() -> None:
    b, clock, changes = breaker(failures=1, cooldown=30)
    b.failure()
    clock.advance(29.9)
    assert not b.allow() and b.retry_in() == pytest.approx(0.1)
    clock.advance(0.2)
    assert b.allow(), "the probe"
    assert b.state is State.HALF_OPEN
    assert not b.allow(), "a second caller while the probe is out"
    b.success()
    assert b.state is State.CLOSED and b.allow() and b.allow()
    assert changes == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_a_failed_probe_opens_the_breaker_for_another_cooldown() -> None:
    b, clock, changes = breaker(failures=2, cooldown=10)
    b.failure()
    b.failure()
    clock.advance(10)
    assert b.allow()
    b.failure()  # one failure is enough while half-open
    assert b.state is State.OPEN and not b.allow()
    clock.advance(9)
    assert not b.allow()
    clock.advance(1)
    assert b.allow()
    assert changes == [State.OPEN, State.HALF_OPEN, State.OPEN, State.HALF_OPEN]


def test_an_abandoned_probe_lets_the_next_caller_probe() -> None:
    b, clock, _changes = breaker(failures=1, cooldown=1)
    b.failure()
    clock.advance(1)
    assert b.allow()
    b.abandon()  # e.g. the client went away
    assert b.state is State.HALF_OPEN and b.allow()


def test_breaker_off_never_opens() -> None:
    b, _clock, changes = breaker(failures=0)
    for _ in range(100):
        b.failure()
    assert b.allow() and changes == []


def test_backoff_is_full_jitter_capped() -> None:
    top = Backoff(0.25, 2.0, random=lambda: 0.999999)
    assert [round(top.delay(n), 3) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert Backoff(0.25, 2.0, random=lambda: 0.0).delay(5) == 0.0
    half = Backoff(1.0, 100.0, random=lambda: 0.5)
    assert half.delay(3) == 4.0


@pytest.mark.parametrize(("status", "headers", "verdict"), [
    (500, {}, Verdict.DOWN), (503, {}, Verdict.DOWN), (504, {}, Verdict.DOWN),
    (429, {}, Verdict.BUSY), (429, {"Retry-After": "3"}, Verdict.BUSY),
    (429, {"ratelimit-remaining": "0;w=21600"}, Verdict.FINAL),
    (429, {"docker-ratelimit-source": "1.2.3.4"}, Verdict.FINAL),
    (404, {}, Verdict.FINAL), (401, {}, Verdict.FINAL), (403, {}, Verdict.FINAL),
    (400, {}, Verdict.FINAL), (416, {}, Verdict.FINAL),
])
def test_which_answers_are_retried(status: int, headers: dict[str, str],
                                   verdict: Verdict) -> None:
    assert status_verdict(status, headers) is verdict


def test_which_errors_are_retried() -> None:
    transport = UpstreamError("UNAVAILABLE", "unreachable", 502, retryable=True)
    refused = UpstreamError("UNAUTHORIZED", "no", 502, retryable=False, upstream_status=401)
    token_5xx = UpstreamError("UNAVAILABLE", "token", 502, retryable=True, upstream_status=503)
    loop = UpstreamError("UNAVAILABLE", "redirects", 502, retryable=True, upstream_status=302)
    assert [error_verdict(e) for e in (transport, refused, token_5xx, loop)] == [
        Verdict.DOWN, Verdict.FINAL, Verdict.DOWN, Verdict.FINAL]


def routes(text: str) -> str:
    return "routes:\n" + text


def test_route_keys_default_and_layer_over_defaults() -> None:
    config = load_config(
        "defaults:\n  timeouts: {connect: 2s, stall: 30s}\n  breaker: {cooldown: 1m}\n"
        "  retries: off\n  stale_while_revalidate: 1h\n"
        "routes:\n"
        "  a.example.com:\n    upstream: https://a.example.com\n"
        "    fallbacks: [https://mirror.example.com, http://127.0.0.1:5001]\n"
        "    timeouts: {headers: 3s}\n    retries: {attempts: 5, backoff: 100ms}\n"
        "  b.example.com:\n    upstream: https://b.example.com\n    breaker: off\n"
        "    stale_while_revalidate: off\n", env={})
    a, b = config.route("a.example.com"), config.route("b.example.com")
    assert a.upstream.fallbacks == (URL("https://mirror.example.com"),
                                    URL("http://127.0.0.1:5001"))
    assert b.upstream.fallbacks == ()
    assert a.upstream.timeouts == Timeouts(connect=2.0, headers=3.0, stall=30.0)
    assert b.upstream.timeouts == Timeouts(connect=2.0, headers=10.0, stall=30.0)
    assert a.upstream.retries == Retries(attempts=5, backoff=0.1, max_backoff=2.0)
    assert b.upstream.retries == Retries(attempts=1)
    assert a.upstream.breaker == BreakerSettings(failures=3, cooldown=60.0)
    assert b.upstream.breaker == BreakerSettings(failures=0, cooldown=60.0)
    assert a.cache.stale_while_revalidate == 3600.0
    assert b.cache.stale_while_revalidate == 0.0


def test_defaults_when_nothing_is_written() -> None:
    route = load_config("routes:\n  a.example.com: {upstream: https://a.example.com}\n",
                        env={}).route("a.example.com")
    assert route.upstream.timeouts == Timeouts(connect=5.0, headers=10.0, stall=20.0)
    assert route.upstream.retries == Retries(attempts=3, backoff=0.25, max_backoff=2.0)
    assert route.upstream.breaker == BreakerSettings(failures=3, cooldown=30.0)
    assert route.cache.stale_while_revalidate == 0.0


@pytest.mark.parametrize(("spec", "message"), [
    ("timeouts: {connect: 0}", "above zero"),
    ("timeouts: {stall: forever}", "above zero"),
    ("timeouts: {bogus: 1s}", "unknown key 'bogus'"),
    ("timeouts: 5s", "want a mapping of connect, headers, stall"),
    ("retries: {attempts: 0}", "1 or more"),
    ("breaker: {failures: -1}", "whole number"),
    ("fallbacks: [https://user:pw@mirror.example.com]", "credentials do not go"),
    ("fallbacks: [ftp://mirror.example.com]", "not a registry URL"),
])
def test_bad_values_name_the_key(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(routes(f"  a.example.com:\n    upstream: https://a.example.com\n"
                           f"    {spec}\n"), "routes.yaml", env={})
    assert message in str(caught.value)
    assert "routes.yaml:4" in str(caught.value)
    assert "pw" not in str(caught.value).replace("password", "")
