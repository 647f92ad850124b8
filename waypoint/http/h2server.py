"""The downstream end of HTTP/2 cleartext (prior knowledge): many requests on one connection.

Built on the ``h2`` state machine. Each stream is an :class:`H2Exchange`, the
same vocabulary as HTTP/1.1's :class:`~waypoint.http.h1server.ServerExchange`,
so the router serves both alike; trailers (gRPC's ``grpc-status``) go both
ways. Flow control: what a stream may not send yet waits in the exchange,
and is sent as the peer opens its window; a request body is acknowledged
(window given back) as the router reads it. A connection that breaks the
protocol gets GOAWAY; the others never notice. :class:`AutoServer` starts
as HTTP/1.1 and becomes HTTP/2 when the connection opens with the preface
(Envoy's ``codec_type: AUTO``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from waypoint.http.body import Body
from waypoint.http.h1server import DownstreamGone, Http1Server
from waypoint.http.messages import Headers, LocalReply, RequestHead, ResponseHead

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024


class H2Exchange:
    """One HTTP/2 stream: a request and its response."""

    def __init__(self, conn: H2Server, stream_id: int, head: RequestHead) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.head = head
        self.info = conn.info
        # The stream's window bounds what is buffered: it is given back as it is read.
        self.body = Body(consumed=lambda n: conn.consumed(stream_id, n))
        self.ended = False
        self.status = 0
        self.response_bytes = 0
        self.request_head_bytes = 0
        self.response_head_bytes = 0
        self._head_sent = False
        self._pending = bytearray()
        self._pending_end = False
        self._pending_trailers: Headers | None = None
        self.reset = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def protocol(self) -> str:
        return "HTTP/2"

    @property
    def head_sent(self) -> bool:
        return self._head_sent

    @property
    def closed(self) -> bool:
        return self._conn.lost or self.reset

    @property
    def write_paused(self) -> bool:
        return bool(self._pending) or self._conn.write_paused

    def informational(self, status: int, headers: Headers) -> None:
        pass  # 100-continue has no meaning in HTTP/2 here: the body simply flows

    def respond(self, head: ResponseHead, *, end: bool) -> None:
        if self._head_sent:
            raise RuntimeError("response head already sent")
        self._head_sent = True
        self.status = head.status
        headers = [(":status", str(head.status))]
        headers += [
            (k, v)
            for k, v in head.headers
            if k not in ("connection", "transfer-encoding", "keep-alive", "upgrade")
        ]
        self.response_head_bytes += hpack_size(headers)
        self._conn.send_headers(self, headers, end)
        if end:
            self._finish()

    def write(self, data: bytes, *, end: bool = False) -> None:
        if self.ended:
            return
        if data and self.head.method != "HEAD":
            self.response_bytes += len(data)
            self._pending += data
        if end:
            self._pending_end = True
        self._conn.flush_stream(self)

    def end(self, trailers: Headers | None = None) -> None:
        if self.ended:
            return
        if trailers:
            self._pending_trailers = list(trailers)
            self.response_head_bytes += hpack_size(trailers)
        self._pending_end = True
        self._conn.flush_stream(self)

    def local_reply(self, reply: LocalReply, extra: Sequence[tuple[str, str]] = ()) -> None:
        head = reply.head()
        head.headers.extend(extra)
        self.respond(head, end=not reply.body)
        if reply.body:
            self.write(reply.body, end=True)

    async def drain(self) -> None:
        while self.write_paused and not self.closed:
            await self._conn.wait_window()

    def abort(self) -> None:
        self._conn.reset_stream(self)

    def _finish(self) -> None:
        if not self.ended:
            self.ended = True
            if not self.done.done():
                self.done.set_result(None)
            self._conn.stream_done(self)


Handler = Callable[[Any], None]


class H2Server(asyncio.Protocol):
    """The server side of one HTTP/2 connection."""

    def __init__(self, handler: Handler, info: dict[str, Any] | None = None) -> None:
        self.handler = handler
        self.info = dict(info or {})
        self.transport: asyncio.Transport | None = None
        config = h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        self.conn = h2.connection.H2Connection(config=config)
        self.streams: dict[int, H2Exchange] = {}
        self.lost = False
        self.write_paused = False
        self.requests = 0
        self._window_waiters: list[asyncio.Future[None]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if "peer" not in self.info:  # as the HTTP/1.1 server: for logs and RBAC
            peer = transport.get_extra_info("peername")
            if peer:
                self.info["peer"] = f"{peer[0]}:{peer[1]}"
        self.conn.initiate_connection()
        self.conn.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
            }
        )
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.lost:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._flush()
            if self.transport is not None:
                self.transport.close()
            self.lost = True
            self._fail_all(DownstreamGone(f"the client broke HTTP/2: {e}"))
            return
        for event in events:
            self._event(event)
        self._flush()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event.stream_id, event.headers or [], event.stream_ended is not None)
        elif isinstance(event, h2.events.DataReceived):
            exchange = self.streams.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data or b"")
            if exchange is not None and event.data:
                exchange.body.push(bytes(event.data))
                if padding:
                    self.consumed(event.stream_id, padding)
            elif event.flow_controlled_length:
                self.consumed(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, h2.events.TrailersReceived):
            exchange = self.streams.get(event.stream_id)
            if exchange is not None:
                trailers = _pairs(event.headers or [])
                exchange.request_head_bytes += hpack_size(trailers)
                exchange.body.finish(trailers)
        elif isinstance(event, h2.events.StreamEnded):
            exchange = self.streams.get(event.stream_id)
            if exchange is not None:
                exchange.body.finish(exchange.body.trailers)
        elif isinstance(event, h2.events.StreamReset):
            exchange = self.streams.pop(event.stream_id, None)
            if exchange is not None:
                exchange.reset = True
                exchange.body.fail(DownstreamGone("the client reset the stream"))
                if not exchange.done.done():
                    exchange.done.set_exception(DownstreamGone("the client reset the stream"))
                    exchange.done.exception()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for exchange in list(self.streams.values()):
                    self.flush_stream(exchange)
            elif (exchange := self.streams.get(event.stream_id)) is not None:
                self.flush_stream(exchange)
            self._wake_window()
        elif isinstance(event, h2.events.ConnectionTerminated) and self.transport is not None:
            self.transport.close()

    def _request(self, stream_id: int, raw: Sequence[tuple[Any, Any]], ended: bool) -> None:
        pseudo: dict[str, str] = {}
        headers: Headers = []
        pairs = _pairs(raw)
        for k, v in pairs:
            if k.startswith(":"):
                pseudo[k] = v
            elif k == "host":
                pseudo.setdefault(":authority", v)
            else:
                headers.append((k, v))
        head = RequestHead(
            method=pseudo.get(":method", "GET"),
            target=pseudo.get(":path", "/"),
            authority=pseudo.get(":authority", self.info.get("authority", "")),
            scheme=pseudo.get(":scheme", "http"),
            version="2",
            headers=headers,
        )
        exchange = H2Exchange(self, stream_id, head)
        exchange.request_head_bytes = hpack_size(pairs)
        if ended:
            exchange.body.finish()
        self.streams[stream_id] = exchange
        self.requests += 1
        try:
            self.handler(exchange)
        except Exception:
            if not exchange.head_sent:
                exchange.local_reply(LocalReply(500, b"internal error in the waypoint"))
            raise

    def consumed(self, stream_id: int, n: int) -> None:
        """The router read ``n`` bytes of a request body: the peer may send as much more."""
        if self.lost or n <= 0:
            return
        with contextlib.suppress(
            h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError
        ):
            self.conn.acknowledge_received_data(n, stream_id)
        self._flush()

    # ------------------------------------------------------------ sending

    def send_headers(self, exchange: H2Exchange, headers: Headers, end: bool) -> None:
        if self.lost or exchange.reset:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.send_headers(exchange.stream_id, headers, end_stream=end)
        self._flush()

    def flush_stream(self, exchange: H2Exchange) -> None:
        """Send what the windows allow of ``exchange``'s waiting body (and its end)."""
        if self.lost or exchange.reset or exchange.ended:
            return
        sid = exchange.stream_id
        try:
            while exchange._pending:
                window = min(
                    self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
                )
                if window <= 0:
                    break
                chunk = bytes(exchange._pending[:window])
                del exchange._pending[:window]
                last = (
                    not exchange._pending
                    and exchange._pending_end
                    and not exchange._pending_trailers
                )
                self.conn.send_data(sid, chunk, end_stream=last)
                if last:
                    exchange._finish()
            if not exchange._pending and exchange._pending_end and not exchange.ended:
                if exchange._pending_trailers:
                    self.conn.send_headers(sid, exchange._pending_trailers, end_stream=True)
                else:
                    self.conn.end_stream(sid)
                exchange._finish()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            exchange.reset = True
        self._flush()

    def reset_stream(self, exchange: H2Exchange) -> None:
        if not exchange.reset and not self.lost:
            exchange.reset = True
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.conn.reset_stream(exchange.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self._flush()
        self.streams.pop(exchange.stream_id, None)

    def stream_done(self, exchange: H2Exchange) -> None:
        self.streams.pop(exchange.stream_id, None)

    async def wait_window(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._window_waiters.append(waiter)
        await waiter

    def _wake_window(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_window()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_all(DownstreamGone("the client went away"))
        self._wake_window()

    def _fail_all(self, error: Exception) -> None:
        for exchange in list(self.streams.values()):
            exchange.body.fail(error)
            if not exchange.done.done():
                exchange.done.set_exception(error)
                exchange.done.exception()
        self.streams.clear()


def hpack_size(headers: Headers) -> int:
    """A header list's size as HPACK accounts it (RFC 7541 section 4.1: name, value and
    32 per field): an estimate of its wire size, which the compression makes smaller."""
    return sum(len(k) + len(v) for k, v in headers) + 32 * len(headers)


def _pairs(raw: Sequence[tuple[Any, Any]]) -> Headers:
    out: Headers = []
    for k, v in raw:
        key = k.decode("latin-1") if isinstance(k, bytes) else str(k)
        value = v.decode("latin-1") if isinstance(v, bytes) else str(v)
        out.append((key.lower(), value))
    return out


class AutoServer(asyncio.Protocol):
    """HTTP/1.1 or HTTP/2 by the connection's first bytes (Envoy's ``codec_type: AUTO``)."""

    def __init__(self, handler: Handler, info: dict[str, Any] | None = None) -> None:
        self.handler = handler
        self.info = info
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.BaseTransport | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
            return
        self._head += data
        if len(self._head) < len(PREFACE) and PREFACE.startswith(self._head):
            return  # could still be the preface
        inner: asyncio.Protocol
        if self._head.startswith(PREFACE):
            inner = H2Server(self.handler, self.info)
        else:
            inner = Http1Server(self.handler, self.info)
        self.inner = inner
        assert self.transport is not None
        inner.connection_made(self.transport)
        head, self._head = self._head, b""
        inner.data_received(head)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
