"""A small blocking registry client (http.client): push and pull over the distribution API.

It does the Basic and Bearer token dance like docker does, sends request targets
verbatim (no URL normalisation, so tests can send `..` or odd encodings), and
never follows redirects. Loopback only.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from .net import ensure_loopback

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Response:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def raw_request(
    host: str,
    port: int,
    method: str,
    target: str,
    *,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    timeout: float = 60.0,
) -> Response:
    """One HTTP/1.1 request with `target` sent exactly as given.

    `headers` may be a list of pairs to repeat a header, as Go clients do with Accept.
    """
    ensure_loopback(host)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {name.lower() for name, _ in pairs}
    if "host" not in names:
        pairs.insert(0, ("Host", f"{host}:{port}"))
    if body is not None and "content-length" not in names:
        pairs.append(("Content-Length", str(len(body))))
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in pairs:
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        data = response.read()
        return Response(response.status, response.msg, data)
    finally:
        connection.close()


def basic_header(username: str, password: str) -> str:
    """The Authorization header value of HTTP Basic auth."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = value.partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


@dataclass
class RegistryClient:
    """Talks to one registry at http://host:port, optionally with a different Host header."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    host_header: str | None = None
    _tokens: dict[str, str] = field(default_factory=dict)
    token_requests: int = 0

    @classmethod
    def for_url(cls, url: str, **kwargs: Any) -> RegistryClient:
        parsed = urllib.parse.urlsplit(url)
        assert parsed.scheme == "http" and parsed.hostname and parsed.port, url
        return cls(parsed.hostname, parsed.port, **kwargs)

    # -- plumbing --------------------------------------------------------------------

    def request(
        self,
        method: str,
        target: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        scope: str | None = None,
    ) -> Response:
        """Send a request; on a 401 challenge authenticate once and retry."""
        headers = dict(headers or {})
        if self.host_header is not None:
            headers["Host"] = self.host_header
        auth = self._auth_header(scope)
        if auth:
            headers["Authorization"] = auth
        response = raw_request(self.host, self.port, method, target, headers=headers, body=body)
        challenge = response.header("WWW-Authenticate")
        if response.status != 401 or not challenge:
            return response
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.username is None or "Authorization" in headers:
                return response
            headers["Authorization"] = self._basic()
        elif scheme == "bearer":
            # Ask for the caller's scope (pull,push) rather than the challenge's (often
            # just pull) so that one token serves a whole push.
            wanted = scope or params.get("scope", "")
            if wanted:
                params = {**params, "scope": wanted}
            self._tokens[wanted] = self._fetch_token(params)
            headers["Authorization"] = f"Bearer {self._tokens[wanted]}"
        else:
            return response
        return raw_request(self.host, self.port, method, target, headers=headers, body=body)

    def _basic(self) -> str:
        return basic_header(str(self.username), str(self.password))

    def _auth_header(self, scope: str | None) -> str | None:
        token = self._tokens.get(scope or "")
        return f"Bearer {token}" if token else None

    def _fetch_token(self, challenge: dict[str, str]) -> str:
        realm = urllib.parse.urlsplit(challenge["realm"])
        assert realm.hostname is not None and realm.port is not None
        query = {k: v for k, v in challenge.items() if k in ("service", "scope")}
        headers = {"Authorization": self._basic()} if self.username is not None else {}
        target = realm.path + "?" + urllib.parse.urlencode(query)
        self.token_requests += 1
        response = raw_request(realm.hostname, realm.port, "GET", target, headers=headers)
        if response.status != 200:
            raise RuntimeError(f"token endpoint said {response.status}: {response.body!r}")
        document = response.json()
        return str(document.get("token") or document["access_token"])

    # -- distribution API ------------------------------------------------------------

    def push_blob(self, repository: str, data: bytes, digest: str) -> None:
        scope = f"repository:{repository}:pull,push"
        head = self.request("HEAD", f"/v2/{repository}/blobs/{digest}", scope=scope)
        if head.status == 200:
            return
        start = self.request("POST", f"/v2/{repository}/blobs/uploads/", scope=scope, body=b"")
        if start.status != 202:
            raise RuntimeError(f"upload start: {start.status} {start.body!r}")
        location = start.header("Location")
        assert location, "upload start without Location"
        parsed = urllib.parse.urlsplit(location)
        separator = "&" if parsed.query else "?"
        target = urllib.parse.urlunsplit(("", "", parsed.path, parsed.query, ""))
        target += f"{separator}digest={urllib.parse.quote(digest)}"
        put = self.request(
            "PUT",
            target,
            scope=scope,
            body=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if put.status != 201:
            raise RuntimeError(f"upload of {digest}: {put.status} {put.body!r}")

    def push_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        response = self.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            scope=f"repository:{repository}:pull,push",
            body=data,
            headers={"Content-Type": media_type},
        )
        if response.status != 201:
            raise RuntimeError(f"manifest push {repository}:{reference}: {response.status} "
                               f"{response.body!r}")
        return response.header("Docker-Content-Digest") or ""

    def get(self, target: str, *, accept: str | None = None, repository: str | None = None,
            method: str = "GET", headers: dict[str, str] | None = None) -> Response:
        headers = dict(headers or {})
        if accept:
            headers["Accept"] = accept
        scope = f"repository:{repository}:pull" if repository else None
        return self.request(method, target, headers=headers, scope=scope)
