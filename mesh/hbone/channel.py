"""One tunnelled TCP connection: an HTTP/2 stream bound to a plaintext socket.

This is the hot path, written against asyncio's protocol callbacks (no
streams, no tasks, no awaits): bytes from the socket become DATA frames as
far as the windows allow, the rest waits with the socket paused; DATA
payloads go straight to the socket, and the window is given back to the
peer only once the socket has taken them (so a slow reader holds at most one
stream window of memory). TCP FIN and END_STREAM map to each other in each
direction independently; a TCP reset and RST_STREAM map to each other
(CONNECT_ERROR, as RFC 9113 section 8.5 asks of a proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from mesh.hbone.frames import ErrorCode, code_name

if TYPE_CHECKING:
    from mesh.hbone.tunnel import TunnelProtocol

_LINGER_RESET = struct.pack("ii", 1, 0)
# One read buffer for every plaintext socket of the process: what is read is
# encrypted (or copied aside) before the callback returns, so no two reads
# ever need it at once, and a thousand idle connections cost no memory.
_SHARED_READ_BUFFER = memoryview(bytearray(256 * 1024))
_READ_SIZE = len(_SHARED_READ_BUFFER)
_READ_INTO = (_SHARED_READ_BUFFER,)
_MORE_READS = 4  # then the loop's next turn: other sockets wait meanwhile


def reset_transport(transport: asyncio.BaseTransport) -> None:
    """Close a TCP connection with a RST instead of a FIN (SO_LINGER 0)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


class PlainProtocol(asyncio.BufferedProtocol):
    """The plaintext socket of a tunnel.

    The socket is read straight into a buffer shared by all plaintext
    sockets (uvloop would otherwise copy every read into a new ``bytes``):
    the bytes are encrypted and consumed by the TLS layer before the callback
    returns, and whatever the window cannot take yet is copied out first.
    Until a channel is attached it holds what arrives (with reading paused),
    so a server that speaks first loses nothing while the CONNECT is in
    flight.

    A read that did not fill the buffer is followed by one more at the end
    of the loop iteration, just before the tunnel writes what the iteration
    produced (as Envoy reads a socket until it would block): libuv stops at a
    short read, so an app's last bytes and its FIN (an HTTP server answering
    ``Connection: close`` closes some microseconds after its answer) would
    leave as two HBONE writes; the far app would read the bytes, close first
    and keep the TIME_WAIT in its pod, where it holds an ephemeral port for
    60 s (at 2,000 connections/s the client pod's ports ran out within 15 s
    and its connects slowed to a crawl). Read together, the bytes and
    END_STREAM cross in one write and reach the far app with its FIN queued.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.channel: Channel | None = None
        self._early: list[bytes] = []
        self._early_eof = False
        self._lost: BaseException | bool | None = False  # False: still connected
        self._fd = -1  # the socket's descriptor, for the read after a short one
        self.connected = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
        if not self.connected.done():
            self.connected.set_result(None)

    def attach(self, channel: Channel) -> None:
        self.channel = channel
        early, self._early = self._early, []
        for data in early:
            channel.plain_data(memoryview(data))
        if self._early_eof:
            channel.plain_eof()
        if self._lost is not False:
            channel.plain_lost(self._lost if isinstance(self._lost, BaseException) else None)
        elif self.transport is not None and not channel.reading_paused():
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SHARED_READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        channel = self.channel
        if channel is None:
            self._early.append(bytes(_SHARED_READ_BUFFER[:nbytes]))
            assert self.transport is not None
            self.transport.pause_reading()
            return
        if nbytes < _READ_SIZE and self._fd >= 0 and not channel.plain_ended:
            channel.tunnel.read_again(channel)
        channel.plain_data(_SHARED_READ_BUFFER[:nbytes])

    def read_on(self, channel: Channel) -> None:
        """Read again after a short read, until the socket would block (bounded)."""
        for _ in range(_MORE_READS):
            fd, transport = self._fd, self.transport
            if fd < 0 or transport is None or transport.is_closing():
                return  # (a closed transport's descriptor may already be another's)
            if channel.closed or channel.plain_ended or channel.reading_paused():
                return
            try:
                n = os.readv(fd, _READ_INTO)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the transport's own read reports it
            if n == 0:
                self.eof_received()
                return
            channel.plain_data(_SHARED_READ_BUFFER[:n])

    def shut_write(self) -> bool:
        """Send our FIN now, if the socket has nothing queued (False: not done).

        uvloop's ``write_eof`` leaves the shutdown to the loop's next turn,
        after everything else this turn does: the app would read the last
        bytes, close first and keep the TIME_WAIT. Right after the bytes,
        the FIN is queued before the app can read them.
        """
        fd, transport = self._fd, self.transport
        if fd < 0 or transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size():
            return False
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        finally:
            sock.detach()  # the descriptor stays the transport's
        return True

    def eof_received(self) -> bool:
        if self.channel is not None:
            self.channel.plain_eof()
        else:
            self._early_eof = True
        return True  # keep our writing side open: a half-close, not a close

    def connection_lost(self, exc: Exception | None) -> None:
        self._fd = -1
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("connection closed"))
        if self.channel is not None:
            self.channel.plain_lost(exc)
        else:
            self._lost = exc

    def pause_writing(self) -> None:
        if self.channel is not None:
            self.channel.plain_write_paused = True

    def resume_writing(self) -> None:
        if self.channel is not None:
            self.channel.plain_write_paused = False
            self.channel.plain_drained()


class Channel:
    """The state of one tunnel stream and its socket; owned by its tunnel."""

    __slots__ = (
        "_close_callbacks",
        "_early",
        "_eof_pending",
        "_pending",
        "_unreleased",
        "bytes_from_peer",
        "bytes_to_peer",
        "closed",
        "conn",
        "peer_ended",
        "plain",
        "plain_ended",
        "plain_write_paused",
        "reason",
        "started",
        "stream_id",
        "tunnel",
        "window_blocked",
    )

    def __init__(self, tunnel: TunnelProtocol, stream_id: int) -> None:
        self.tunnel = tunnel
        self.conn = tunnel.conn
        self.stream_id = stream_id
        self.plain: PlainProtocol | None = None
        self._pending: deque[memoryview] = deque()  # socket bytes waiting for window
        self._early: list[bytes] = []  # peer bytes that arrived before the socket
        self._eof_pending = False
        self._unreleased = 0
        self.plain_write_paused = False
        self.window_blocked = False
        self.peer_ended = False
        self.plain_ended = False
        self.closed = False
        self.bytes_to_peer = 0
        self.bytes_from_peer = 0
        self.started = time.monotonic()
        self.reason = ""
        self._close_callbacks: list[Callable[[Channel], None]] = []

    def __repr__(self) -> str:
        return (
            f"<Channel stream={self.stream_id} to_peer={self.bytes_to_peer} "
            f"from_peer={self.bytes_from_peer}>"
        )

    def on_close(self, callback: Callable[[Channel], None]) -> None:
        if self.closed:
            callback(self)
        else:
            self._close_callbacks.append(callback)

    def attach(self, plain: PlainProtocol) -> None:
        """Bind the socket; from now on bytes flow both ways."""
        self.plain = plain
        early, self._early = self._early, []
        for data in early:
            self._to_socket(memoryview(data))  # fresh bytes: nothing to lend back
        if self.peer_ended:
            self._socket_write_eof()
        plain.attach(self)
        self.tunnel.flush()

    def reading_paused(self) -> bool:
        return self.window_blocked or self.tunnel.write_paused

    # ------------------------------------------------------ socket -> peer

    def plain_data(self, data: memoryview) -> None:
        """Bytes from the socket; ``data`` is only valid during this call."""
        if self.closed:
            return
        if self._pending:
            self._pending.append(memoryview(bytes(data)))
            return
        taken = self.conn.send_data(self.stream_id, data)
        self.bytes_to_peer += taken
        if taken < len(data):
            # The reused read buffer is overwritten by the next read: copy the rest.
            self._pending.append(memoryview(bytes(data[taken:])))
            self._block()
        self.tunnel.flush()

    def plain_eof(self) -> None:
        if self.plain_ended or self.closed:
            return
        self.plain_ended = True
        if self._pending:
            self._eof_pending = True
        else:
            self.conn.end_stream(self.stream_id)
            self.tunnel.flush()
            self._maybe_done()

    def plain_lost(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        if exc is not None or not self.plain_ended:
            # A reset socket, or one closed while the peer still sends: the
            # stream cannot complete (RFC 9113 8.5: CONNECT_ERROR).
            reason = f"socket closed: {exc}" if exc else "socket closed before the peer ended"
            self._reset(ErrorCode.CONNECT_ERROR if exc else ErrorCode.CANCEL, reason)
            return
        self._maybe_done()

    def window_opened(self) -> None:
        """The peer gave us window: send what waits, then read the socket again."""
        pending = self._pending
        while pending and not self.closed:
            chunk = pending[0]
            taken = self.conn.send_data(self.stream_id, chunk)
            self.bytes_to_peer += taken
            if taken < len(chunk):
                pending[0] = chunk[taken:]
                break
            pending.popleft()
        if pending or self.closed:
            return
        if self._eof_pending:
            self._eof_pending = False
            self.conn.end_stream(self.stream_id)
            self._maybe_done()
        self.window_blocked = False
        self._resume_socket()

    def _block(self) -> None:
        self.window_blocked = True
        plain = self.plain
        if plain is not None and plain.transport is not None:
            plain.transport.pause_reading()

    def _resume_socket(self) -> None:
        plain = self.plain
        if plain is not None and plain.transport is not None and not self.reading_paused():
            with contextlib.suppress(RuntimeError):
                plain.transport.resume_reading()

    def tunnel_write_paused(self) -> None:
        plain = self.plain
        if plain is not None and plain.transport is not None:
            plain.transport.pause_reading()

    def tunnel_write_resumed(self) -> None:
        self._resume_socket()

    # ------------------------------------------------------ peer -> socket

    def peer_data(self, data: memoryview) -> asyncio.Transport | None:
        """Bytes from the peer. Returns the socket when it kept a reference to ``data``."""
        if self.plain is None:
            # Not attached yet (server waiting on its handler): keep a copy,
            # bounded by the stream window, which we do not give back yet.
            self._early.append(bytes(data))
            return None
        return self._to_socket(data)

    def _to_socket(self, data: memoryview) -> asyncio.Transport | None:
        plain = self.plain
        assert plain is not None
        transport = plain.transport
        n = len(data)
        self.bytes_from_peer += n
        if transport is None or transport.is_closing():
            self.conn.release(self.stream_id, n)
            return None
        lent: asyncio.Transport | None = None
        if transport.get_write_buffer_size():
            # Bytes already wait in the socket's buffer: uvloop would queue a
            # reference to ``data``. A copy keeps the read buffer free.
            transport.write(bytes(data))
        else:
            transport.write(data)  # usually sent at once, no reference kept
            if transport.get_write_buffer_size():
                lent = transport
        if self.plain_write_paused:
            self._unreleased += n
        else:
            self.conn.release(self.stream_id, n)
        return lent

    def plain_drained(self) -> None:
        """The socket took what we wrote: give that window back to the peer."""
        if self._unreleased:
            self.conn.release(self.stream_id, self._unreleased)
            self._unreleased = 0
            self.tunnel.flush()

    def peer_end(self) -> None:
        self.peer_ended = True
        if self.plain is not None:
            self._socket_write_eof()
            self._maybe_done()

    def _socket_write_eof(self) -> None:
        plain = self.plain
        assert plain is not None
        transport = plain.transport
        if (
            transport is not None
            and not transport.is_closing()
            and transport.can_write_eof()
            and not plain.shut_write()
        ):
            transport.write_eof()

    def peer_reset(self, error_code: int, remote: bool) -> None:
        """RST_STREAM: the tunnelled connection is over, abruptly: reset the socket."""
        if self.closed:
            return
        name = code_name(error_code)
        self.reason = f"stream reset by {'peer' if remote else 'us'}: {name}"
        self._close(reset_socket=True)

    def connection_ended(self, reason: str) -> None:
        if not self.closed:
            self.reason = reason
            self._close(reset_socket=True)

    # ------------------------------------------------------------- endings

    def _maybe_done(self) -> None:
        if self.peer_ended and self.plain_ended and not self._pending and not self.closed:
            self.reason = self.reason or "closed"
            self._close(reset_socket=False)

    def _reset(self, code: int, reason: str) -> None:
        self.reason = reason
        self.conn.reset_stream(self.stream_id, code)
        self.tunnel.flush()
        self._close(reset_socket=code != ErrorCode.CANCEL)

    def discard(self, reason: str) -> None:
        """Drop a channel that never got a socket (its CONNECT was refused)."""
        if not self.closed:
            self.reason = reason
            self._close(reset_socket=False)

    def reset(self, reason: str, code: int = ErrorCode.CANCEL) -> None:
        """Abort from our side: RST_STREAM to the peer, reset the socket."""
        if not self.closed:
            self.reason = reason
            self.conn.reset_stream(self.stream_id, code)
            self.tunnel.flush()
            self._close(reset_socket=True)

    def _close(self, *, reset_socket: bool) -> None:
        self.closed = True
        self._pending.clear()
        # Bytes the peer sent that nobody will consume still count against the
        # connection window: give them back, or the connection would stall.
        held = self._unreleased + sum(len(d) for d in self._early)
        self._early.clear()
        self._unreleased = 0
        if held:
            self.conn.release(self.stream_id, held)
        self.tunnel.channel_closed(self)
        plain = self.plain
        if plain is not None and plain.transport is not None:
            if reset_socket:
                reset_transport(plain.transport)
            else:
                plain.transport.close()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            callback(self)
