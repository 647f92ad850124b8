"""The downstream end of HTTP/1.1: requests in (httptools), responses out.

One :class:`Http1Server` per connection (a TCP socket or an HBONE stream).
Each request becomes a :class:`ServerExchange` handed to the handler as soon
as its head is parsed; its body streams in while the handler works. Requests
pipelined behind it wait their turn (responses go out in order) with reading
paused. Responses are framed as HTTP/1.1 wants: the sender's
``content-length`` kept, else chunked, else (HTTP/1.0) close-delimited.
An upgrade (WebSocket) that the upstream accepts with 101 turns the
connection into a byte relay. Malformed requests get 400 and the
connection is closed; nothing else on the waypoint notices.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import httptools

from waypoint.http.body import Body
from waypoint.http.messages import (
    Headers,
    LocalReply,
    RequestHead,
    ResponseHead,
    body_forbidden,
    reason_phrase,
)

MAX_HEADER_BYTES = 60 * 1024  # Envoy's default limit on request headers


class DownstreamGone(Exception):
    """The client went away (or reset) before the response was done."""


class ServerExchange:
    """One request and its response, as the router sees it, whatever the codec."""

    __slots__ = (
        "_chunked",
        "_close_after",
        "_conn",
        "_head_sent",
        "body",
        "done",
        "ended",
        "head",
        "info",
        "request_head_bytes",
        "response_bytes",
        "response_head_bytes",
        "status",
        "upgraded",
    )

    def __init__(
        self, conn: Http1Server, head: RequestHead, info: dict[str, Any], head_bytes: int = 0
    ) -> None:
        self._conn = conn
        self.head = head
        self.info = info
        self.body = Body(pause=conn.pause_reading, resume=conn.resume_reading)
        self._head_sent = False
        self._chunked = False
        self._close_after = False
        self.ended = False
        self.status = 0
        self.response_bytes = 0
        self.request_head_bytes = head_bytes
        self.response_head_bytes = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.upgraded = False  # after 101: the body and the response are raw bytes

    @property
    def protocol(self) -> str:
        return "HTTP/1.1" if self.head.version == "1.1" else "HTTP/1.0"

    @property
    def head_sent(self) -> bool:
        return self._head_sent

    @property
    def closed(self) -> bool:
        return self._conn.lost

    @property
    def write_paused(self) -> bool:
        return self._conn.write_paused

    def informational(self, status: int, headers: Headers) -> None:
        if self._head_sent or self.head.version == "1.0" or self.closed:
            return
        lines = [f"HTTP/1.1 {status} {reason_phrase(status)}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        data = ("".join(lines) + "\r\n").encode("latin-1")
        self.response_head_bytes += len(data)
        self._conn.write(data)

    def respond(self, head: ResponseHead, *, end: bool) -> None:
        if self._head_sent:
            raise RuntimeError("response head already sent")
        self._head_sent = True
        self.status = head.status
        conn = self._conn
        headers = [(k, v) for k, v in head.headers if k not in ("connection", "transfer-encoding")]
        upgraded = head.status == 101 and self.head.upgrade is not None
        if upgraded:
            protocol = head.get("upgrade") or self.head.upgrade or ""
            headers = [(k, v) for k, v in headers if k != "upgrade"]
            headers += [("connection", "upgrade"), ("upgrade", protocol)]
        elif body_forbidden(self.head.method, head.status) or any(
            k == "content-length" for k, _ in headers
        ):
            pass
        elif end:
            headers.append(("content-length", "0"))
        elif self.head.version == "1.1":
            headers.append(("transfer-encoding", "chunked"))
            self._chunked = True
        else:
            self._close_after = True  # HTTP/1.0: the end of the body is the end of the connection
        if not upgraded and (conn.close_requested or self._close_after):
            headers.append(("connection", "close"))
            self._close_after = True
        elif self.head.version == "1.0" and not upgraded:
            headers.append(("connection", "keep-alive"))
        lines = [f"HTTP/1.1 {head.status} {head.reason or reason_phrase(head.status)}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        data = ("".join(lines) + "\r\n").encode("latin-1")
        self.response_head_bytes += len(data)
        conn.write(data)
        if upgraded:
            self.upgraded = True
        elif end:
            self._finish()

    def write(self, data: bytes, *, end: bool = False) -> None:
        if self.ended:
            return
        if self.upgraded:
            if data:
                self.response_bytes += len(data)
                self._conn.write(data)
            if end:
                self.ended = True
                self._conn.write_eof()
                self._conn.exchange_done(self, close=True)
            return
        if data and not body_forbidden(self.head.method, self.status):
            self.response_bytes += len(data)
            if self._chunked:
                frame = b"%x\r\n%b\r\n" % (len(data), data)
                self.response_head_bytes += len(frame) - len(data)  # the framing's share
                self._conn.write(frame)
            else:
                self._conn.write(data)
        if end:
            self._finish()

    def end(self, trailers: Headers | None = None) -> None:
        """The end of the body (trailers are dropped: HTTP/1.1 clients rarely take them)."""
        self.write(b"", end=True)

    def _finish(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self._chunked:
            self.response_head_bytes += 5
            self._conn.write(b"0\r\n\r\n")
        self._conn.exchange_done(self, close=self._close_after)

    def local_reply(self, reply: LocalReply, extra: Sequence[tuple[str, str]] = ()) -> None:
        head = reply.head()
        head.headers.extend(extra)
        self.respond(head, end=not reply.body)
        if reply.body:
            self.write(reply.body, end=True)

    async def drain(self) -> None:
        await self._conn.drain()

    def abort(self) -> None:
        """Give up on the response: the client sees the connection reset."""
        self._conn.abort()


Handler = Callable[[ServerExchange], None]


class Http1Server(asyncio.Protocol):
    """The server side of one HTTP/1.1 connection."""

    def __init__(self, handler: Handler, info: dict[str, Any] | None = None) -> None:
        self.handler = handler
        self.info = dict(info or {})
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.lost = False
        self.close_requested = False
        self.requests = 0
        self._url = bytearray()
        self._headers: Headers = []
        self._header_bytes = 0
        self._parsing: ServerExchange | None = None
        self._active: ServerExchange | None = None
        self._queue: deque[ServerExchange] = deque()
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._reading_paused = 0
        # An upgrade request: every byte after its head is the tunnel's, not HTTP.
        self._upgrading: ServerExchange | None = None

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if "peer" not in self.info:
            peer = transport.get_extra_info("peername")
            if peer:
                self.info["peer"] = f"{peer[0]}:{peer[1]}"

    def data_received(self, data: bytes) -> None:
        if self._upgrading is not None:
            self._upgrading.body.push(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0] if e.args else len(data)
            if self._upgrading is not None and data[offset:]:
                self._upgrading.body.push(data[offset:])
        except httptools.HttpParserError as e:
            self._bad_request(f"malformed request: {e}")

    def eof_received(self) -> bool | None:
        if self._upgrading is not None:
            self._upgrading.body.finish()
            return True
        if self._parsing is not None and not self._parsing.body.ended:
            self._parsing.body.fail(DownstreamGone("the client closed before the request ended"))
        if self._active is None:
            return False
        self.close_requested = True
        return True  # answer what was asked, then close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        error = DownstreamGone(f"the client went away: {exc}" if exc else "the client went away")
        for exchange in [self._active, self._parsing, *self._queue]:
            if exchange is not None:
                exchange.body.fail(error)
                if not exchange.done.done():
                    exchange.done.set_exception(error)
                    exchange.done.exception()  # retrieved: nobody may be waiting
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if self.lost:
            raise DownstreamGone("the client went away")
        if not self.write_paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.lost and self.transport.can_write_eof():
            self.transport.write_eof()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        self._reading_paused += 1
        if self._reading_paused == 1 and self.transport is not None and not self.lost:
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused == 0:
            return
        self._reading_paused -= 1
        if self._reading_paused == 0 and self.transport is not None and not self.lost:
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self._url = bytearray()
        self._headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise httptools.HttpParserError("request headers too large")
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        method = parser.get_method().decode("ascii", "replace")
        headers = self._headers
        authority = ""
        kept: Headers = []
        for k, v in headers:
            if k == "host":
                authority = authority or v
            else:
                kept.append((k, v))
        if not authority:
            authority = self.info.get("authority", "")
        if not parser.should_keep_alive():
            self.close_requested = True
        upgrade = None
        if parser.should_upgrade() and method != "CONNECT":
            upgrade = next((v for k, v in kept if k == "upgrade"), None)
        head = RequestHead(
            method=method,
            target=self._url.decode("latin-1"),
            authority=authority,
            version="1.0" if version == "1.0" else "1.1",
            headers=kept,
            upgrade=upgrade,
        )
        # The head's size as sent in the usual form ("name: value\r\n"; the request line
        # with its "HTTP/1.x"): httptools hands over the parts, not the bytes they took.
        size = len(method) + len(head.target) + 14 + self._header_bytes + 4 * len(headers)
        exchange = ServerExchange(self, head, self.info, size)
        self.requests += 1
        self._parsing = exchange
        if upgrade is not None:
            self._upgrading = exchange
            self.close_requested = True  # no HTTP after a tunnel, whatever the answer
        if self._active is None:
            self._start(exchange)
        else:
            self._queue.append(exchange)
            self.pause_reading()  # one pipelined request at a time is enough

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.body.push(body)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        if exchange is not None and exchange.head.upgrade is None:
            exchange.body.finish()
            self._parsing = None

    # ------------------------------------------------------------ exchanges

    def _start(self, exchange: ServerExchange) -> None:
        self._active = exchange
        try:
            self.handler(exchange)
        except Exception as e:  # a bug in the handler must not take the connection down silently
            if not exchange.head_sent:
                exchange.local_reply(LocalReply(500, f"internal error: {e}".encode()))
            raise

    def exchange_done(self, exchange: ServerExchange, *, close: bool) -> None:
        if not exchange.done.done():
            exchange.done.set_result(None)
        if exchange is not self._active:
            return
        self._active = None
        if close or self.close_requested:
            if self.transport is not None:
                self.transport.close()
            return
        if self._queue:
            nxt = self._queue.popleft()
            self.resume_reading()
            self._start(nxt)

    def _bad_request(self, reason: str) -> None:
        if self._active is None:
            body = reason.encode()
            self.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (len(body), body)
            )
        if self.transport is not None:
            self.transport.close()
        self.lost = True
