"""TLS termination for many host names: certificates found on disk (`certs`), chosen by SNI
(`table`), reloaded without a restart (`reloader`). Only re-exports what the server uses.
"""

from .certs import Certificate, TlsError
from .reloader import RELOAD_INTERVAL, TlsCertificates
from .table import CertTable, server_context

__all__ = ["RELOAD_INTERVAL", "CertTable", "Certificate", "TlsCertificates", "TlsError",
           "server_context"]
