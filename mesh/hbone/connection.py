"""The sans-I/O HTTP/2 core of an HBONE connection: bytes in, events and bytes out.

``h2`` does what it does well: the preface, SETTINGS, HEADERS and HPACK,
RST_STREAM, PING, GOAWAY and the stream state machine. DATA and
WINDOW_UPDATE frames, which carry every tunnelled byte, leave it: measured
on this project's machines, relaying through ``h2`` per DATA frame ran at
about a sixth of Envoy's single-stream throughput, because of its per-frame
object work (it even builds ``repr()`` of each frame's payload for a trace
log). Here a DATA payload is handed to the stream as it arrives, in slices
of the received buffer (no reassembly copy, not even for a 1 MiB frame split
over many TLS records), and outgoing DATA is a 9-byte header in front of the
caller's bytes.

The fast path is still a conforming endpoint: inbound stream and connection
windows are enforced (FLOW_CONTROL_ERROR), frame sizes checked
(FRAME_SIZE_ERROR), WINDOW_UPDATE validated, DATA on idle or closed streams
handed to ``h2`` (as an empty frame) so it answers with the error the RFC
asks for, and the end of a stream goes through ``h2`` so its stream states
stay right. Because ``h2`` never sees DATA or WINDOW_UPDATE, its own windows
stay untouched and never disagree with ours.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from mesh.hbone.settings import Http2Settings

# Frame types and flags (RFC 9113 section 6).
DATA = 0x0
HEADERS = 0x1
PUSH_PROMISE = 0x5
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9
FLAG_END_STREAM = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
_HEADER = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_WINDOW_UPDATE = struct.Struct(">IBII")
_PREFACE_LEN = 24


# --------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Event:
    """Base of what the connection reports."""


@dataclass(frozen=True, slots=True)
class RequestReceived(Event):
    stream_id: int
    headers: list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class ResponseReceived(Event):
    stream_id: int
    status: int
    headers: list[tuple[bytes, bytes]]
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Tunnelled bytes; ``data`` is a slice of the received buffer, valid until consumed."""

    stream_id: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer will send no more on this stream (END_STREAM: a TCP FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class WindowOpened(Event):
    """More may be sent: on ``stream_id``, or on every stream when it is 0."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class SettingsChanged(Event):
    max_concurrent_streams: int | None


@dataclass(frozen=True, slots=True)
class PingAcked(Event):
    data: bytes


@dataclass(frozen=True, slots=True)
class GoAway(Event):
    """The connection is ending: GOAWAY received (``remote``) or sent by us."""

    error_code: int
    last_stream_id: int
    reason: str
    remote: bool


# -------------------------------------------------------------------- streams


@dataclass(slots=True)
class _Stream:
    stream_id: int
    send_window: int
    recv_window: int
    recv_open: bool = True
    send_open: bool = True
    response_received: bool = False
    # Received bytes the consumer has released but we have not yet announced.
    recv_released: int = 0


@dataclass(slots=True)
class _DataFrame:
    """A DATA frame whose payload is still arriving."""

    stream: _Stream | None  # None: payload is discarded (stream gone or refused)
    stream_id: int
    remaining: int  # payload bytes still to come, padding included
    flags: int
    pad_length: int = -1  # -1: not read yet (PADDED frames only)
    discarded: int = 0  # bytes dropped, to give back to the connection window


@dataclass(slots=True)
class Stats:
    frames_received: int = 0
    frames_sent: int = 0
    data_bytes_received: int = 0
    data_bytes_sent: int = 0
    streams_opened: int = 0


# ----------------------------------------------------------------- connection


class TunnelConnection:
    """One HTTP/2 connection carrying CONNECT tunnels, client or server side."""

    def __init__(self, *, client_side: bool, settings: Http2Settings) -> None:
        self.client_side = client_side
        self.settings = settings
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            validate_outbound_headers=True,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        values = {
            SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
            SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
            SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
        }
        if client_side:
            values[SettingCodes.ENABLE_PUSH] = 0
        self._h2.local_settings = h2.settings.Settings(client=client_side, initial_values=values)
        self._h2.max_inbound_frame_size = settings.max_frame_size
        self._streams: dict[int, _Stream] = {}
        self._out: list[bytes | memoryview] = []
        self._buf = bytearray()
        self._frame: _DataFrame | None = None
        self._control: tuple[int, int, int, int] | None = None
        self._preface_left = 0 if client_side else _PREFACE_LEN
        self._expect_continuation = False
        self._highest_remote_stream = 0
        self.send_window = DEFAULT_WINDOW  # connection-level, toward the peer
        self.recv_window = DEFAULT_WINDOW  # connection-level, from the peer
        self._conn_released = 0
        self.peer_max_frame_size = 16384
        self.peer_initial_window = DEFAULT_WINDOW
        self.closed = False
        self.goaway_received = False
        self.stats = Stats()

    # ------------------------------------------------------------ lifecycle

    def initiate(self) -> None:
        """Queue the preface, our SETTINGS and the connection window increase."""
        self._h2.initiate_connection()
        self._pull_h2()
        increment = self.settings.connection_window - DEFAULT_WINDOW
        if increment > 0:
            self._out.append(_WINDOW_UPDATE.pack((4 << 8) | WINDOW_UPDATE, 0, 0, increment))
            self.recv_window += increment

    def take_output(self) -> list[bytes | memoryview]:
        """Everything queued for the peer, in order; the caller writes it."""
        out, self._out = self._out, []
        return out

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def peer_max_concurrent_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    def stream_send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return min(stream.send_window, self.send_window)

    def stream_exists(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # -------------------------------------------------------------- sending

    def open_stream(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Client: send a CONNECT for ``authority``; return the new stream id."""
        stream_id = self._h2.get_next_available_stream_id()
        fields = [(b":method", b"CONNECT"), (b":authority", authority.encode())]
        fields += [(k.encode(), v.encode()) for k, v in headers]
        self._h2.send_headers(stream_id, fields, end_stream=False)
        self._pull_h2()
        self._streams[stream_id] = _Stream(
            stream_id=stream_id,
            send_window=self.peer_initial_window,
            recv_window=self.settings.stream_window,
        )
        self.stats.streams_opened += 1
        return stream_id

    def respond(self, stream_id: int, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Server: answer a CONNECT. Anything but 200 ends the stream."""
        if stream_id not in self._streams:
            return  # reset by the peer meanwhile: nobody to answer
        fields = [(b":status", str(status).encode())]
        fields += [(k.encode(), v.encode()) for k, v in headers]
        final = status != 200
        self._h2.send_headers(stream_id, fields, end_stream=final)
        if final:
            # RFC 9113 8.1: a complete response may be followed by RST_STREAM
            # NO_ERROR, telling the client to stop sending without error
            # (unless the client had already ended its side).
            stream = self._streams.pop(stream_id)
            if stream.recv_open:
                self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        self._pull_h2()

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the windows allow; return how much was taken."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.send_open:
            return 0
        allowed = min(len(data), stream.send_window, self.send_window)
        if allowed <= 0:
            return 0
        view = data if isinstance(data, memoryview) else memoryview(data)
        max_frame = self.peer_max_frame_size
        out = self._out
        pos = 0
        while pos < allowed:
            n = min(max_frame, allowed - pos)
            out.append(_HEADER.pack((n << 8) | DATA, 0, stream_id))
            out.append(view[pos : pos + n] if n != len(view) else data)
            pos += n
            self.stats.frames_sent += 1
        stream.send_window -= allowed
        self.send_window -= allowed
        self.stats.data_bytes_sent += allowed
        return allowed

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (a TCP FIN): an empty DATA frame with END_STREAM."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.send_open:
            return
        stream.send_open = False
        self._h2.end_stream(stream_id)
        self._pull_h2()
        self._forget_if_done(stream)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        if self._streams.pop(stream_id, None) is None:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            return
        self._pull_h2()

    def release(self, stream_id: int, n: int) -> None:
        """The consumer is done with ``n`` received bytes: give the peer window back.

        Updates are sent once a quarter of the window is free, to keep the
        number of WINDOW_UPDATE frames low without ever stalling the sender.
        """
        if n <= 0:
            return
        self._conn_released += n
        if self._conn_released >= self.settings.connection_window // 4:
            self._window_update(0, self._conn_released)
            self.recv_window += self._conn_released
            self._conn_released = 0
        stream = self._streams.get(stream_id)
        if stream is None or not stream.recv_open:
            return
        stream.recv_released += n
        if stream.recv_released >= self.settings.stream_window // 4:
            self._window_update(stream_id, stream.recv_released)
            stream.recv_window += stream.recv_released
            stream.recv_released = 0

    def ping(self, opaque: bytes) -> None:
        self._h2.ping(opaque)
        self._pull_h2()

    def goaway(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY; no new streams are accepted after it."""
        if self.closed:
            return
        self._h2.close_connection(error_code=error_code, additional_data=reason.encode() or None)
        self._pull_h2()
        if error_code != ErrorCodes.NO_ERROR:
            self.closed = True

    # ------------------------------------------------------------ receiving

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Process bytes from the peer; return what happened, in order.

        Raises :class:`mesh.hbone.errors.ProtocolViolation` after queueing a
        GOAWAY when the peer broke the protocol; the caller flushes the output
        and closes.
        """
        if self.closed:
            return []
        events: list[Event] = []
        view = memoryview(data)
        pos = 0
        end = len(view)
        if self._preface_left:
            take = min(self._preface_left, end)
            self._feed_h2(bytes(view[:take]), events)
            self._preface_left -= take
            pos = take
        buf = self._buf
        while pos < end:
            if self._frame is not None:
                pos = self._data_payload(self._frame, view, pos, end, events)
                continue
            if self._control is None:
                # A new frame: its 9-byte header, possibly split across reads.
                if buf:
                    take = min(9 - len(buf), end - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < 9:
                        break
                    header = bytes(buf)
                    buf.clear()
                elif end - pos < 9:
                    buf += view[pos:end]
                    break
                else:
                    header = bytes(view[pos : pos + 9])
                    pos += 9
                word, flags, stream_id = _HEADER.unpack(header)
                length = word >> 8
                kind = word & 0xFF
                stream_id &= 0x7FFFFFFF
                self.stats.frames_received += 1
                if length > self.settings.max_frame_size:
                    self._fail(
                        ErrorCodes.FRAME_SIZE_ERROR,
                        f"frame of {length} bytes exceeds our SETTINGS_MAX_FRAME_SIZE "
                        f"{self.settings.max_frame_size}",
                    )
                if kind == DATA and not self._expect_continuation:
                    self._start_data(length, flags, stream_id, events)
                    continue
                # Any other frame is buffered whole, then handled.
                self._control = (length, kind, flags, stream_id)
                buf += header
            length, kind, flags, stream_id = self._control
            need = 9 + length - len(buf)
            take = min(need, end - pos)
            if take:
                buf += view[pos : pos + take]
                pos += take
            if take < need:
                break
            whole = bytes(buf)
            buf.clear()
            self._control = None
            if kind == WINDOW_UPDATE and not self._expect_continuation:
                self._window_update_received(whole, stream_id, events)
            else:
                self._expect_continuation = kind in (
                    HEADERS,
                    PUSH_PROMISE,
                    CONTINUATION,
                ) and not (flags & FLAG_END_HEADERS)
                self._feed_h2(whole, events)
            if self.closed:
                break
        return events

    # ----------------------------------------------------------- internals

    def _start_data(self, length: int, flags: int, stream_id: int, events: list[Event]) -> None:
        if length > self.recv_window:
            self._fail(
                ErrorCodes.FLOW_CONTROL_ERROR,
                f"DATA of {length} bytes exceeds the connection window {self.recv_window}",
            )
        if flags & FLAG_PADDED and length == 0:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "PADDED DATA frame without a pad length")
        self.recv_window -= length
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.recv_open:
            stream = None
        if stream is None:
            # Idle, closed or half-closed stream, or stream 0: h2 answers an
            # empty copy with the error the RFC asks for (a GOAWAY, or a
            # RST_STREAM for a stream it reset); the payload is dropped.
            self._feed_h2(_HEADER.pack(DATA, flags & FLAG_END_STREAM, stream_id), events)
            flags &= ~FLAG_END_STREAM
        elif self.client_side and not stream.response_received:
            self._fail(ErrorCodes.PROTOCOL_ERROR, f"DATA before the response on stream {stream_id}")
        elif length > stream.recv_window:
            # A stream error: reset this stream, the connection goes on.
            self.reset_stream(stream_id, ErrorCodes.FLOW_CONTROL_ERROR)
            events.append(StreamReset(stream_id, ErrorCodes.FLOW_CONTROL_ERROR, remote=False))
            stream = None
            flags &= ~FLAG_END_STREAM
        else:
            stream.recv_window -= length
        frame = _DataFrame(
            stream=stream,
            stream_id=stream_id,
            remaining=length,
            flags=flags,
            pad_length=-1 if flags & FLAG_PADDED else 0,
        )
        self._frame = frame
        if length == 0:
            self._finish_data(frame, events)

    def _stream_is_gone(self, stream_id: int) -> bool:
        """True for a stream that existed and is closed (not idle, not 0)."""
        if stream_id == 0:
            return False
        ours = (stream_id % 2 == 1) == self.client_side
        if ours:
            return stream_id < self._h2.highest_outbound_stream_id + 1
        return stream_id <= self._h2.highest_inbound_stream_id

    def _data_payload(
        self, frame: _DataFrame, view: memoryview, pos: int, end: int, events: list[Event]
    ) -> int:
        if frame.pad_length < 0:
            if pos >= end:
                return pos
            frame.pad_length = view[pos]
            pos += 1
            frame.remaining -= 1
            frame.discarded += 1
            if frame.pad_length > frame.remaining:
                self._fail(ErrorCodes.PROTOCOL_ERROR, "DATA padding longer than the payload")
        take = min(frame.remaining, end - pos)
        payload = take
        # The trailing pad_length bytes of the frame are padding, not data.
        pad_in_chunk = max(0, frame.pad_length - (frame.remaining - take))
        payload -= pad_in_chunk
        if payload > 0:
            if frame.stream is not None:
                events.append(DataReceived(frame.stream_id, view[pos : pos + payload]))
                self.stats.data_bytes_received += payload
            else:
                frame.discarded += payload
        frame.discarded += pad_in_chunk
        frame.remaining -= take
        pos += take
        if frame.remaining == 0:
            self._finish_data(frame, events)
        return pos

    def _finish_data(self, frame: _DataFrame, events: list[Event]) -> None:
        self._frame = None
        if frame.discarded:
            # Padding and discarded payload are nobody's to release: give it back now.
            self.release(frame.stream_id if frame.stream is not None else 0, frame.discarded)
        if frame.flags & FLAG_END_STREAM:
            # Let h2 see the end of the stream, so its state machine closes it.
            self._feed_h2(_HEADER.pack(DATA, FLAG_END_STREAM, frame.stream_id), events)

    def _window_update_received(self, whole: bytes, stream_id: int, events: list[Event]) -> None:
        if len(whole) != 13:
            self._fail(
                ErrorCodes.FRAME_SIZE_ERROR, f"WINDOW_UPDATE with {len(whole) - 9} payload bytes"
            )
        increment = struct.unpack_from(">I", whole, 9)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                self._fail(ErrorCodes.PROTOCOL_ERROR, "connection WINDOW_UPDATE of 0")
            if self.send_window + increment > MAX_WINDOW:
                self._fail(ErrorCodes.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self.send_window += increment
            events.append(WindowOpened(0))
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if not self._stream_is_gone(stream_id):
                self._fail(ErrorCodes.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return  # a late update for a closed stream is allowed
        if increment == 0 or stream.send_window + increment > MAX_WINDOW:
            code = ErrorCodes.PROTOCOL_ERROR if increment == 0 else ErrorCodes.FLOW_CONTROL_ERROR
            self.reset_stream(stream_id, code)
            events.append(StreamReset(stream_id, code, remote=False))
            return
        stream.send_window += increment
        events.append(WindowOpened(stream_id))

    def _window_update(self, stream_id: int, increment: int) -> None:
        self._out.append(_WINDOW_UPDATE.pack((4 << 8) | WINDOW_UPDATE, 0, stream_id, increment))

    def _fail(self, code: int, reason: str) -> None:
        from mesh.hbone.errors import ProtocolViolation

        self._h2.close_connection(error_code=code, additional_data=reason.encode())
        self._pull_h2()
        self.closed = True
        raise ProtocolViolation(code, reason)

    def _pull_h2(self) -> None:
        data = self._h2.data_to_send()
        if data:
            self._out.append(data)

    def _feed_h2(self, data: bytes, events: list[Event]) -> None:
        from mesh.hbone.errors import ProtocolViolation

        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # h2 has queued a GOAWAY with the right code already.
            self._pull_h2()
            self.closed = True
            raise ProtocolViolation(int(e.error_code), str(e)) from e
        self._pull_h2()
        self._convert(h2_events, events)
        self._pull_h2()

    def _convert(self, h2_events: Iterable[h2.events.Event], events: list[Event]) -> None:
        for ev in h2_events:
            if isinstance(ev, h2.events.RequestReceived):
                assert ev.stream_id is not None and ev.headers is not None
                self._streams[ev.stream_id] = _Stream(
                    stream_id=ev.stream_id,
                    send_window=self.peer_initial_window,
                    recv_window=self.settings.stream_window,
                )
                self.stats.streams_opened += 1
                events.append(RequestReceived(ev.stream_id, _as_bytes(ev.headers)))
                if ev.stream_ended:
                    self._stream_ended(ev.stream_id, events)
            elif isinstance(ev, h2.events.ResponseReceived):
                assert ev.stream_id is not None and ev.headers is not None
                stream = self._streams.get(ev.stream_id)
                if stream is not None:
                    stream.response_received = True
                headers = _as_bytes(ev.headers)
                status = _status(headers)
                events.append(
                    ResponseReceived(ev.stream_id, status, headers, ev.stream_ended is not None)
                )
                if ev.stream_ended:
                    self._stream_ended(ev.stream_id, events)
            elif isinstance(ev, h2.events.StreamEnded):
                assert ev.stream_id is not None
                self._stream_ended(ev.stream_id, events)
            elif isinstance(ev, h2.events.StreamReset):
                assert ev.stream_id is not None
                self._streams.pop(ev.stream_id, None)
                events.append(StreamReset(ev.stream_id, int(ev.error_code or 0), ev.remote_reset))
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                self._settings_changed(ev, events)
            elif isinstance(ev, h2.events.PingAckReceived):
                events.append(PingAcked(bytes(ev.ping_data or b"")))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway_received = True
                events.append(
                    GoAway(
                        int(ev.error_code or 0),
                        int(ev.last_stream_id or 0),
                        (ev.additional_data or b"").decode(errors="replace"),
                        remote=True,
                    )
                )
            elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_ended:
                assert ev.stream_id is not None
                self._stream_ended(ev.stream_id, events)
            # DataReceived (only our empty END_STREAM copies), WindowUpdated
            # (never fed), SettingsAcknowledged, PingReceived (h2 answers it),
            # PriorityUpdated and unknown frames need nothing from us.

    def _stream_ended(self, stream_id: int, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or not stream.recv_open:
            return
        stream.recv_open = False
        events.append(StreamEnded(stream_id))
        self._forget_if_done(stream)

    def _forget_if_done(self, stream: _Stream) -> None:
        if not stream.recv_open and not stream.send_open:
            self._streams.pop(stream.stream_id, None)

    def _settings_changed(self, ev: h2.events.RemoteSettingsChanged, events: list[Event]) -> None:
        changed = ev.changed_settings
        window = changed.get(SettingCodes.INITIAL_WINDOW_SIZE)
        if window is not None:
            delta = window.new_value - self.peer_initial_window
            self.peer_initial_window = window.new_value
            for stream in self._streams.values():
                stream.send_window += delta
            if delta > 0:
                events.append(WindowOpened(0))
        frame = changed.get(SettingCodes.MAX_FRAME_SIZE)
        if frame is not None:
            self.peer_max_frame_size = frame.new_value
        streams = changed.get(SettingCodes.MAX_CONCURRENT_STREAMS)
        events.append(SettingsChanged(None if streams is None else streams.new_value))


def _as_bytes(headers: Iterable[tuple[bytes | str, bytes | str]]) -> list[tuple[bytes, bytes]]:
    return [
        (k if isinstance(k, bytes) else k.encode(), v if isinstance(v, bytes) else v.encode())
        for k, v in headers
    ]


def _status(headers: Sequence[tuple[bytes, bytes]]) -> int:
    for k, v in headers:
        if k == b":status":
            try:
                return int(v)
            except ValueError:
                return 0
    return 0
