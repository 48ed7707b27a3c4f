"""Live configuration: the running `Config` (`Live`), its reload on SIGHUP or a change on
disk (`Reloader`), and `registry-gateway check`.

The only place that swaps the config; it never reads the environment itself (config/ does).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..config import Config
from ..config.storage import storage_files
from .check import check_file, describe_config
from .live import Callback, Check, Live, Paths
from .reloader import WATCH_INTERVAL, Reloader, describe

__all__ = ["WATCH_INTERVAL", "Callback", "Check", "Live", "Paths", "Reloader", "check_file",
           "describe", "describe_config", "secret_files"]


def secret_files(config: Config) -> Iterable[Path]:
    """The password files routes read (`password_file:`, of accounts and proxies): a new
    password is a reload."""
    for route in config.routes:
        written = route.upstream.credentials_ref
        refs = list(written if isinstance(written, tuple) else (written,) if written else ())
        proxy = route.upstream.proxy
        if proxy is not None and proxy.credentials_ref is not None:
            refs.append(proxy.credentials_ref)
        for ref in refs:
            for secret in (ref.username, ref.password):
                if secret.source == "file":
                    yield Path(secret.value).expanduser()
    yield from (Path(file).expanduser() for file in storage_files(config.storage))
