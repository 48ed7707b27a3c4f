"""The cache: manifests and blobs by digest (immutable), tags → digest (TTL, stale-if-error).

This module only re-exports; each concern has its own module (see ARCHITECTURE.md).
"""

from .blobs import Blobs
from .contents import Contents, Entry, Root, Usage
from .contents_sqlite import SqliteContents
from .core import Cache
from .diskfull import DiskFull, MakeRoom, NoSpace
from .flight import BlobFlight, FetchAborted, IntegrityError, read_span
from .found import CachedBlob, MemoryBlob, OpenBlob
from .fs import FsStore
from .index import Index, MemoryIndex
from .manifests import Manifest, ManifestResult, Manifests
from .relay import Relay
from .spool import ProcessDir
from .store import BlobStore, LocalFiles, Redirecting, SizedReads, StoredBody, Upload

__all__ = [
    "BlobFlight",
    "BlobStore",
    "Blobs",
    "Cache",
    "CachedBlob",
    "Contents",
    "DiskFull",
    "Entry",
    "FetchAborted",
    "FsStore",
    "Index",
    "IntegrityError",
    "LocalFiles",
    "MakeRoom",
    "Manifest",
    "ManifestResult",
    "Manifests",
    "MemoryBlob",
    "MemoryIndex",
    "NoSpace",
    "OpenBlob",
    "ProcessDir",
    "Redirecting",
    "Relay",
    "Root",
    "SizedReads",
    "SqliteContents",
    "StoredBody",
    "Upload",
    "Usage",
    "read_span",
]
