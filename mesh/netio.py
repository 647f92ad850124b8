"""Socket calls on the event loop, where uvloop's own cost more than the call.

``uvloop``'s ``sock_connect`` passes every address through ``getaddrinfo``
without a socket type, which its numeric fast path does not take: each
connect, even to ``10.0.0.1``, went through libuv's thread pool (a worker
woken, the GIL handed over and back, one more loop turn). Measured on this
machine (``uvloop`` 0.23, 3,000 connects to a local listener): 91 us of CPU
per ``sock_connect``, 24 us for :func:`connect` (and less once it stopped
waiting for a loop turn when the handshake was already done). ztunnel
connects once per inbound connection (to the app) and per passthrough.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket

_IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN)


async def connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect the non-blocking ``sock`` to a numeric ``address``; raise ``OSError``.

    As ``loop.sock_connect``, without name resolution: the kernel is asked
    at once, and if the handshake is still in flight the loop waits for the
    socket to become writable, then reads the outcome from ``SO_ERROR``.
    Cancellation (a caller's timeout) stops the wait; the caller closes the
    socket.
    """
    err = sock.connect_ex(address)
    if err in _IN_PROGRESS:
        # To a local or veth peer the handshake is usually done by the time
        # connect() returns (the kernel answers the SYN in the same call), yet
        # it still says "in progress": a connected socket has a peer name.
        try:
            sock.getpeername()
        except OSError:
            pass
        else:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _wake, done)
        try:
            await done
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {address[0]}:{address[1]}: {os.strerror(err)}")


def _wake(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
