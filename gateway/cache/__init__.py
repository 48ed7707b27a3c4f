"""The cache: manifests and blobs by digest (immutable), tags → digest (TTL, stale-if-error).

This module only re-exports; each concern has its own module (see ARCHITECTURE.md).
"""

from .blobs import Blobs, CachedBlob, OpenBlob
from .core import Cache
from .flight import BlobFlight, FetchAborted, IntegrityError, read_span
from .fs import FsStore
from .index import Index, MemoryIndex
from .manifests import Manifest, ManifestResult, Manifests
from .spool import ProcessDir
from .store import BlobStore, LocalFiles, Redirecting, Upload

__all__ = [
    "BlobFlight", "BlobStore", "Blobs", "Cache", "CachedBlob", "FetchAborted", "FsStore",
    "Index", "IntegrityError", "LocalFiles", "Manifest", "ManifestResult", "Manifests",
    "MemoryIndex", "OpenBlob", "ProcessDir", "Redirecting", "Upload", "read_span",
]
