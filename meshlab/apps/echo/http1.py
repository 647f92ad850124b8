"""``Http1``: HTTP/1.1 over ``httptools`` (keep-alive, pipelining, chunked bodies, 100-continue).

The shell takes the parser's callbacks straight, without an event layer in between:
it is a benchmark backend, and that path runs per request. A connection whose first
bytes are the HTTP/2 preface is handed to ``Http2``.
"""

from __future__ import annotations

from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools

from meshlab.apps.echo.connection import Connection
from meshlab.apps.echo.http2 import Http2
from meshlab.apps.echo.responder import Reply, Request, canonical_header_key, json_message

if TYPE_CHECKING:
    from meshlab.apps.echo.server import EchoServer

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024
PIPELINE_DEPTH = 64  # queued replies on one HTTP/1.1 connection before reading pauses


class Http1(Connection):
    """An HTTP/1.1 connection, until its first bytes turn out to be the HTTP/2 preface."""

    def __init__(self, server: EchoServer) -> None:
        super().__init__(server)
        self._parser = httptools.HttpRequestParser(self)
        self._sniffing = b""  # the first bytes, until they tell HTTP/1 from HTTP/2
        self._first = True
        self._replies: deque[list[Any]] = deque()  # [reply, request, keep_alive, ready]
        self._closing = False
        self._draining = False
        self._in_request = False
        self._url = b""
        self._headers: dict[str, list[str]] = {}
        self._host = ""
        self._body_bytes = 0
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._first:
            data = self._sniffing + data
            if H2_PREFACE.startswith(data[:24]) and len(data) < 24:
                self._sniffing = data
                return
            self._first = False
            if data.startswith(H2_PREFACE):
                self._switch_to_h2(data)
                return
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # An exception raised in a callback (on_header's) is the context of httptools' own.
            too_big = self._head_bytes > MAX_HEAD_BYTES
            self._fail(431 if too_big else 400, str(exc.__context__ or exc))
        except httptools.HttpParserUpgrade as exc:
            # Upgrade (or CONNECT) was answered as a plain request: the client reads our
            # reply, not a 101, and goes on in HTTP/1.1 with a parser of its own.
            self._parser = httptools.HttpRequestParser(self)
            self.data_received(data[exc.args[0] :])

    def _switch_to_h2(self, data: bytes) -> None:
        h2 = Http2(self.server)
        self.server.connections.discard(self)
        self.transport.set_protocol(h2)
        h2.connection_made(self.transport)
        h2.data_received(data)

    # The parser's callbacks, per request.

    def on_message_begin(self) -> None:
        self._in_request = True
        self._url = b""
        self._headers = {}
        self._host = ""
        self._body_bytes = 0
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ValueError(f"request head over {MAX_HEAD_BYTES} bytes")
        key = canonical_header_key(name.decode("latin-1"))
        text = value.decode("utf-8", "replace")
        if key == "Host":
            self._host = self._host or text
        elif key != "Transfer-Encoding":
            values = self._headers.get(key)
            if values is None:
                self._headers[key] = [text]
            else:
                values.append(text)

    def on_headers_complete(self) -> None:
        expect = self._headers.get("Expect")
        if expect and expect[0].lower() == "100-continue" and not self._replies:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)

    def on_message_complete(self) -> None:
        self._in_request = False
        if self._closing:
            return
        parser = self._parser
        request = Request(
            method=parser.get_method().decode("latin-1"),
            target=self._url.decode("utf-8", "replace"),
            host=self._host,
            proto="HTTP/" + parser.get_http_version(),
            headers=self._headers,
            body_bytes=self._body_bytes,
            client=self.client,
        )
        reply = self.respond(request)
        keep_alive = parser.should_keep_alive() and not self._draining
        if not reply.delay_s and not self._replies:
            self._send(reply, request, keep_alive)
            return
        entry = [reply, request, keep_alive, not reply.delay_s]
        self._replies.append(entry)
        if reply.delay_s:
            self.later(reply.delay_s, lambda: self._ready(entry))
        if len(self._replies) >= PIPELINE_DEPTH and not self._paused_by_queue:
            self._paused_by_queue = True
            self.transport.pause_reading()

    def _ready(self, entry: list[Any]) -> None:
        entry[3] = True
        replies = self._replies
        while replies and replies[0][3] and not self._closing:
            reply, request, keep_alive, _ = replies.popleft()
            self._send(reply, request, keep_alive)
        if self._paused_by_queue and len(replies) < PIPELINE_DEPTH // 2:
            self._paused_by_queue = False
            if not self._paused_by_writes:
                self.transport.resume_reading()

    def _send(self, reply: Reply, request: Request | None, keep_alive: bool) -> None:
        close = not keep_alive or (self._draining and not self._replies)
        head = [_status_line(reply.status)]
        head += [f"{name}: {value}\r\n" for name, value in reply.headers]
        head.append("Connection: close\r\n\r\n" if close else "\r\n")
        self.transport.write("".join(head).encode() + reply.body)
        if request is not None and self.server.settings.log:
            self.log(request, reply)
        if close:
            self._closing = True
            self.transport.close()

    def _fail(self, status: int, why: str) -> None:
        self._replies.clear()  # what was asked before the bad bytes goes unanswered
        body = json_message(why)
        headers = (("Content-Type", "application/json"), ("Content-Length", str(len(body))))
        self._send(Reply(status=status, headers=headers, body=body), None, keep_alive=False)

    def drain(self) -> None:
        self._draining = True
        if not self._replies and not self._in_request and not self._closing:
            self._closing = True
            self.transport.close()


_status_lines: dict[int, str] = {}


def _status_line(code: int) -> str:
    line = _status_lines.get(code)
    if line is None:
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        line = _status_lines[code] = f"HTTP/1.1 {code} {phrase}\r\n"
    return line
