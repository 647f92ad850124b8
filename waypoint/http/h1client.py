"""The upstream end of HTTP/1.1: one request at a time on a kept-alive connection.

A :class:`Http1Client` is one connection to an endpoint (over HBONE or plain
TCP). ``send`` writes a request head (framed by ``content-length`` when the
request has one, chunked when it has a body of unknown length), ``data`` and
``end`` its body; the response comes back as calls on the
:class:`Attempt` the request was sent for. When the response is complete and
both sides keep the connection alive it goes back to its pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from waypoint.http.messages import Headers, RequestHead, ResponseHead, body_forbidden

_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "TRACE", "OPTIONS", "CONNECT"})


class Attempt(Protocol):
    """What an upstream connection reports for the request it carries."""

    def on_informational(self, status: int, headers: Headers) -> None: ...

    def on_response(self, head: ResponseHead) -> None: ...

    def on_data(self, data: bytes) -> None: ...

    def on_end(self, trailers: Headers | None = None) -> None: ...

    def on_reset(self, reason: str, sent: bool) -> None:
        """The connection failed; ``sent``: some of the request had been written."""
        ...


class Http1Client(asyncio.Protocol):
    """One upstream HTTP/1.1 connection."""

    def __init__(self, release: Callable[[Http1Client, bool], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.release = release  # called with (self, reusable) when a response completes
        self.attempt: Attempt | None = None
        self.method = "GET"
        self.lost = False
        self.requests = 0
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunked = False
        self._headers: Headers = []
        self._sent = False
        self._write_paused = False
        self._drain: list[asyncio.Future[None]] = []
        self._keep_alive = True
        self._upgraded = False
        self._head_seen = False

    # ---------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if not self.connected.done():
            self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed before connecting"))
            self.connected.exception()
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            if self._upgraded:
                attempt.on_end()
            else:
                reason = "connection termination" if exc is None else "remote reset"
                attempt.on_reset(reason, self._sent)
        for waiter in self._drain:
            if not waiter.done():
                waiter.set_result(None)
        self._drain.clear()
        if self.release is not None:
            self.release(self, False)

    def eof_received(self) -> bool | None:
        if self.attempt is not None and self._head_seen and not self._upgraded:
            # A close-delimited body (no length, not chunked) ends with the connection.
            self._keep_alive = False
            self._complete()
        if self._upgraded and self.attempt is not None:
            attempt, self.attempt = self.attempt, None
            attempt.on_end()
        return False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain = self._drain, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if self._write_paused and not self.lost:
            waiter = asyncio.get_running_loop().create_future()
            self._drain.append(waiter)
            await waiter

    def pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    @property
    def idle(self) -> bool:
        return self.attempt is None and not self.lost

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Reset the connection: the attempt it carries is over."""
        self.attempt = None
        if self.transport is not None:
            self.transport.abort()

    # ---------------------------------------------------------- the request

    def send(
        self, head: RequestHead, attempt: Attempt, *, has_body: bool, length: int | None
    ) -> None:
        self.attempt = attempt
        self.method = head.method
        self.requests += 1
        self._sent = True
        self._head_seen = False
        self._upgraded = False
        self._keep_alive = True
        headers = [
            (k, v)
            for k, v in head.headers
            if k not in ("content-length", "transfer-encoding", "connection", "upgrade")
        ]
        self._chunked = False
        if head.upgrade is not None:
            headers += [("connection", "upgrade"), ("upgrade", head.upgrade)]
        elif length is not None:
            headers.append(("content-length", str(length)))
        elif has_body:
            headers.append(("transfer-encoding", "chunked"))
            self._chunked = True
        elif head.method not in _BODYLESS_METHODS:
            headers.append(("content-length", "0"))
        lines = [f"{head.method} {head.target} HTTP/1.1\r\nhost: {head.authority}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        assert self.transport is not None
        self.transport.write(("".join(lines) + "\r\n").encode("latin-1"))

    def data(self, data: bytes) -> None:
        if self.transport is None or self.lost or not data:
            return
        if self._chunked:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.transport.write(data)

    def end(self) -> None:
        if self._chunked and self.transport is not None and not self.lost:
            self.transport.write(b"0\r\n\r\n")
        self._chunked = False

    def raw_end(self) -> None:
        """An upgraded tunnel's client side is done sending."""
        if self.transport is not None and not self.lost and self.transport.can_write_eof():
            self.transport.write_eof()

    # ---------------------------------------------------------- parser callbacks

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            if self.attempt is not None:
                self.attempt.on_data(data)
            return
        if self.attempt is None:
            # Bytes nobody asked for: the connection is not usable any more.
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0] if e.args else len(data)
            if data[offset:] and self.attempt is not None:
                self.attempt.on_data(data[offset:])
        except httptools.HttpParserError:
            attempt, self.attempt = self.attempt, None
            self._keep_alive = False
            if attempt is not None and not self._head_seen:
                attempt.on_reset("protocol error", True)
            elif attempt is not None:
                attempt.on_end()
            self.abort()

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        attempt = self.attempt
        if attempt is None:
            return
        if 100 <= status < 200 and status != 101:
            attempt.on_informational(status, self._headers)
            return
        self._head_seen = True
        self._keep_alive = self.parser.should_keep_alive()
        head = ResponseHead(status=status, headers=self._headers)
        if status == 101:
            self._upgraded = True
            self._keep_alive = False
        attempt.on_response(head)
        if body_forbidden(self.method, status) and status != 101:
            # HEAD: llhttp would wait for the body content-length announces; there is none.
            self._complete()
            self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        if self.attempt is not None:
            self.attempt.on_data(body)

    def on_message_complete(self) -> None:
        if self._head_seen and not self._upgraded:
            self._complete()

    def _complete(self) -> None:
        attempt, self.attempt = self.attempt, None
        self._head_seen = False
        if attempt is not None:
            attempt.on_end()
        reusable = self._keep_alive and not self.lost
        if not reusable:
            self.close()
        if self.release is not None:
            self.release(self, reusable)
