"""The certificates of the TLS listeners, kept current: loaded in worker threads, swapped in
whole when the directory changes (every few seconds, or at once on SIGHUP).

Never blocks the event loop: every scan and every ssl context that reads a file is made in
a worker thread; the SNI callback only looks the new table up. Owns one watcher task.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from ..tasks import Background
from .certs import Certificate, Fingerprint, TlsError, fingerprint
from .table import CertTable, certificate_context, load_table

log = logging.getLogger("gateway.tls")

RELOAD_INTERVAL = 5.0
EXPIRY_WARNING = datetime.timedelta(days=14)


class TlsCertificates:
    """The certificates of every TLS listener, reloaded when the files change.

    After `start()`, `context` is what the listeners use; its SNI callback picks the
    certificate from the current table, so a replaced certificate is served to the next new
    connection after the next check (every `reload_interval` seconds, or at once on
    `reload_soon()`). `start()` and `close()` pair up, e.g. in an aiohttp `cleanup_ctx`.
    """

    def __init__(self, directory: Path, *, reload_interval: float = RELOAD_INTERVAL) -> None:
        self.directory = Path(directory)
        self.reload_interval = reload_interval
        self._table: CertTable | None = None
        self._fingerprint: Fingerprint = ()
        self._wake = asyncio.Event()
        self._task = Background("tls-reload")
        self._problems: list[str] = []
        self._context: ssl.SSLContext | None = None
        self._listeners: list[Callable[[CertTable], None]] = []

    @property
    def table(self) -> CertTable:
        if self._table is None:
            raise RuntimeError("certificates are not loaded yet")
        return self._table

    @property
    def context(self) -> ssl.SSLContext:
        """The listeners' context (after `start()`)."""
        if self._context is None:
            raise RuntimeError("certificates are not loaded yet: await start() first")
        return self._context

    def _on_server_name(self, connection: ssl.SSLObject, server_name: str | None,
                        context: ssl.SSLContext) -> None:
        # Runs on the event loop inside the handshake: a dictionary lookup, nothing more.
        if self._table is not None:
            connection.context = self._table.select(server_name)

    def _listener_context(self, default: Certificate) -> ssl.SSLContext:
        # The listener's own certificate only matters if a handshake skips the callback.
        context = certificate_context(default)
        context.sni_callback = self._on_server_name
        return context

    async def start(self) -> None:
        """Load the certificates (raising `TlsError` if there are none) and watch them."""
        await self.reload(force=True)
        self._context = await asyncio.to_thread(self._listener_context,
                                                self.table.default_certificate)
        self._task.start(self._watch())

    def on_change(self, listener: Callable[[CertTable], None]) -> None:
        """Call `listener` with each new table (on the loop; it must not block), and at once
        with the current one if loaded: e.g. the expiry metric."""
        self._listeners.append(listener)
        if self._table is not None:
            listener(self._table)

    def reload_soon(self) -> None:
        """Check the directory now (SIGHUP) instead of at the next interval."""
        self._wake.set()

    async def reload(self, *, force: bool = False) -> bool:
        """Load the directory again if it changed; True when a new table is in place."""
        mark = await asyncio.to_thread(fingerprint, self.directory)
        if not force and mark == self._fingerprint:
            return False
        try:
            table, problems = await asyncio.to_thread(load_table, self.directory, self._table)
        except TlsError as exc:
            if self._table is None:
                raise TlsError(f"{self.directory}: {exc}") from None
            log.warning("certificates in %s: %s; still serving the previous ones",
                        self.directory, exc)
            return False
        self._fingerprint = mark
        if problems != self._problems:
            for problem in problems:
                log.warning("certificate problem: %s", problem)
            self._problems = problems
        changed = table is not self._table
        self._table = table
        if changed:
            self._log_table(table)
            for listener in self._listeners:
                listener(table)
        return changed

    def _log_table(self, table: CertTable) -> None:
        now = datetime.datetime.now(datetime.UTC)
        for certificate in table.certificates:
            log.info("tls certificate: %s", certificate.describe())
            if certificate.not_after < now:
                log.warning("certificate %s has EXPIRED", certificate.chain_path)
            elif certificate.not_after - now < EXPIRY_WARNING:
                log.warning("certificate %s expires on %s: renew it", certificate.chain_path,
                            certificate.not_after.date())

    async def _watch(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.reload_interval)
            except TimeoutError:
                forced = False
            else:
                forced = True
            self._wake.clear()
            try:
                await self.reload(force=forced)
            except Exception:  # a bad pass must not stop the watcher
                log.exception("reloading certificates from %s failed", self.directory)

    async def close(self) -> None:
        """Stop watching (idempotent); the loaded table stays usable."""
        await self._task.stop()
