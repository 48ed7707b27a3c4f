"""routes.yaml into frozen dataclasses, per section: parse first, resolve secrets second.

The public names; the parts: model.py (the dataclasses), load.py (sections and routes),
values.py (durations, sizes, URLs), secrets.py (the only reader of the environment).
"""

from __future__ import annotations

from ..presets import PRESETS, Preset
from .access import AccessSettings, RepositoryRules
from .limits import Exempt, Limits, RouteLimits, ServerLimits
from .load import (
    SECTIONS,
    Section,
    load_config,
    load_config_file,
    parse_config,
    parse_config_file,
    settings_section,
)
from .model import (
    CacheLimits,
    CachePolicy,
    Config,
    Credentials,
    CredentialsRef,
    Pin,
    ProxySettings,
    Route,
    SecretRef,
    UpstreamSettings,
)
from .schema import yaml_key
from .secrets import resolve_secret, resolve_secrets
from .values import FOREVER, FreeSpace, Network, parse_duration, parse_size

__all__ = [
    "FOREVER",
    "PRESETS",
    "SECTIONS",
    "AccessSettings",
    "CacheLimits",
    "CachePolicy",
    "Config",
    "Credentials",
    "CredentialsRef",
    "Exempt",
    "FreeSpace",
    "Limits",
    "Network",
    "Pin",
    "Preset",
    "ProxySettings",
    "RepositoryRules",
    "Route",
    "RouteLimits",
    "SecretRef",
    "Section",
    "ServerLimits",
    "UpstreamSettings",
    "load_config",
    "load_config_file",
    "parse_config",
    "parse_config_file",
    "parse_duration",
    "parse_size",
    "resolve_secret",
    "resolve_secrets",
    "settings_section",
    "yaml_key",
]
