"""Real upstream registries for tests: Debian's `docker-registry` (CNCF distribution 2.8)
with filesystem storage in a temporary directory, open, behind htpasswd Basic auth, or
behind Bearer token auth served by `TokenServer` (the Docker Hub token dance).

Every registry listens on 127.0.0.1 only and is stopped by the fixture that started it.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .client import RegistryClient
from .net import free_port, http_answers, stop_process
from .threaded import ThreadedServer
from .tools import require_tool
from .wait import wait_for

REGISTRY_BINARY = "/usr/bin/docker-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- token server ------------------------------------------------------------------------


@dataclass
class TokenRequest:
    """What the token endpoint was asked, for assertions."""

    account: str | None
    service: str | None
    scopes: list[str]
    granted: bool


class TokenServer:
    """Issues registry JWTs the way Docker Hub's auth.docker.io does.

    `GET /token?service=..&scope=repository:NAME:pull` (and the OAuth2 `POST /token`
    form) check Basic credentials; good credentials get the requested actions,
    anonymous callers get a token with no access (so the registry answers 401 again),
    and bad credentials get 401. Tokens are ES256 JWTs whose `x5c` header carries a
    self-signed certificate that the registry trusts through its `rootcertbundle`.
    """

    def __init__(self, *, username: str, password: str, service: str = "test-registry",
                 issuer: str = "test-token-issuer", anonymous_pull: bool = False) -> None:
        self.username = username
        self.password = password
        self.service = service
        self.issuer = issuer
        self.anonymous_pull = anonymous_pull
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry-gateway test tokens")])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.server = ThreadedServer(self._build_app)

    @property
    def realm(self) -> str:
        return f"{self.server.url}/token"

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def recorded(self) -> list[TokenRequest]:
        with self._lock:
            return list(self.requests)

    def issue(self, *, subject: str, access: list[dict[str, Any]], lifetime: int = 300) -> str:
        """A signed JWT for `access` (a list of {type, name, actions})."""
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER))
                    .decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)  # JWS wants r || s, 32 bytes each
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return signing_input + "." + _b64url(signature)

    # -- HTTP side --------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._get_token)
        app.router.add_post("/token", self._post_token)
        return app

    def _check(self, username: str | None, password: str | None) -> bool | None:
        """True: good credentials; None: anonymous; False: bad credentials."""
        if username is None:
            return None
        return username == self.username and password == self.password

    def _grant(self, scopes: list[str], authenticated: bool) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            wanted = [a for a in actions.split(",") if a]
            allowed = wanted if authenticated else (["pull"] if self.anonymous_pull else [])
            granted = [a for a in wanted if a in allowed]
            if granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        return access

    def _answer(self, *, username: str | None, password: str | None,
                scopes: list[str], service: str | None) -> web.Response:
        verdict = self._check(username, password)
        with self._lock:
            self.requests.append(TokenRequest(username, service, scopes, verdict is True))
        if verdict is False:
            return web.json_response({"details": "incorrect username or password"}, status=401)
        token = self.issue(subject=username or "", access=self._grant(scopes, bool(verdict)))
        issued = datetime.datetime.now(datetime.UTC).isoformat()
        return web.json_response(
            {"token": token, "access_token": token, "expires_in": 300, "issued_at": issued}
        )

    async def _get_token(self, request: web.Request) -> web.Response:
        username = password = None
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            decoded = base64.b64decode(header[6:]).decode()
            username, _, password = decoded.partition(":")
        return self._answer(username=username, password=password,
                            scopes=request.query.getall("scope", []),
                            service=request.query.get("service"))

    async def _post_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "password":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        scopes = " ".join(str(v) for v in form.getall("scope", [])).split()
        return self._answer(username=str(form.get("username")),
                            password=str(form.get("password")),
                            scopes=scopes, service=str(form.get("service")))


# -- registry process --------------------------------------------------------------------


@dataclass
class BasicAuth:
    """htpasswd auth: the registry asks for Basic credentials (bcrypt hashes only)."""

    username: str
    password: str


@dataclass
class TokenAuth:
    """Bearer token auth delegated to a `TokenServer`."""

    tokens: TokenServer

    @property
    def username(self) -> str:
        return self.tokens.username

    @property
    def password(self) -> str:
        return self.tokens.password


@dataclass
class RegistryProcess:
    """One `docker-registry serve` on 127.0.0.1. Stop and start again keep port and data."""

    workdir: Path
    auth: BasicAuth | TokenAuth | None = None
    name: str = "registry"
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    @property
    def username(self) -> str | None:
        return self.auth.username if self.auth else None

    @property
    def password(self) -> str | None:
        return self.auth.password if self.auth else None

    def client(self, *, authenticated: bool = True) -> RegistryClient:
        if authenticated and self.auth is not None:
            return RegistryClient(self.host, self.port, self.auth.username, self.auth.password)
        return RegistryClient(self.host, self.port)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"{self.host}:{self.port}",
                "secret": "registry-gateway-tests",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if isinstance(self.auth, BasicAuth):
            import bcrypt  # only this variant needs it

            hashed = bcrypt.hashpw(self.auth.password.encode(), bcrypt.gensalt(rounds=5))
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(f"{self.auth.username}:{hashed.decode()}\n")
            config["auth"] = {"htpasswd": {"realm": "test-basic-realm", "path": str(htpasswd)}}
        elif isinstance(self.auth, TokenAuth):
            bundle = self.workdir / "token-root.pem"
            bundle.write_bytes(self.auth.tokens.certificate_pem())
            config["auth"] = {
                "token": {
                    "realm": self.auth.tokens.realm,
                    "service": self.auth.tokens.service,
                    "issuer": self.auth.tokens.issuer,
                    "rootcertbundle": str(bundle),
                }
            }
        return config

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError(f"{self.name} already running")
        binary = require_tool(REGISTRY_BINARY)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        config_path = self.workdir / "config.yml"
        config_path.write_text(json.dumps(self._config(), indent=2))  # JSON is YAML
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "serve", str(config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={"PATH": "/usr/bin:/bin", "OTEL_SDK_DISABLED": "true"},
            )
        try:
            wait_for(lambda: http_answers(self.host, self.port), what=f"{self.name} /v2/",
                     process=self.process, diagnostics=self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


@contextmanager
def run_registry(workdir: Path, *, auth: BasicAuth | TokenAuth | None = None,
                 name: str = "registry") -> Iterator[RegistryProcess]:
    """A started registry (open, Basic or token auth) that is stopped on exit."""
    registry = RegistryProcess(workdir, auth=auth, name=name)
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


@contextmanager
def run_token_registry(workdir: Path, *, username: str = "tester",
                       password: str | None = None, name: str = "token-registry",
                       anonymous_pull: bool = False) -> Iterator[RegistryProcess]:
    """A registry behind Bearer token auth plus its in-process token server."""
    tokens = TokenServer(username=username, password=password or secrets.token_urlsafe(12),
                         anonymous_pull=anonymous_pull)
    with ExitStack() as stack:
        tokens.server.start()
        stack.callback(tokens.server.stop)
        yield stack.enter_context(run_registry(workdir, auth=TokenAuth(tokens), name=name))

