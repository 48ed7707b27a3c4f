"""The access stage: applies `access:` (pipeline/rules.py) to every request after resolve,
checks logins (HTTP Basic against the htpasswd file, pipeline/users.py) and refuses with
401 UNAUTHORIZED (plus the Basic challenge) or 403 DENIED; sets the audit fields.

Basic, not a token service: every client in use sends it (docker/podman login, skopeo
--creds, containerd's static hosts.toml header), and it needs no signing key shared
between workers and replicas. It never logs or echoes a password, a hash or a header.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable

from aiohttp import web
from cachetools import LRUCache

from ..config import Config
from ..errors import RegistryError
from ..metrics import Metrics
from ..net import Address, parse_address
from ..state import STATE, RequestState
from .rules import Policy, Verdict
from .users import Logins

CHALLENGE = 'Basic realm="registry-gateway", charset="UTF-8"'
BASE_PATHS = frozenset({"/v2", "/v2/"})


class BadLogin(Exception):
    """An Authorization header that is Basic but not user:password in base64."""


def basic_credentials(header: str | None) -> tuple[str, bytes] | None:
    """(user, password) of `Authorization: Basic ...`; None when the client offers no
    login (no header, another scheme, or an empty user name, which some clients send
    when they have none). Raises BadLogin for a Basic header that does not decode."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
        user_bytes, colon, password = decoded.partition(b":")
        user = user_bytes.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadLogin from None
    if not user:
        return None
    if not colon:
        raise BadLogin
    return user, password


class _Compiled:
    """The Policy of the Config last seen (a reload swaps the Config object)."""

    def __init__(self) -> None:
        self._config: Config | None = None
        self._policy: Policy | None = None

    def policy(self, config: Config) -> Policy:
        if config is not self._config or self._policy is None:
            self._policy, self._config = Policy(config), config
        return self._policy


# Replicas' own endpoint (cache/replica_auth.py): for a request a replica signed only.
INTERNAL_PREFIX = "/_gateway/internal/"


def access_step(metrics: Metrics, *, logins: Logins | None = None,
                internal: Callable[[web.Request], bool] | None = None
                ) -> Callable[[web.Request, RequestState], Awaitable[None] | None]:
    """The stage (run by `admit` with the request's config). It decides at once (None:
    allowed; or it raises the refusal) unless a login must be checked: then it returns
    the check to await. `logins` (built once by the composition root, which calls
    `logins.refresh()` on a reload) holds the htpasswd table and the bcrypt cache across
    Config swaps."""
    logins = logins if logins is not None else Logins()
    compiled = _Compiled()
    # Client addresses parsed once, not by every rule of every request (ipaddress's
    # parser was a tenth of a warm manifest request); bounded, so strangers cannot grow it.
    addresses: LRUCache[str, Address | None] = LRUCache(maxsize=4096)

    def access(request: web.Request, state: RequestState) -> Awaitable[None] | None:
        config = state.config
        policy = compiled.policy(config)
        reg = state.registry
        if reg is not None and policy.free is not None:
            free = policy.free.get(reg.route.name)
            if free is not None:  # no rule could refuse it: address and login unread
                state.rule = free.rule
                return None
        if request.path.startswith(INTERNAL_PREFIX):  # whatever the address: the HMAC
            signed = internal is not None and internal(request)
            _decide(state, Verdict("redis.secret") if signed else Verdict(
                "redis.secret", 403, "not_a_replica",
                f"{request.path[:100]} is for the gateway's replicas only"), metrics)
            return None
        remote = request.remote or ""
        if reg is not None and state.user is None and not policy.logins:
            _decide(state, policy.anonymous_call(remote, parse_address, reg.route,
                                                 reg.repository), metrics)
            return None
        address = addresses.get(remote)
        if address is None and remote not in addresses:  # not seen (or not an address)
            address = addresses[remote] = parse_address(remote)
        verdict = policy.screen(address, request.path)
        if verdict is None:
            if policy.logins:  # a login to check first (bcrypt, in a thread)
                return _check(request, config, policy, address, logins, metrics)
            verdict = _on_route(request, state, policy, address)
        _decide(state, verdict, metrics)
        return None

    return access


def _decide(state: RequestState, verdict: Verdict, metrics: Metrics) -> None:
    """Record the verdict for the log; raise it if it refuses."""
    state.rule = verdict.rule
    if not verdict.allowed:
        if verdict.reason:
            reg = state.registry
            metrics.refusals.labels(reg.route.name if reg is not None else "-",
                                    verdict.reason).inc()
        raise _refusal(verdict)


async def _check(request: web.Request, config: Config, policy: Policy,
                 address: Address | None, logins: Logins, metrics: Metrics) -> None:
    """The rules past the address alone: the login (if any), then the route's rules."""
    state = request[STATE]
    reg = state.registry
    route = reg.route.name if reg is not None else "-"
    # A login to the forward proxy (set by resolve) counts for its tunnel's requests.
    state.user = state.user or await _login(request, config, logins, metrics, route)
    _decide(state, _on_route(request, state, policy, address), metrics)


def _on_route(request: web.Request, state: RequestState, policy: Policy,
              address: Address | None) -> Verdict:
    """The verdict past the address alone, for `state.user` (None: anonymous)."""
    reg = state.registry
    if reg is not None:
        return policy.pull(address, reg.route, reg.repository, state.user)
    if request.path in BASE_PATHS:
        return policy.base(address, request.host, state.user)
    return Verdict("access.allow")  # not an API path: a 404 follows


async def _login(request: web.Request, config: Config, logins: Logins, metrics: Metrics,
                 route: str) -> str | None:
    """The user a valid login names; None without one (or when no `users` file is
    configured: credentials are then not looked at). A wrong one is refused with 401."""
    path = config.access.users
    if path is None:
        return None
    try:
        offered = basic_credentials(request.headers.get("Authorization"))
        if offered is None:
            return None
        user, password = offered
        if await logins.verify(path, user, password):
            return user
    except BadLogin:
        pass
    except RegistryError:  # too many checks waiting: 429
        metrics.refusals.labels(route, "login_busy").inc()
        raise
    request[STATE].rule = "access.users"
    metrics.refusals.labels(route, "bad_login").inc()
    raise RegistryError("UNAUTHORIZED", "wrong user name or password", 401,
                        headers={"WWW-Authenticate": CHALLENGE})


def _refusal(verdict: Verdict) -> RegistryError:
    if verdict.status == 401:
        return RegistryError("UNAUTHORIZED", verdict.message, 401,
                             headers={"WWW-Authenticate": CHALLENGE})
    return RegistryError("DENIED", verdict.message, verdict.status)
