"""The server's event loop: sendfile keeps its writer registered between pieces and
otherwise behaves as asyncio's (position, errors, fallback, cancellation)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from gateway.eventloop import Loop

SIZE = 8 << 20  # far beyond a socket buffer: the writer path is taken


@pytest.fixture
def run() -> Iterator[Callable[[Awaitable[object]], object]]:
    with asyncio.Runner(loop_factory=Loop) as runner:
        yield runner.run


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(SIZE))
    return path


def _pair() -> tuple[socket.socket, socket.socket]:
    sender, reader = socket.socketpair()
    sender.setblocking(False)
    reader.setblocking(False)
    return sender, reader


async def _drain(loop: asyncio.AbstractEventLoop, reader: socket.socket, want: int,
                 piece: int = 1 << 16) -> bytes:
    got = bytearray()
    while len(got) < want:
        data = await loop.sock_recv(reader, min(piece, want - len(got)))
        if not data:
            break
        got += data
    return bytes(got)


def test_a_span_is_sent_whole_and_the_file_position_follows(run, blob: Path) -> None:
    data = blob.read_bytes()

    async def main(file: IO[bytes]) -> None:
        loop = asyncio.get_running_loop()
        sender, reader = _pair()
        with sender, reader:
            offset, count = 12345, SIZE - 20000
            sent, got = await asyncio.gather(
                loop.sock_sendfile(sender, file, offset, count),
                _drain(loop, reader, count))
            assert sent == count and got == data[offset:offset + count]
            assert file.tell() == offset + count
            assert not loop.remove_writer(sender.fileno())  # no writer left behind

    with blob.open("rb") as file:
        run(main(file))


def test_a_file_shorter_than_the_count_ends_at_its_end(run, blob: Path) -> None:
    tail = blob.read_bytes()[-100:]

    async def main(file: IO[bytes]) -> None:
        loop = asyncio.get_running_loop()
        sender, reader = _pair()
        with sender, reader:
            sent, got = await asyncio.gather(loop.sock_sendfile(sender, file, SIZE - 100, 5000),
                                             _drain(loop, reader, 100))
            assert sent == 100 and got == tail

    with blob.open("rb") as file:
        run(main(file))


def test_a_reader_gone_mid_way_is_a_connection_error(run, blob: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        sender, reader = _pair()
        with sender, blob.open("rb") as file:
            sending = asyncio.ensure_future(loop.sock_sendfile(sender, file, 0, SIZE))
            await _drain(loop, reader, 1 << 16)
            reader.close()
            with pytest.raises(ConnectionError):
                await sending
            assert not loop.remove_writer(sender.fileno())
    run(main())


def test_a_cancelled_send_removes_its_writer(run, blob: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        sender, reader = _pair()
        with sender, reader, blob.open("rb") as file:
            sending = asyncio.ensure_future(loop.sock_sendfile(sender, file, 0, SIZE))
            await asyncio.sleep(0.05)  # nobody reads: it waits for room in the buffer
            assert not sending.done()
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            assert not loop.remove_writer(sender.fileno())
            assert 0 < file.tell() < SIZE  # after what was sent, as asyncio leaves it
    run(main())


def test_a_source_sendfile_cannot_read_is_said_for_the_caller_to_fall_back(run) -> None:
    async def main(pipe: IO[bytes]) -> None:
        loop = asyncio.get_running_loop()
        sender, reader = _pair()
        with sender, reader:
            with pytest.raises(asyncio.SendfileNotAvailableError):
                await loop.sock_sendfile(sender, pipe, 0, 18, fallback=False)
            assert not loop.remove_writer(sender.fileno())

    r, w = os.pipe()
    os.write(w, b"not a regular file")
    os.close(w)
    with open(r, "rb") as pipe:
        run(main(pipe))


class _Counting(Loop):
    added = 0

    def add_writer(self, *args: object) -> None:  # type: ignore[override]
        self.added += 1
        super().add_writer(*args)  # type: ignore[arg-type]


def test_the_writer_is_added_once_per_call_not_once_per_piece(blob: Path) -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        sender, reader = _pair()
        with sender, reader, blob.open("rb") as file:
            sent, got = await asyncio.gather(loop.sock_sendfile(sender, file, 0, SIZE),
                                             _drain(loop, reader, SIZE))
            assert sent == SIZE and len(got) == SIZE
        return loop.added  # type: ignore[attr-defined, no-any-return]

    with asyncio.Runner(loop_factory=_Counting) as runner:
        assert runner.run(main()) == 1  # asyncio's adds one per piece (32 here)
