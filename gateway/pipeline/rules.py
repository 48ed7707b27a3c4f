"""The access rules of one `Config`, compiled, and the verdict on one request: pure (no
I/O, no aiohttp, no passwords), so every rule is tested without sockets.

The order: `access.deny` beats everything; operator endpoints answer `access.admin`
networks only; a registry call needs an address in `access.allow`, then a login unless
the address may pull anonymously from the route, then a repository the route allows.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..config import Config, Route
from ..config.access import EVERYONE
from ..net import Address, Network, NetworkSet
from ..routing import Router

_MEMO = 4096  # addresses (and pulls) whose verdict a Policy remembers; then it starts over
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # load balancers' checks: open to all


# Under /_gateway/ but for client machines: the forward proxy's CA certificate (public).
PUBLIC_GATEWAY_PATHS = frozenset({"/_gateway/ca.crt"})


def is_admin_path(path: str) -> bool:
    """/metrics and /_gateway/*: what only operators read."""
    return path == "/metrics" or (path.startswith("/_gateway/")
                                  and path not in PUBLIC_GATEWAY_PATHS)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the rules say about one request. `status` 0: allowed; 401: refused, and a
    login would help (the answer carries a challenge); 403: refused."""

    rule: str  # the rule that decided, for the access log: "access.deny 10.1.0.0/16"
    status: int = 0
    reason: str = ""  # the refusals metric's reason (denied_address, login_required, ...)
    message: str = ""  # the OCI error's message: never a secret

    @property
    def allowed(self) -> bool:
        return self.status == 0


def _matcher(globs: Iterable[str]) -> re.Pattern[str] | None:
    """One regular expression for a list of fnmatch globs (None for none): 100 globs
    cost one match, not 100."""
    parts = [f"(?:{fnmatch.translate(glob)})" for glob in globs]
    return re.compile("|".join(parts)) if parts else None


class _RouteRules:
    """One route's anonymous networks and repository globs, compiled."""

    def __init__(self, route: Route, anonymous: NetworkSet, anonymous_rule: str) -> None:
        self.name = route.name
        self.anonymous = anonymous
        self.anonymous_rule = anonymous_rule
        self._library = route.library_prefix
        self._globs = route.repositories
        self._allow = _matcher(route.repositories.allow)
        self._deny = _matcher(route.repositories.deny)

    def names(self, repository: str) -> tuple[str, ...]:
        """The names a glob may match: as the upstream knows it and, with Docker Hub's
        library/ rule, as `docker pull nginx` names it. Both spellings of an official
        image give the same pair, so `library/nginx` cannot slip past a rule on `nginx`."""
        if self._library and repository.startswith("library/") and \
                "/" not in repository[len("library/"):]:
            return repository, repository[len("library/"):]
        return (repository,)

    def repository_refusal(self, repository: str) -> str | None:
        """The rule that refuses `repository`, or None when the route serves it."""
        if self._deny is None and self._allow is None:
            return None
        names = self.names(repository)
        key = f"routes.{self.name}.repositories"
        if self._deny is not None and any(self._deny.match(name) for name in names):
            glob = next(g for g in self._globs.deny
                        if any(fnmatch.fnmatchcase(name, g) for name in names))
            return f"{key}.deny {glob}"
        if self._allow is not None and not any(self._allow.match(name) for name in names):
            return f"{key}.allow"
        return None


class Policy:
    """The access rules of one Config. Build one per Config (the access stage memoises
    it against the Config's identity); every method is a few set lookups."""

    def __init__(self, config: Config) -> None:
        access = config.access
        self.logins = access.users is not None
        self._deny = NetworkSet(access.deny)
        self._allow = None if access.allow == EVERYONE else NetworkSet(access.allow)
        self._admin = NetworkSet(access.admin)
        everyone = NetworkSet(access.anonymous)
        self._routes = {
            route.name: _RouteRules(route, everyone, "access.anonymous")
            if route.anonymous is None else
            _RouteRules(route, NetworkSet(route.anonymous), f"routes.{route.name}.anonymous")
            for route in config.routes}
        self._base_anonymous = everyone
        self._router = Router(config)  # which route a Host picks, for /v2/
        self.free = self._free(config)
        # Verdicts are pure functions of their inputs: remembered, so a client's next
        # request costs two dict lookups, not network searches and glob matches. Bounded
        # (a stranger at many addresses only makes them start over).
        self._screened: dict[Address | str | None, tuple[Verdict | None, Verdict | None]] = {}
        self._pulled: dict[tuple[str, Address | str | None, str, str | None], Verdict] = {}
        self._calls: dict[tuple[str, str, str], Verdict] = {}

    def _free(self, config: Config) -> dict[str, Verdict] | None:
        """Per route, the verdict on every registry call when no rule can refuse one (no
        deny, allow or users; anonymous from everywhere; no repository rules): the
        common open mirror, answered without looking at the address. None when some
        rule of the config needs the address or a login."""
        access = config.access
        if access.deny or access.allow != EVERYONE or self.logins:
            return None
        free: dict[str, Verdict] = {}
        for route in config.routes:
            anonymous = access.anonymous if route.anonymous is None else route.anonymous
            if set(EVERYONE) <= set(anonymous) and not route.repositories.allow and \
                    not route.repositories.deny:
                free[route.name] = Verdict(self._routes[route.name].anonymous_rule)
        return free

    def screen(self, address: Address | str | None, path: str) -> Verdict | None:
        """The rules on the address alone, before any login is checked (so a refused
        address costs no bcrypt): a refusal, the verdict on an operator endpoint, or
        None when the request goes on to `pull` or `base`."""
        if path in OPEN_PATHS:
            return Verdict("open")
        screened = self._screened.get(address)
        if screened is None:
            if len(self._screened) >= _MEMO:
                self._screened.clear()
            screened = self._screened[address] = self._by_address(address)
        denied, refused = screened
        if denied is not None:
            return denied
        if is_admin_path(path):
            if address in self._admin:
                return Verdict("access.admin")
            return Verdict("access.admin", 403, "admin_only",
                           f"{path} is for operators: {address} is not in access.admin")
        return refused

    def _by_address(self, address: Address | str | None) -> tuple[Verdict | None,
                                                                   Verdict | None]:
        """(the deny verdict, the allow list's refusal) of an address, or None each."""
        if address in self._deny:
            network = _first_match(self._deny.networks, address)
            return Verdict(f"access.deny {network}", 403, "denied_address",
                           f"requests from {address} are refused by this gateway"), None
        if self._allow is not None and address not in self._allow:
            return None, Verdict("access.allow", 403, "denied_address",
                                 f"{address} may not use this registry gateway")
        return None, None

    def pull(self, address: Address | str | None, route: Route, repository: str,
             user: str | None) -> Verdict:
        """A registry call on `route` for `repository` by `user` (None: anonymous), from
        an address `screen` let through."""
        key = (route.name, address, repository, user)
        verdict = self._pulled.get(key)
        if verdict is None:
            if len(self._pulled) >= _MEMO:
                self._pulled.clear()
            verdict = self._pulled[key] = self._pull(address, route, repository, user)
        return verdict

    def anonymous_call(self, remote: str, parse: Callable[[str], Address | None],
                       route: Route, repository: str) -> Verdict:
        """What `screen` and then `pull` without a login say of a registry call from the
        address text `remote` (a registry path is never an open or an operator one, so
        the path does not change it): remembered per (remote, route, repository), so a
        client's next call is one lookup keyed by a str (an IPv4Address hashes in Python
        code)."""
        key = (remote, route.name, repository)
        verdict = self._calls.get(key)
        if verdict is None:  # computed here, not through screen/pull: one memo, not three
            address = parse(remote)
            denied, refused = self._by_address(address)
            verdict = denied or refused or self._pull(address, route, repository, None)
            if len(self._calls) >= _MEMO:
                self._calls.clear()
            self._calls[key] = verdict
        return verdict

    def _pull(self, address: Address | str | None, route: Route, repository: str,
              user: str | None) -> Verdict:
        rules = self._routes[route.name]
        if user is not None:
            verdict = Verdict("access.users")
        elif address in rules.anonymous:
            verdict = Verdict(rules.anonymous_rule)
        elif self.logins:
            return Verdict(rules.anonymous_rule, 401, "login_required",
                           f"log in to pull from {route.name} here")
        else:
            return Verdict(rules.anonymous_rule, 403, "denied_address",
                           f"{address} may not pull from {route.name} here")
        refused = rules.repository_refusal(repository)
        if refused is not None:
            return Verdict(refused, 403, "denied_repository",
                           f"{repository} is not served by this gateway")
        return verdict

    def base(self, address: Address | str | None, host: str | None, user: str | None) -> Verdict:
        """`/v2/`, the version check clients start with. Docker and containers/image
        send credentials only after /v2/ asked for them, and docker fails a pull when
        asked but it has none (moby: "no basic auth credentials"). So /v2/ challenges
        only a client that sent no login and may not pull anonymously from the route
        its Host picks (or, when the Host picks none, per `access.anonymous`). The
        challenge is no refusal: it is not counted."""
        if user is not None:
            return Verdict("access.users")
        route = self._router.by_host(host)
        rules = self._routes[route.name] if route is not None else None
        anonymous = rules.anonymous if rules is not None else self._base_anonymous
        rule = rules.anonymous_rule if rules is not None else "access.anonymous"
        if address in anonymous or not self.logins:
            return Verdict(rule)
        return Verdict(rule, 401, "", "log in to this registry gateway")


def _first_match(networks: Iterable[Network], address: Address | str | None) -> str:
    """The network of a set that holds `address`, for the log (refusals only: linear)."""
    for network in networks:
        if address in NetworkSet((network,)):
            return str(network)
    return "?"
