"""Packets and file descriptors over a unix SOCK_SEQPACKET socket, on an asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence

from ztunnel.zds.protocol import MAX_PACKET, ZdsError

MAX_FDS = 4


class Channel:
    """One end of a ZDS connection. Not safe for concurrent senders; one reader."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.closed = False

    @classmethod
    async def connect(cls, path: str) -> Channel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        while True:
            try:
                socket.send_fds(self.sock, [data], list(fds))
                return
            except BlockingIOError:
                await self._ready(writable=True)

    async def recv(self) -> tuple[bytes, list[int]]:
        """The next packet and the descriptors that came with it (now ours to close).
        Raises EOFError when the peer has gone."""
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, MAX_PACKET + 1, MAX_FDS)
            except BlockingIOError:
                await self._ready(writable=False)
                continue
            except ConnectionResetError as e:
                raise EOFError("the peer reset the connection") from e
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_PACKET:
                for fd in fds:
                    os.close(fd)
                raise ZdsError("a packet too large, or with too many descriptors")
            if not data and not fds:
                raise EOFError("the peer closed the connection")
            return data, fds

    async def _ready(self, *, writable: bool) -> None:
        if self.closed:
            raise EOFError("the channel is closed")
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fileno = self.sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if writable:
            loop.add_writer(fileno, wake)
        else:
            loop.add_reader(fileno, wake)
        try:
            await ready
        finally:
            with contextlib.suppress(ValueError, OSError):
                if writable:
                    loop.remove_writer(fileno)
                else:
                    loop.remove_reader(fileno)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
