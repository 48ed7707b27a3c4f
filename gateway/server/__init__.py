"""The composition root: app.py builds the app, run.py runs it (see each)."""

from __future__ import annotations

from .app import CURRENT, LIVE, MAX_LINE, METRICS, RELOADER, Worker, create_app
from .run import Address, ServeOptions, run
from .runner import GatewayRunner

__all__ = ["CURRENT", "LIVE", "MAX_LINE", "METRICS", "RELOADER", "Address", "GatewayRunner",
           "ServeOptions", "Worker", "create_app", "run"]
