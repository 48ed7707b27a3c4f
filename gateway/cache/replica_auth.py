"""How replicas prove to each other that a request to the internal flight endpoint comes
from one of them: an HMAC-SHA256 over method, path and query and an expiry, with the
secret they share (from `redis:` or kept in Redis).

Pure: no I/O, no clock of its own. Never logs or echoes the secret or a signature.
"""

from __future__ import annotations

import hashlib
import hmac

INTERNAL_PREFIX = "/_gateway/internal/"
FLIGHT_PATH = INTERNAL_PREFIX + "flight/"
HEADER = "X-Gateway-Replica"
VALID = 30  # seconds a signature is good for (replicas' clocks within this of each other)


def _mac(secret: bytes, method: str, path_qs: str, expires: int) -> str:
    message = f"{method.upper()}\n{path_qs}\n{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, path_qs: str, now: float) -> str:
    """The header value for a request to `path_qs` (path and query, as sent)."""
    expires = int(now) + VALID
    return f"{expires}.{_mac(secret, method, path_qs, expires)}"


def verify(secret: bytes | None, header: str | None, method: str, path_qs: str,
           now: float) -> bool:
    """Whether `header` signs this request with `secret` and has not expired."""
    if secret is None or not header:
        return False
    expires_text, _, mac = header.partition(".")
    if not expires_text.isdigit() or not mac:
        return False
    expires = int(expires_text)
    if not now <= expires <= now + 2 * VALID:
        return False
    return hmac.compare_digest(mac, _mac(secret, method, path_qs, expires))
