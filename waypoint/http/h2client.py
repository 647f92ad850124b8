"""The upstream end of HTTP/2 cleartext (h2c, gRPC): many requests on one connection.

A :class:`H2ClientConnection` is one connection to an endpoint (over HBONE
or TCP); each request is an :class:`H2Stream` on it, with the interface of an
HTTP/1.1 upstream connection (``send``, ``data``, ``end``, ``abort``), so the
router does not know which it has. Responses, informational answers,
trailers and resets come back as calls on the stream's attempt. A stream the
peer refuses (``REFUSED_STREAM``) is reported as such (a retriable reset), a
GOAWAY fails the streams it did not take, and the connection is not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from waypoint.http.messages import Headers, RequestHead, ResponseHead

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
_SKIP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"}
)


class H2Stream:
    """One request on a shared HTTP/2 connection."""

    def __init__(self, conn: H2ClientConnection) -> None:
        self.conn = conn
        self.stream_id = 0
        self.attempt: Any = None
        self.requests = 0
        self._pending = bytearray()
        self._pending_end = False
        self.ended = False
        self.closed = False
        self._trailers: Headers | None = None

    @property
    def lost(self) -> bool:
        return self.conn.lost or self.closed

    def send(self, head: RequestHead, attempt: Any, *, has_body: bool, length: int | None) -> None:
        self.attempt = attempt
        self.requests += 1
        headers = [
            (":method", head.method),
            (":scheme", head.scheme or "http"),
            (":authority", head.authority),
            (":path", head.target),
        ]
        headers += [(k, v) for k, v in head.headers if k not in _SKIP]
        if length is not None and not any(k == "content-length" for k, _ in headers):
            headers.append(("content-length", str(length)))
        self.stream_id = self.conn.start(self, headers, end=not has_body)
        if not has_body:
            self.ended = True

    def data(self, data: bytes) -> None:
        if data and not self.lost:
            self._pending += data
            self.conn.flush_stream(self)

    def end(self) -> None:
        if not self.ended:
            self._pending_end = True
            self.conn.flush_stream(self)

    def raw_end(self) -> None:
        self.end()

    async def drain(self) -> None:
        while self._pending and not self.lost:
            await self.conn.wait_window()

    def abort(self) -> None:
        self.attempt = None
        self.conn.reset(self)

    def pause_reading(self) -> None:
        self.conn.hold(self, True)

    def resume_reading(self) -> None:
        self.conn.hold(self, False)


class H2ClientConnection(asyncio.Protocol):
    """One upstream HTTP/2 connection; streams open on it until its limit."""

    def __init__(
        self,
        on_idle: Callable[[H2ClientConnection], None] | None = None,
        on_lost: Callable[[H2ClientConnection], None] | None = None,
    ) -> None:
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        config = h2.config.H2Configuration(client_side=True, header_encoding="latin-1")
        self.conn = h2.connection.H2Connection(config=config)
        self.streams: dict[int, H2Stream] = {}
        self.lost = False
        self.goaway = False
        self.on_idle = on_idle
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._window_waiters: list[asyncio.Future[None]] = []
        self._held: dict[int, int] = {}  # stream -> bytes not yet acknowledged (reader paused)
        self.write_paused = False

    # ---------------------------------------------------------- capacity

    @property
    def usable(self) -> bool:
        return not (self.lost or self.goaway) and len(self.streams) < min(
            100, self.conn.remote_settings.max_concurrent_streams
        )

    def stream(self) -> H2Stream:
        return H2Stream(self)

    # ---------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
        if not self.connected.done():
            self.connected.set_result(None)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.lost:
            self.transport.write(data)

    def start(self, stream: H2Stream, headers: Headers, *, end: bool) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = stream
        self.conn.send_headers(sid, headers, end_stream=end)
        self._flush()
        return sid

    def flush_stream(self, stream: H2Stream) -> None:
        sid = stream.stream_id
        if self.lost or stream.closed or sid not in self.streams:
            return
        try:
            while stream._pending:
                window = min(
                    self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
                )
                if window <= 0:
                    break
                chunk = bytes(stream._pending[:window])
                del stream._pending[:window]
                last = not stream._pending and stream._pending_end
                self.conn.send_data(sid, chunk, end_stream=last)
                if last:
                    stream.ended = True
            if not stream._pending and stream._pending_end and not stream.ended:
                self.conn.end_stream(sid)
                stream.ended = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            stream.closed = True
        self._flush()

    def reset(self, stream: H2Stream) -> None:
        sid = stream.stream_id
        if sid in self.streams and not self.lost:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            self._flush()
        self._gone(stream)

    def hold(self, stream: H2Stream, paused: bool) -> None:
        if paused:
            self._held.setdefault(stream.stream_id, 0)
        else:
            n = self._held.pop(stream.stream_id, 0)
            if n:
                self._ack(stream.stream_id, n)

    def _ack(self, sid: int, n: int) -> None:
        with contextlib.suppress(
            h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError
        ):
            self.conn.acknowledge_received_data(n, sid)
        self._flush()

    def _gone(self, stream: H2Stream) -> None:
        stream.closed = True
        self.streams.pop(stream.stream_id, None)
        self._held.pop(stream.stream_id, None)
        if not self.streams and self.on_idle is not None:
            self.on_idle(self)

    async def wait_window(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._window_waiters.append(waiter)
        await waiter

    def _wake(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # ---------------------------------------------------------- events

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self._fail_all("protocol error")
            if self.transport is not None:
                self.transport.abort()
            return
        for event in events:
            self._event(event)
        self._flush()

    def _event(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", 0)
        stream = self.streams.get(sid) if sid else None
        attempt = stream.attempt if stream is not None else None
        if isinstance(event, h2.events.InformationalResponseReceived):
            if attempt is not None:
                status, headers = _split(event.headers or [])
                attempt.on_informational(status, headers)
        elif isinstance(event, h2.events.ResponseReceived):
            if attempt is not None:
                status, headers = _split(event.headers or [])
                attempt.on_response(ResponseHead(status=status, headers=headers))
        elif isinstance(event, h2.events.DataReceived):
            n = event.flow_controlled_length
            if stream is not None and sid in self._held:
                self._held[sid] += n
            elif n:
                self._ack(sid, n)
            if attempt is not None and event.data:
                attempt.on_data(bytes(event.data))
        elif isinstance(event, h2.events.TrailersReceived):
            if stream is not None:
                stream._trailers = _split(event.headers or [], status=False)[1]
        elif isinstance(event, h2.events.StreamEnded):
            if stream is not None:
                trailers = stream._trailers
                self._gone(stream)
                if attempt is not None:
                    attempt.on_end(trailers)
        elif isinstance(event, h2.events.StreamReset):
            if stream is not None:
                self._gone(stream)
                if attempt is not None:
                    refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    attempt.on_reset(
                        "remote refused stream reset" if refused else "remote reset", True
                    )
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for s in list(self.streams.values()):
                    self.flush_stream(s)
            elif stream is not None:
                self.flush_stream(stream)
            self._wake()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            last = event.last_stream_id or 0
            for s in [s for i, s in list(self.streams.items()) if i > last]:
                self._gone(s)
                if s.attempt is not None:
                    s.attempt.on_reset("remote refused stream reset", False)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed before connecting"))
            self.connected.exception()
        self._fail_all("connection termination" if exc is None else "remote reset")
        self._wake()
        if self.on_lost is not None:
            self.on_lost(self)

    def _fail_all(self, reason: str) -> None:
        for stream in list(self.streams.values()):
            attempt = stream.attempt
            self._gone(stream)
            if attempt is not None:
                attempt.on_reset(reason, True)

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            with contextlib.suppress(Exception):
                self.conn.close_connection()
                self._flush()
            self.transport.close()


def _split(raw: Any, status: bool = True) -> tuple[int, Headers]:
    code = 0
    headers: Headers = []
    for k, v in raw:
        key = k.decode("latin-1") if isinstance(k, bytes) else str(k)
        value = v.decode("latin-1") if isinstance(v, bytes) else str(v)
        if key == ":status":
            code = int(value)
        elif not key.startswith(":"):
            headers.append((key.lower(), value))
    return code, headers
