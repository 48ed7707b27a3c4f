"""The single-flight coordinator seam: who fetches a key when several processes (or,
later, replicas) share one store, and how the others follow. In one process the
in-process `SingleFlight` is all there is, so `InProcess` answers without any I/O.

Says who leads and what the leader has done so far; moves no blob bytes itself and
never decides what is kept (only a verified, committed object ever is).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .transfer import Opener

# The states of a transfer as its followers see them.
STARTING, STREAMING, VERIFIED, FAILED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Progress:
    """One consistent look at a leader's transfer of a blob."""

    generation: int  # changes when another leader takes the key over
    state: int
    size: int | None
    written: int  # bytes [0, written) are in the spool and hashed, in order
    spool: Path  # where the leader writes; once committed the bytes are in the store
    error: tuple[str, str, int] | None = None  # FAILED: the RegistryError's code, message, status


class Published(Protocol):
    """What a leader publishes of its transfer (BlobFlight has these)."""

    spool: Path
    size: int | None
    written: int
    done: bool
    error: BaseException | None

    @property
    def headers_known(self) -> bool: ...


class Lead(Protocol):
    """This process fetches the key; others may follow what it publishes."""

    shared: bool  # others processes may follow (False: in-process only)

    def publish(self, transfer: Published) -> None:
        """Tell followers how far the transfer is (cheap: called per ~1 MiB)."""

    async def release(self) -> None:
        """The transfer ended (its last state published): let the next one lead."""


@runtime_checkable
class Sourced(Protocol):
    """A Lead whose bytes may come from another replica (cache/replica_source.py):
    `leading` False while another replica fetches; `source()` gives the opener of the
    bytes (the leader's, then `upstream` if this one takes over: `on_takeover()`)."""

    leading: bool

    def source(self, namespace: str, digest: str, upstream: Opener,
               on_takeover: Callable[[], None]) -> Opener: ...


@runtime_checkable
class Follow(Protocol):
    """Another process fetches the key: watch its progress."""

    def progress(self) -> Progress | None:
        """The leader's last published state, or None if none is readable yet."""

    async def leader_gone(self) -> Lead | None:
        """If the leader stopped without a final state (it died), lead now; else None."""

    async def close(self) -> None: ...


class Coordinator(Protocol):
    async def claim(self, key: str) -> Lead | Follow:
        """Lead the fetch of `key`, or follow the process that leads it."""

    def turn(self, key: str) -> AbstractAsyncContextManager[bool]:
        """Hold `key` exclusively (small objects: manifests, tags); True if another
        process held it first, so the caller looks in the store before fetching."""

    async def open(self, *, sweep: bool) -> None:
        """`sweep`: remove what dead processes left (once per data directory)."""

    async def close(self) -> None: ...


class _SoleLead:
    shared = False

    def publish(self, transfer: Published) -> None:
        pass

    async def release(self) -> None:
        pass


class InProcess:
    """One process on its data directory: the in-process single flight decides alone."""

    def __init__(self) -> None:
        self._lead = _SoleLead()

    async def claim(self, key: str) -> Lead | Follow:
        return self._lead

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[bool]:
        yield False

    async def open(self, *, sweep: bool) -> None:
        pass

    async def close(self) -> None:
        pass
