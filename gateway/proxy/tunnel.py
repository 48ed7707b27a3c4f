"""A tunnel: bytes copied both ways between a client's connection and a destination,
untouched (TLS passes through), with flow control and a byte count.

Knows nothing of registries or rules; the listener decides what may be tunnelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# A tunnel with no byte either way this long is closed (a dead peer must not keep its
# connection slot forever); clients reconnect at once when they need it again.
TUNNEL_IDLE = 600.0


class Pipe(asyncio.Protocol):
    """One direction's reader: what arrives on its transport is written to `peer`. When
    the peer's write buffer fills, reading here pauses (and resumes when it drains)."""

    def __init__(self, count: Callable[[int], None]) -> None:
        self._count = count
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None
        self._eof = False
        self.last = asyncio.get_running_loop().time()  # the pair's last byte, either way
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._count(len(data))
        self.last = asyncio.get_running_loop().time()
        if self.peer is not None:
            self.peer.last = self.last
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and not peer.is_closing():
            peer.write(data)

    def eof_received(self) -> bool:
        self._eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer._eof:
            self._close_both()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()  # half-close: the other direction may still talk
            return True
        self._close_both()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._close_both()

    # Our transport's buffer is full: stop reading what would be written to it.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def close(self) -> None:
        self._close_both()

    def _close_both(self) -> None:
        for side in (self, self.peer):
            if side is not None and side.transport is not None:
                side.transport.close()


def _watch(pipe: Pipe, idle: float) -> None:
    """Close the pair once it has been idle for `idle` seconds; look again until then."""
    if pipe.closed.done():
        return
    loop = asyncio.get_running_loop()
    left = pipe.last + idle - loop.time()
    if left <= 0:
        pipe.close()
    else:
        loop.call_later(left, _watch, pipe, idle)


def splice(client: asyncio.Transport, leftover: bytes, upstream: Pipe,
           count_up: Callable[[int], None], *, idle: float = TUNNEL_IDLE) -> Pipe:
    """Join `client` (its protocol replaced) to a connected `upstream` pipe."""
    near = Pipe(count_up)
    near.connection_made(client)
    near.peer, upstream.peer = upstream, near
    client.set_protocol(near)
    if leftover:
        near.data_received(leftover)
    client.resume_reading()
    asyncio.get_running_loop().call_later(idle, _watch, upstream, idle)
    return near
