"""The asyncio shell of one HBONE connection: TLS transport in, events out to channels.

It reads decrypted bytes straight into its own buffer (``BufferedProtocol``:
uvloop's TLS layer decrypts into it, no copy), runs them through the
:class:`~mesh.hbone.connection.TunnelConnection` core and dispatches the
events to the channels. A receive buffer is reused only when no socket kept
a reference to a slice of it: uvloop's ``write()`` holds on to a memoryview
it could not send at once, and overwriting it would corrupt that data
(allocating a fresh buffer for every read instead cost a third of the CPU
in measurements). It also owns keepalive (PING every ``ping_interval_s``,
abort after ``ping_timeout_s`` of silence) and back-pressure between the
TLS socket and the plaintext sockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, cast

from mesh.hbone import connection as core
from mesh.hbone.channel import Channel
from mesh.hbone.errors import ConnectionLost, ProtocolViolation
from mesh.hbone.frames import ErrorCode, code_name
from mesh.hbone.settings import HboneConfig, Http2Settings, KiB, MiB
from mesh.hbone.tls import describe_tls_error, peer_certificate_identity
from mesh.identity import SpiffeId

READ_BUFFER = 256 * KiB
_MAX_LENT = 8
# TLS socket write buffer: above HIGH the channels stop reading their sockets.
WRITE_HIGH = 4 * MiB
WRITE_LOW = 1 * MiB
# Frames smaller than this are joined with their header into one write (one
# TLS record instead of two); larger payloads are passed on without a copy.
_JOIN_BELOW = 64 * KiB


class TunnelProtocol(asyncio.BufferedProtocol):
    """Shared by the server and client ends; subclasses handle requests/responses."""

    client_side = False

    def __init__(
        self, *, settings: Http2Settings, config: HboneConfig, logger: logging.Logger
    ) -> None:
        self.conn = core.TunnelConnection(client_side=self.client_side, settings=settings)
        self.config = config
        self.log = logger
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, Channel] = {}
        self.peer = "?"
        self.peer_identity: SpiffeId | None = None
        self.write_paused = False
        self.closed = False
        self.close_reason = ""
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._buffer = bytearray(READ_BUFFER)
        self._view = memoryview(self._buffer)
        self._lent: list[tuple[bytearray, list[asyncio.Transport]]] = []
        self._last_received = self.loop.time()
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_count = 0
        self._read_again: list[Channel] = []

    # --------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if hasattr(transport, "before_flush"):
            transport.before_flush = self._before_flush
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        # Pause well before the flood limit, so the limit is checked in time.
        high = min(WRITE_HIGH, self.config.max_write_buffer_bytes // 2)
        self.transport.set_write_buffer_limits(high=high, low=min(WRITE_LOW, high // 4))
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            if ssl_object is None:
                raise ConnectionLost("not a TLS connection")
            if ssl_object.selected_alpn_protocol() != "h2":
                raise ConnectionLost(
                    f"peer did not negotiate ALPN h2 (got {ssl_object.selected_alpn_protocol()!r})"
                )
            self.peer_identity = peer_certificate_identity(ssl_object)
            self.check_peer(self.peer_identity)
        except Exception as e:
            self.refuse_connection(str(e), e)
            return
        cipher = ssl_object.cipher()
        self.log.debug(
            "hbone: connection with %s (%s) established: cipher %s",
            self.peer,
            self.peer_identity,
            cipher[0] if cipher else "?",
        )
        self.conn.initiate()
        self.flush()
        self._last_received = self.loop.time()
        self._keepalive = self.loop.call_later(self.config.ping_interval_s, self._keepalive_tick)
        self.started()

    def check_peer(self, identity: SpiffeId) -> None:
        """Raise to refuse the peer (wrong identity or trust domain)."""

    def started(self) -> None:
        """The connection is established and the preface queued."""

    def refuse_connection(self, reason: str, exc: BaseException | None = None) -> None:
        self.log.warning("hbone: refusing connection with %s: %s", self.peer, reason)
        self.close_reason = reason
        self.closed = True
        assert self.transport is not None
        self.transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._last_received = self.loop.time()
        try:
            events = self.conn.receive(self._view[:nbytes])
        except ProtocolViolation as e:
            self.flush()
            self._fail(f"peer broke HTTP/2: {e}")
            return
        holders: list[asyncio.Transport] | None = None
        channels = self.channels
        for ev in events:
            if type(ev) is core.DataReceived:
                channel = channels.get(ev.stream_id)
                if channel is None:
                    self.conn.release(ev.stream_id, len(ev.data))
                    continue
                holder = channel.peer_data(ev.data)
                if holder is not None:
                    if holders is None:
                        holders = []
                    holders.append(holder)
            else:
                self.handle_event(ev)
        self.flush()
        if holders is not None:
            self._lend(holders)

    def _lend(self, holders: list[asyncio.Transport]) -> None:
        """Sockets still hold slices of the read buffer: read into another one.

        The lent buffer comes back once those sockets have flushed (uvloop
        drops its reference when the write completes); reusing buffers avoids
        zeroing a fresh 256 KiB for every read of a slow consumer.
        """
        self._lent.append((self._buffer, holders))
        spare = None
        still_lent = []
        for buffer, transports in self._lent:
            if (
                spare is None
                and all(t.get_write_buffer_size() == 0 or t.is_closing() for t in transports)
                and buffer is not self._buffer
            ):
                spare = buffer
            else:
                still_lent.append((buffer, transports))
        # Forgetting a lent buffer is always safe (the socket's reference
        # keeps it alive); the list only lets us reuse it, so keep it short.
        self._lent = still_lent[-_MAX_LENT:]
        self._buffer = spare if spare is not None else bytearray(READ_BUFFER)
        self._view = memoryview(self._buffer)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._read_again.clear()
        if self._keepalive is not None:
            self._keepalive.cancel()
        reason = self.close_reason or (
            f"connection lost: {describe_tls_error(exc)}" if exc else "connection closed"
        )
        if self.channels and not self.close_reason:
            # Streams were open and nobody asked for this: worth a line.
            self.log.warning(
                "hbone: connection with %s (%s) lost with %d open streams: %s",
                self.peer,
                self.peer_identity,
                len(self.channels),
                describe_tls_error(exc) if exc else "closed without GOAWAY",
            )
        self.closed = True
        self.close_reason = reason
        for channel in list(self.channels.values()):
            channel.connection_ended(reason)
        self.channels.clear()
        self.connection_ended(reason)
        if not self.done.done():
            self.done.set_result(None)

    def connection_ended(self, reason: str) -> None:
        """Hook: the connection is gone."""

    def pause_writing(self) -> None:
        self.write_paused = True
        for channel in self.channels.values():
            channel.tunnel_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        for channel in list(self.channels.values()):
            channel.tunnel_write_resumed()

    # ------------------------------------------------------------ output

    def flush(self) -> None:
        out = self.conn.take_output()
        if not out or self.transport is None or self.transport.is_closing():
            return
        # Only a paused transport (above its high-water mark) can be near the limit.
        if (
            self.write_paused
            and self.transport.get_write_buffer_size() > self.config.max_write_buffer_bytes
        ):
            self.conn.closed = True
            self._fail(
                f"peer does not read: over {self.config.max_write_buffer_bytes} bytes queued",
                goaway=False,
            )
            return
        if len(out) == 1:
            self.transport.write(out[0])
            return
        total = 0
        for item in out:
            total += len(item)
        if total < _JOIN_BELOW:
            self.transport.write(b"".join(out))
        else:
            self.transport.writelines(out)

    # ------------------------------------------------------------ events

    def read_again(self, channel: Channel) -> None:
        """``channel``'s socket gave a short read: read it once more just before this
        iteration's write (see :class:`~mesh.hbone.channel.PlainProtocol`)."""
        if not self._read_again:
            flush_soon = getattr(self.transport, "flush_soon", None)
            if flush_soon is None:
                return
            flush_soon()
        self._read_again.append(channel)

    def _before_flush(self) -> None:
        channels, self._read_again = self._read_again, []
        for channel in channels:
            plain = channel.plain
            if plain is not None:
                plain.read_on(channel)
        if channels:
            self.flush()

    def handle_event(self, ev: core.Event) -> None:
        kind = type(ev)
        if kind is core.WindowOpened:
            assert isinstance(ev, core.WindowOpened)
            if ev.stream_id == 0:
                for blocked in list(self.channels.values()):
                    if blocked.window_blocked:
                        blocked.window_opened()
            else:
                opened = self.channels.get(ev.stream_id)
                if opened is not None and opened.window_blocked:
                    opened.window_opened()
        elif kind is core.StreamEnded:
            assert isinstance(ev, core.StreamEnded)
            ended = self.channels.get(ev.stream_id)
            if ended is not None:
                ended.peer_end()
            else:
                self.stream_ended_unbound(ev.stream_id)
        elif kind is core.StreamReset:
            assert isinstance(ev, core.StreamReset)
            reset = self.channels.get(ev.stream_id)
            if reset is not None:
                reset.peer_reset(ev.error_code, ev.remote)
            self.stream_reset(ev)
        elif kind is core.GoAway:
            assert isinstance(ev, core.GoAway)
            self.goaway_received(ev)
        elif kind is core.PingAcked:
            pass
        else:
            self.other_event(ev)

    def stream_ended_unbound(self, stream_id: int) -> None:
        """END_STREAM on a stream that has no channel (yet)."""

    def stream_reset(self, ev: core.StreamReset) -> None:
        """Hook: a stream was reset."""

    def goaway_received(self, ev: core.GoAway) -> None:
        if ev.error_code != ErrorCode.NO_ERROR:
            self.log.warning(
                "hbone: %s (%s) sent GOAWAY %s: %s",
                self.peer,
                self.peer_identity,
                code_name(ev.error_code),
                ev.reason or "no reason given",
            )

    def other_event(self, ev: core.Event) -> None:
        """Hook for request/response/settings events."""

    def channel_closed(self, channel: Channel) -> None:
        self.channels.pop(channel.stream_id, None)
        self.stream_finished(channel)

    def stream_finished(self, channel: Channel) -> None:
        """Hook: a channel is done."""

    # --------------------------------------------------------- lifecycle

    def _keepalive_tick(self) -> None:
        if self.closed or self.transport is None:
            return
        silent = self.loop.time() - self._last_received
        if silent >= self.config.ping_timeout_s:
            self._fail(f"peer silent for {silent:.0f}s (no frames, no PING ACK)", goaway=False)
            return
        self._ping_count += 1
        self.conn.ping(os.urandom(8))
        self.flush()
        self._keepalive = self.loop.call_later(self.config.ping_interval_s, self._keepalive_tick)

    def _fail(self, reason: str, *, goaway: bool = True) -> None:
        self.log.warning(
            "hbone: closing connection with %s (%s): %s", self.peer, self.peer_identity, reason
        )
        self.close_reason = reason
        self.closed = True
        if self.transport is not None:
            if goaway:
                self.flush()
                self.transport.close()  # after the GOAWAY already queued
            else:
                self.transport.abort()

    def goaway(self, reason: str = "") -> None:
        """Graceful: no new streams; existing ones finish."""
        if not self.closed:
            self.conn.goaway(ErrorCode.NO_ERROR, reason)
            self.flush()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.close_reason = self.close_reason or "closed by us"
            self.transport.close()

    def abort(self, reason: str) -> None:
        if self.transport is not None:
            self.close_reason = reason
            self.closed = True
            self.transport.abort()

    def info(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "peerIdentity": str(self.peer_identity) if self.peer_identity else None,
            "streams": len(self.channels),
            "pings": self._ping_count,
        }
