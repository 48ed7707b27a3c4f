"""The event loop the server runs on: asyncio's, with a sendfile that stays registered.

asyncio's `sock_sendfile` (what `loop.sendfile` uses for a plain TCP transport) sends
one piece per wake-up and, around each piece, removes its writer callback and adds a new
one: two epoll_ctl calls and a new Handle per piece. A piece is what the socket's send
buffer takes, so a blob is thousands of pieces. Here the callback is added once per
call and kept until the count is sent; each wake-up costs one sendfile(2).

Behaviour is asyncio's otherwise: the file position ends after what was sent, a first
call that fails is `SendfileNotAvailableError` (so `loop.sendfile` falls back to writes),
ENOTCONN after the first piece is a ConnectionError, and a cancelled call removes its
callback. Only calls with a count take this path; the rest go to asyncio's.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import IO


class Loop(asyncio.SelectorEventLoop):
    """asyncio's selector loop; `sock_sendfile` keeps its writer between pieces."""

    async def sock_sendfile(self, sock: socket.socket, file: IO[bytes], offset: int = 0,
                            count: int | None = None, *, fallback: bool | None = True,
                            ) -> int:
        if count:
            try:
                return await self._send_registered(sock, file, offset, count)
            except asyncio.SendfileNotAvailableError:
                if not fallback:
                    raise
        return await super().sock_sendfile(sock, file, offset, count, fallback=bool(fallback))

    async def _send_registered(self, sock: socket.socket, file: IO[bytes], offset: int,
                               count: int) -> int:
        if sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        fd, source = sock.fileno(), file.fileno()
        done: asyncio.Future[None] = self.create_future()
        sent = 0

        def send() -> None:
            nonlocal sent
            if done.done():  # a wake-up queued before the callback was removed
                return
            try:
                n = os.sendfile(fd, source, offset + sent, count - sent)
            except (BlockingIOError, InterruptedError):
                return  # the buffer is full: the next wake-up
            except OSError as exc:
                done.set_exception(_failure(exc, sent))
                return
            sent += n
            if n == 0 or sent >= count:  # the end of the file, or all of it
                done.set_result(None)

        send()
        try:
            if not done.done():
                self.add_writer(fd, send)
                try:
                    await done
                finally:
                    self.remove_writer(fd)
            done.result()  # a first piece's error
        finally:
            if sent:  # as asyncio: the file position after what was sent
                os.lseek(source, offset + sent, os.SEEK_SET)
        return sent


def _failure(exc: OSError, sent: int) -> BaseException:
    """asyncio's errors: nothing sent yet is "no sendfile here" (the caller falls back to
    writes, which fail as they will); a socket gone mid-way is a ConnectionError."""
    if sent == 0:
        unavailable = asyncio.SendfileNotAvailableError("os.sendfile call failed")
        unavailable.__cause__ = exc
        return unavailable
    if exc.errno == errno.ENOTCONN and type(exc) is OSError:
        error = ConnectionError("socket is not connected", errno.ENOTCONN)
        error.__cause__ = exc
        return error
    return exc
