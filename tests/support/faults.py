"""Per-request fault injection, shared by the fake registry and the counting proxy: a
`Fault` says how one response goes wrong, a `Script` says which request gets which
step (regclient's internal/reqresp is the model), and `send_body` writes a body while
applying a fault's byte-level parts (corrupt, cut, reset, stall, throttle).

Nothing here decides what a correct answer is; the servers that use it do.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import threading
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PathSpec = str | re.Pattern[str]  # an exact path, or a pattern the whole path must match
PIECE = 256 * 1024  # what one write sends at most, so cut and stall offsets are exact


class Gate:
    """A point where responses stop until the test opens it. Thread-safe: it works for a
    server on the test's loop and for one in a thread of its own alike."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._reached = threading.Event()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    @property
    def reached(self) -> bool:
        """Some response has stopped here (it may have gone on since)."""
        return self._reached.is_set()

    def open(self) -> None:
        self._open.set()

    async def pass_through(self) -> None:
        """Called by a server: note the arrival, then wait for the gate to open. It polls
        so that a server shutting down can cancel it, unlike a thread blocked on wait()."""
        self._reached.set()
        while not self._open.is_set():  # noqa: ASYNC110 - a threading.Event, set from any thread
            await asyncio.sleep(0.005)


@dataclass
class Fault:
    """How one response goes wrong. Offsets are positions in the whole object (a resumed
    206 that starts at 1000 is cut by `cut_at=1500` after 500 bytes).

    With `status` the answer is exactly that status, `headers` and `body` (empty if None):
    a 429, a 5xx, a 200 with wrong bytes. Without it, the normal answer is given with the
    other fields applied; `body` then replaces the object's bytes (and length).
    """

    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = field(default=None, repr=False)
    delay: float = 0.0  # seconds before the status line: a slow upstream
    ignore_range: bool = False  # answer a Range request with 200 and everything
    content_range: str | None = None  # send this Content-Range instead of the true one
    chunked: bool = False  # no Content-Length
    corrupt_at: tuple[int, ...] = ()  # flip the byte at each offset: same length, other digest
    cut_at: int | None = None  # flush, then end the connection (FIN): a truncated body
    reset_at: int | None = None  # reset the connection (RST): at most this many bytes arrive
    stall_at: int | None = None  # stop here until `gate` (default: the server's) opens
    gate: Gate | None = None
    throttle: int | None = None  # bytes per second

    @property
    def breaks(self) -> tuple[int, ...]:
        return tuple(o for o in (self.cut_at, self.reset_at, self.stall_at) if o is not None)


NO_FAULT = Fault()


def corrupt(data: bytes, *offsets: int) -> bytes:
    """`data` with the byte at each offset flipped: same length, another digest."""
    flipped = bytearray(data)
    for offset in offsets:
        flipped[offset] ^= 0xFF
    return bytes(flipped)


def oci_error(status: int, code: str, message: str, **headers: str) -> Fault:
    """A fault answering `status` with an OCI error body."""
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return Fault(status=status, body=body,
                 headers={"Content-Type": "application/json", **headers})


def rate_limited(retry_after: str | None = None) -> Fault:
    """429 TOOMANYREQUESTS, with a Retry-After header when given (seconds or a date)."""
    extra = {"Retry-After": retry_after} if retry_after is not None else {}
    return oci_error(429, "TOOMANYREQUESTS", "injected: rate limited", **extra)


def unavailable(status: int = 503) -> Fault:
    """A 5xx with an OCI body, as a registry behind a failing load balancer answers."""
    return oci_error(status, "UNAVAILABLE", f"injected: {status}")


Step = Fault | Handler


def _matches(method: str, spec: PathSpec, want_method: str, path: str) -> bool:
    if method not in ("*", want_method):
        return False
    return spec == path if isinstance(spec, str) else spec.fullmatch(path) is not None


class Script:
    """Which request gets which step. Queued steps are each used once, by the next
    matching requests in order; standing steps answer every matching request after that.
    A request nothing matches gets the server's normal answer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: list[tuple[str, PathSpec, Step]] = []
        # Keyed by (method, path) so a test can replace or clear one entry.
        self.standing: dict[tuple[str, PathSpec], Step] = {}

    def queue(self, method: str, path: PathSpec, *steps: Step) -> None:
        with self._lock:
            self._queued += [(method, path, step) for step in steps]

    def always(self, method: str, path: PathSpec, step: Step) -> None:
        with self._lock:
            self.standing[(method, path)] = step

    def pending(self) -> list[tuple[str, PathSpec, Step]]:
        """Queued steps no request has used yet (a finished script has none)."""
        with self._lock:
            return list(self._queued)

    def take(self, method: str, path: str) -> Step | None:
        with self._lock:
            for i, (m, spec, step) in enumerate(self._queued):
                if _matches(m, spec, method, path):
                    del self._queued[i]
                    return step
            exact = self.standing.get((method, path))
            if exact is not None:
                return exact
            for (m, spec), step in self.standing.items():
                if _matches(m, spec, method, path):
                    return step
        return None


class Scripted:
    """The scripting surface both servers offer: `queue`, `always`, `pending`, and one
    gate that `release()` opens (teardown releases it too)."""

    def __init__(self) -> None:
        self.script = Script()
        self.gate = Gate()

    def queue(self, method: str, path: PathSpec, *steps: Step) -> None:
        """The next requests matching `method` ("*": any) and `path` get `steps`, in order."""
        self.script.queue(method, path, *steps)

    def always(self, method: str, path: PathSpec, step: Step) -> None:
        """Every matching request (once the queue has none for it) gets `step`."""
        self.script.always(method, path, step)

    def pending(self) -> list[tuple[str, PathSpec, Step]]:
        return self.script.pending()

    def release(self) -> None:
        """Open the gate: responses stalled at it go on."""
        self.gate.open()


def fault_answer(fault: Fault) -> web.Response:
    """The whole answer of a fault that has a `status`."""
    assert fault.status is not None
    return web.Response(status=fault.status, body=fault.body or b"", headers=dict(fault.headers))


async def hang_up(request: web.Request, *, reset: bool) -> None:
    """End the connection mid-body: FIN, or RST. Raises CancelledError, as aiohttp does
    for a connection that is gone, so nothing more is written on it."""
    transport = request.transport
    assert transport is not None
    for _ in range(200):  # what was written leaves the loop's buffer first
        if not transport.get_write_buffer_size():
            break
        await asyncio.sleep(0.001)
    # An aiohttp client drops bytes it has received but not yet read once the connection
    # fails, so give them a moment to be read: the cut then falls where it was asked for.
    await asyncio.sleep(0.05)
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()
    raise asyncio.CancelledError


async def send_body(request: web.Request, response: web.StreamResponse,
                    chunks: AsyncIterable[bytes], *, start: int, fault: Fault, gate: Gate,
                    on_sent: Callable[[int], None],
                    pace: Callable[[int], Awaitable[None]] | None = None) -> None:
    """Write `chunks` (the object's bytes from offset `start`) with `fault` applied.
    `on_sent(n)` is called before each write, so a count read by a test that has seen
    the bytes arrive includes them; `pace(n)` after it (a server's shared rate cap)."""
    position = start
    stalled = False
    limit = PIECE
    if fault.throttle:
        limit = max(1, min(64 * 1024, fault.throttle // 10))

    async def checkpoint() -> None:
        nonlocal stalled
        if fault.stall_at == position and not stalled:
            stalled = True
            await (fault.gate or gate).pass_through()
        if fault.cut_at == position:
            await hang_up(request, reset=False)
        if fault.reset_at == position:
            await hang_up(request, reset=True)

    async for chunk in chunks:
        offset = 0
        while offset < len(chunk):
            await checkpoint()
            stop = min(len(chunk), offset + limit)
            for at in fault.breaks:
                if position < at < position + stop - offset:
                    stop = offset + at - position
            piece = chunk[offset:stop]
            flips = [at - position for at in fault.corrupt_at
                     if position <= at < position + len(piece)]
            if flips:
                piece = corrupt(piece, *flips)
            on_sent(len(piece))
            await response.write(piece)
            position += len(piece)
            offset = stop
            if fault.throttle:
                await asyncio.sleep(len(piece) / fault.throttle)
            if pace is not None:
                await pace(len(piece))
    await checkpoint()


async def pieces(data: bytes, start: int, end: int) -> AsyncIterator[bytes]:
    """`data[start:end]` as chunks for `send_body`."""
    for offset in range(start, end, PIECE):
        yield data[offset:min(end, offset + PIECE)]
