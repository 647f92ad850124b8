"""A tunnel stream that ends inside this process: a protocol where a socket would be.

ztunnel binds each CONNECT stream to a real TCP socket (:class:`PlainProtocol`).
A waypoint terminates the stream itself: the bytes are HTTP it parses. A
:class:`LocalSocket` stands in for the socket on the channel's side and hands
an asyncio ``Transport`` to an ordinary ``asyncio.Protocol`` (the HTTP codec)
on the other, so the codec is the same whether it sits on a TCP socket or on
an HBONE stream:

* channel -> protocol: what the peer sends arrives as ``data_received``
  (copied: the channel's buffers are reused), END_STREAM as ``eof_received``,
  a reset as ``connection_lost`` with an error;
* protocol -> channel: ``write`` becomes DATA frames as the windows allow,
  ``write_eof`` END_STREAM, ``close`` END_STREAM after what is queued,
  ``abort`` RST_STREAM;
* flow control both ways: when the stream's window is full the protocol is
  told ``pause_writing`` (and ``resume_writing`` later); when the protocol
  pauses reading, the window is not given back, so the peer stops sending.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mesh.hbone.channel import Channel, PlainProtocol


class _ChannelSide(asyncio.Transport):
    """What the channel writes to, as if it were the plaintext socket."""

    def __init__(self, end: LocalSocket) -> None:
        super().__init__()
        self._end = end

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._end.from_peer(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self) -> None:
        self._end.peer_eof()

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self._end.closed

    def get_write_buffer_size(self) -> int:
        return 0  # delivered at once: nothing is ever queued here

    def pause_reading(self) -> None:
        self._end.window_full()

    def resume_reading(self) -> None:
        self._end.window_open()

    def is_reading(self) -> bool:
        return not self._end.blocked

    def close(self) -> None:
        self._end.peer_closed(None)

    def abort(self) -> None:
        self._end.peer_closed(ConnectionResetError("the HBONE stream was reset"))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._end.extra.get(name, default)


class _AppSide(asyncio.Transport):
    """The transport the protocol is given."""

    def __init__(self, end: LocalSocket) -> None:
        super().__init__()
        self._end = end

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._end.to_peer(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self) -> None:
        self._end.to_peer_eof()

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self._end.closed or self._end.app_closing

    def get_write_buffer_size(self) -> int:
        return self._end.pending_bytes()

    def pause_reading(self) -> None:
        self._end.app_pause()

    def resume_reading(self) -> None:
        self._end.app_resume()

    def is_reading(self) -> bool:
        return not self._end.app_paused

    def close(self) -> None:
        self._end.app_close()

    def abort(self) -> None:
        self._end.app_abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._end.extra.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class LocalSocket(PlainProtocol):
    """Binds an HBONE channel to ``protocol``; attach it with ``channel.attach(socket)``."""

    def __init__(self, protocol: asyncio.BaseProtocol, extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.protocol = protocol
        self.extra: dict[str, Any] = dict(extra or {})
        self.closed = False
        self.app_closing = False
        self.app_paused = False
        self.blocked = False
        self._app_transport = _AppSide(self)
        self._protocol_started = False
        # PlainProtocol's end of the bargain: the channel sees us as a connected socket.
        self.connection_made(_ChannelSide(self))

    @property
    def app_transport(self) -> asyncio.Transport:
        return self._app_transport

    def attach(self, channel: Channel) -> None:
        super().attach(channel)
        if not self._protocol_started:
            self._protocol_started = True
            self.protocol.connection_made(self._app_transport)

    # ---------------------------------------------------- channel -> protocol

    def from_peer(self, data: bytes) -> None:
        if not self.closed:
            proto = self.protocol
            assert isinstance(proto, asyncio.Protocol)
            proto.data_received(data)

    def peer_eof(self) -> None:
        if self.closed:
            return
        proto = self.protocol
        assert isinstance(proto, asyncio.Protocol)
        keep_open = proto.eof_received()
        if not keep_open and not self.app_closing:
            self.app_close()

    def peer_closed(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.protocol.connection_lost(exc if isinstance(exc, Exception) else None)

    def window_full(self) -> None:
        if not self.blocked:
            self.blocked = True
            self.protocol.pause_writing()

    def window_open(self) -> None:
        if self.blocked:
            self.blocked = False
            self.protocol.resume_writing()

    # ---------------------------------------------------- protocol -> channel

    def pending_bytes(self) -> int:
        channel = self.channel
        if channel is None:
            return 0
        return sum(len(c) for c in channel._pending)  # what waits for window

    def to_peer(self, data: bytes | bytearray | memoryview) -> None:
        channel = self.channel
        if channel is None or self.closed or self.app_closing:
            return
        channel.plain_data(memoryview(data))

    def to_peer_eof(self) -> None:
        if self.channel is not None and not self.closed:
            self.channel.plain_eof()

    def app_close(self) -> None:
        """END_STREAM after what is queued; the stream ends when the peer ends too."""
        if self.app_closing or self.closed:
            return
        self.app_closing = True
        channel = self.channel
        if channel is not None:
            channel.plain_eof()
            if channel.peer_ended:
                channel.plain_lost(None)

    def app_abort(self) -> None:
        if self.closed:
            return
        channel = self.channel
        if channel is not None:
            channel.reset("closed by the application")
        self.peer_closed(None)

    def app_pause(self) -> None:
        self.app_paused = True
        self.pause_writing()  # the channel holds back the window

    def app_resume(self) -> None:
        if self.app_paused:
            self.app_paused = False
            self.resume_writing()  # the window goes back to the peer
