"""An echo server in the shape of the Gateway API conformance echo server (echo-basic).

``meshlab app echo`` answers every HTTP request with one JSON object saying
what it received and which pod answered:

* echo-basic's fields: ``path`` (the request target, query included),
  ``host`` (``Host`` or ``:authority``), ``method``, ``proto`` (``HTTP/1.1``,
  ``HTTP/2.0``), ``headers`` (name in Go's canonical form, ``User-Agent``,
  ``X-Header-Set``, to the list of its values; ``Host`` and
  ``Transfer-Encoding`` left out as Go's ``net/http`` does), ``namespace``
  (``POD_NAMESPACE``, else echo-basic's ``NAMESPACE``), ``ingress``
  (``INGRESS_NAME``), ``service`` (``SERVICE_NAME``), ``pod`` (``POD_NAME``);
* ours: ``node`` (``NODE_NAME``), ``ip`` (``POD_IP``), ``client`` (the peer
  address the server saw, ``ip:port``), ``bodyBytes`` (the request body's
  length) and ``version`` (``--version``, else ``VERSION``; echo-basic has no
  such field, it is there to tell the versions of a traffic split apart).

Routes: ``/status/CODE`` answers with that status (200-599, else 400), the body
still the echo; ``/delay/SECONDS`` (a float, at most 60) waits, then echoes;
echo-basic's ``?delay=DURATION`` (Go syntax, ``250ms``, ``1.5s``) does the same,
a bad one answers 500 as echo-basic does. echo-basic's ``X-Echo-Set-Header:
Name:value,...`` request header sets those response headers. ``--status CODE``
overrides the status of every response (a pod that always fails; gRPC calls
then fail with the status gRPC maps that HTTP code to). 204 and 304 carry no
body, nor does a reply to HEAD (its ``Content-Length`` is the GET body's).

Every ``--port`` serves HTTP/1.1 (keep-alive, pipelining, chunked bodies,
``Expect: 100-continue``) and HTTP/2 over cleartext with prior knowledge: a
connection that opens with the HTTP/2 preface is handed to the ``h2`` state
machine. HTTP/1.1 is parsed by ``httptools`` when it is installed, else by the
small parser below with the same callback interface.

``--grpc PORT`` also serves echo-basic's gRPC service with ``grpcio``, without
generated code: the handlers take and return raw bytes, encoded here by hand.
Service ``gateway_api_conformance.echo_basic.grpcecho.GrpcEcho``, methods
``Echo`` and ``EchoTwo`` (``EchoThree`` is unimplemented, as upstream). The
request ``EchoRequest`` is empty; the response, in proto3 wire format::

    EchoResponse { Assertions assertions = 1; }
    Assertions   { string fully_qualified_method = 1;  // "/<service>/Echo"
                   repeated Header headers = 2;         // request metadata
                   string authority = 3;                // always "": grpcio hides it
                   Context context = 4;
                   /* TLSAssertions tls_assertions = 5: never, no TLS here */ }
    Header       { string key = 1; string value = 2; }
    Context      { string namespace = 1; string ingress = 2;
                   string service_name = 3; string pod = 4; }

``decode_echo_response`` reads one back, for tests and demos.

Layout: ``Responder`` decides a reply from a request and the settings and does
no I/O; ``_Http1``, ``_Http2`` and the gRPC handler are the shells around it.
The HTTP/1.1 shell takes the parser's callbacks straight, without an event
layer in between: it is a benchmark backend, and that path runs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from hyperframe.frame import GoAwayFrame

try:  # optional and faster; absent, the parser below does the same work
    _httptools: Any = importlib.import_module("httptools")
except ImportError:
    _httptools = None

GRPC_SERVICE = "gateway_api_conformance.echo_basic.grpcecho.GrpcEcho"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024
_PIPELINE_DEPTH = 64  # queued replies on one HTTP/1.1 connection before reading pauses
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Headers a client may not set through X-Echo-Set-Header: they frame the message.
_FRAMING = frozenset(
    {"connection", "content-length", "content-type", "keep-alive"}
    | {"proxy-connection", "te", "transfer-encoding", "upgrade"}
)
_NO_BODY = frozenset([204, 304])
_COMPACT = (",", ":")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything ``meshlab app echo`` is told, from its flags and environment."""

    ports: tuple[int, ...] = (8080,)
    address: str = "0.0.0.0"
    status: int | None = None
    version: str = ""
    grpc_port: int | None = None
    log: bool = False
    namespace: str = ""
    ingress: str = ""
    service: str = ""
    pod: str = ""
    node: str = ""
    ip: str = ""
    http1_parser: str = "auto"  # "httptools", "builtin" or "auto" (httptools if installed)
    max_delay_s: float = 60.0
    drain_timeout_s: float = 5.0

    @classmethod
    def from_argv(
        cls, argv: Sequence[str] | None, environ: Mapping[str, str] = os.environ
    ) -> Settings:
        parser = argparse.ArgumentParser(
            prog="meshlab app echo", description=(__doc__ or "").split("\n\n")[0]
        )
        parser.add_argument("--port", type=_port, action="append", help="repeat to listen on more")
        parser.add_argument("--address", default="0.0.0.0")
        parser.add_argument("--status", type=_status_flag, help="answer every request with CODE")
        parser.add_argument("--version", default=environ.get("VERSION", ""))
        parser.add_argument("--grpc", type=_port, metavar="PORT", help="also serve gRPC echo")
        parser.add_argument("--log", action="store_true", help="one line per request on stderr")
        args = parser.parse_args(argv)
        return cls(
            ports=tuple(args.port or [8080]),
            address=args.address,
            status=args.status,
            version=args.version,
            grpc_port=args.grpc,
            log=args.log,
            namespace=environ.get("POD_NAMESPACE") or environ.get("NAMESPACE", ""),
            ingress=environ.get("INGRESS_NAME", ""),
            service=environ.get("SERVICE_NAME", ""),
            pod=environ.get("POD_NAME", ""),
            node=environ.get("NODE_NAME", ""),
            ip=environ.get("POD_IP", ""),
        )


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0-65535)")
    return port


def _status_flag(text: str) -> int:
    code = int(text)
    if not 200 <= code <= 599:
        raise argparse.ArgumentTypeError(f"{text} is not a final HTTP status (200-599)")
    return code


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One request as either HTTP version delivered it."""

    method: str
    target: str
    host: str
    proto: str
    headers: dict[str, list[str]]
    body_bytes: int
    client: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """What to send: the shells add only framing (``Connection: close``, ``:status``)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    delay_s: float = 0.0


_canonical_cache: dict[str, str] = {}


def canonical_header_key(name: str) -> str:
    """Go's ``textproto.CanonicalMIMEHeaderKey``: ``x-foo-BAR`` is ``X-Foo-Bar``.

    A name that is not an HTTP token is returned unchanged, as Go does.
    """
    key = _canonical_cache.get(name)
    if key is None:
        if name and all(c in _TOKEN for c in name):
            key = "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))
        else:
            key = name
        if len(_canonical_cache) < 4096:  # bounded: names come from clients
            _canonical_cache[name] = key
    return key


_GO_DURATION = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_go_duration(text: str) -> float:
    """Seconds in a Go ``time.ParseDuration`` string (``1h2m``, ``250ms``, ``0``)."""
    body = text[1:] if text[:1] in ("+", "-") else text
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _GO_DURATION.finditer(body):
        if match.start() != pos:
            break
        total += float(match[1]) * _GO_UNITS[match[2]]
        pos = match.end()
    if pos == 0 or pos != len(body):
        raise ValueError(f"time: invalid duration {text!r}")
    return 0.0 if text[:1] == "-" else total  # a negative sleep is no sleep, as in Go


class Responder:
    """Decides the reply to a request: pure, so it is tested without sockets."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        pod = {
            "namespace": settings.namespace,
            "ingress": settings.ingress,
            "service": settings.service,
            "pod": settings.pod,
            "node": settings.node,
            "ip": settings.ip,
            "version": settings.version,
        }
        # The pod's fields never change: serialised once, spliced into every body.
        self._pod_json = json.dumps(pod, separators=_COMPACT)[1:]

    def __call__(self, request: Request) -> Reply:
        path, _, query = request.target.partition("?")
        status, delay_s = 200, 0.0
        if path.startswith("/status/"):
            code = path[8:]
            status = int(code) if len(code) == 3 and code.isdigit() and code[0] in "2345" else 400
        elif path.startswith("/delay/"):
            try:
                delay_s = float(path[7:])
            except ValueError:
                delay_s = math.nan
            if not delay_s >= 0:  # also NaN
                return self._reply(request, 400, _message(f"bad delay {path[7:]!r}"), 0.0)
        if "delay=" in query:
            for key, value in parse_qsl(query):
                if key == "delay":
                    try:
                        delay_s = parse_go_duration(value)
                    except ValueError as exc:
                        return self._reply(request, 500, _message(str(exc)), 0.0)
        body = (
            json.dumps(
                {
                    "path": request.target,
                    "host": request.host,
                    "method": request.method,
                    "proto": request.proto,
                    "headers": request.headers,
                    "client": request.client,
                    "bodyBytes": request.body_bytes,
                },
                separators=_COMPACT,
            )[:-1]
            + ","
            + self._pod_json
            + "\n"
        ).encode()
        return self._reply(request, status, body, min(delay_s, self.settings.max_delay_s))

    def _reply(self, request: Request, status: int, body: bytes, delay_s: float) -> Reply:
        if self.settings.status is not None:
            status = self.settings.status
        headers = [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")]
        if status in _NO_BODY:
            body = b""
        else:
            headers.append(("Content-Length", str(len(body))))
        headers += _echo_set_headers(request.headers.get("X-Echo-Set-Header", ()))
        if request.method == "HEAD":
            body = b""
        return Reply(status=status, headers=tuple(headers), body=body, delay_s=delay_s)


def _message(text: str) -> bytes:
    return json.dumps({"message": text}, separators=_COMPACT).encode() + b"\n"


def _echo_set_headers(values: Sequence[str]) -> list[tuple[str, str]]:
    """echo-basic's ``X-Echo-Set-Header: A:1,B:2``; a repeated name joins with ``,``."""
    chosen: dict[str, str] = {}
    for item in (kv.strip() for value in values for kv in value.split(",")):
        name, _, value = item.partition(":")
        value = value.strip()
        if not name or not all(c in _TOKEN for c in name) or name.lower() in _FRAMING:
            continue
        if "\r" in value or "\n" in value:
            continue
        chosen[name] = f"{chosen[name]},{value}" if name in chosen else value
    return list(chosen.items())


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


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ParseError(ValueError):
    """The client sent something that is not an HTTP/1.1 request: answer 400 and close."""


_PARSE_ERRORS: tuple[type[Exception], ...] = (_ParseError,)
if _httptools is not None:
    _PARSE_ERRORS += (_httptools.HttpParserError,)
_H1_HEAD, _H1_BODY, _H1_CHUNK_SIZE, _H1_CHUNK_DATA, _H1_CHUNK_END, _H1_TRAILER = range(6)


class _Http1Parser:
    """A small HTTP/1.x request parser with httptools' interface, for when it is absent."""

    def __init__(self, protocol: _Http1) -> None:
        self._protocol = protocol
        self._buffer = bytearray()
        self._state = _H1_HEAD
        self._remaining = 0
        self._method = b""
        self._version = "1.1"
        self._keep_alive = True

    def get_method(self) -> bytes:
        return self._method

    def get_http_version(self) -> str:
        return self._version

    def should_keep_alive(self) -> bool:
        return self._keep_alive

    def feed_data(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        while True:
            state = self._state
            if state in (_H1_BODY, _H1_CHUNK_DATA):
                n = min(len(buf), self._remaining)
                if n:
                    self._protocol.on_body(bytes(buf[:n]))
                    del buf[:n]
                    self._remaining -= n
                if self._remaining:
                    return
                if state == _H1_BODY:
                    self._complete()
                else:
                    self._state = _H1_CHUNK_END
                continue
            end = buf.find(b"\r\n\r\n" if state == _H1_HEAD else b"\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise _ParseError("request head or chunk line too long")
                return
            line = bytes(buf[:end])
            del buf[: end + (4 if state == _H1_HEAD else 2)]
            if state == _H1_HEAD:
                self._head(line)
            elif state == _H1_CHUNK_SIZE:
                try:
                    self._remaining = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _ParseError(f"bad chunk size {line[:20]!r}") from None
                self._state = _H1_CHUNK_DATA if self._remaining else _H1_TRAILER
            elif state == _H1_CHUNK_END:
                if line:
                    raise _ParseError("chunk data longer than its size")
                self._state = _H1_CHUNK_SIZE
            elif not line:  # the empty line after the trailers
                self._complete()

    def _head(self, head: bytes) -> None:
        lines = head.lstrip(b"\r\n").split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[0]:
            raise _ParseError(f"bad request line {lines[0][:40]!r}")
        self._method, self._version = parts[0], parts[2][5:].decode()
        self._protocol.on_message_begin()
        self._protocol.on_url(parts[1])
        length: bytes | None = None
        chunked, connection = False, b""
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise _ParseError(f"bad header line {line[:40]!r}")
            value = value.strip()
            lower = name.lower()
            if lower == b"content-length":
                if (length is not None and value != length) or not value.isdigit():
                    raise _ParseError("bad Content-Length")
                length = value
            elif lower == b"transfer-encoding":
                if not value.lower().endswith(b"chunked"):
                    raise _ParseError("a request's last transfer coding must be chunked")
                chunked = True
            elif lower == b"connection":
                connection += b"," + value.lower()
            self._protocol.on_header(name, value)
        if chunked and length is not None:
            raise _ParseError("Transfer-Encoding and Content-Length together")
        tokens = {t.strip() for t in connection.split(b",")}
        self._keep_alive = b"close" not in tokens and (
            self._version == "1.1" or b"keep-alive" in tokens
        )
        self._protocol.on_headers_complete()
        if chunked:
            self._state = _H1_CHUNK_SIZE
        elif length is not None and int(length):
            self._state, self._remaining = _H1_BODY, int(length)
        else:
            self._complete()

    def _complete(self) -> None:
        self._state = _H1_HEAD
        self._protocol.on_message_complete()


class _Connection(asyncio.Protocol):
    """What both HTTP shells share: the transport, the peer, backpressure, the drain."""

    transport: asyncio.Transport

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.respond = server.responder
        self.client = ""
        self._paused_by_writes = False
        self._paused_by_queue = False
        self._timers: set[asyncio.TimerHandle] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, but they have its methods.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = _address(peer[0], peer[1]) if peer else ""
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.server.forget(self)

    def pause_writing(self) -> None:
        self._paused_by_writes = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_by_writes = False
        if not self._paused_by_queue:
            self.transport.resume_reading()

    def later(self, delay_s: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` after ``delay_s``; cancelled if the connection goes first."""
        timer: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(timer)
            callback()

        timer = asyncio.get_running_loop().call_later(delay_s, fire)
        self._timers.add(timer)

    def log(self, request: Request, reply: Reply) -> None:
        print(
            f"echo: src.addr={request.client} method={request.method} path={request.target!r}"
            f" proto={request.proto} status={reply.status} bytes_sent={len(reply.body)}",
            file=sys.stderr,
        )

    def drain(self) -> None:
        """Finish what was asked, then close."""
        raise NotImplementedError

    def abort(self) -> None:
        self.transport.abort()


class _Http1(_Connection):
    """An HTTP/1.1 connection, until its first bytes turn out to be the HTTP/2 preface."""

    def __init__(self, server: EchoServer) -> None:
        super().__init__(server)
        builtin = server.settings.http1_parser == "builtin" or _httptools is None
        self._parser: Any = _Http1Parser(self) if builtin else _httptools.HttpRequestParser(self)
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
        except _PARSE_ERRORS as exc:
            too_big = self._head_bytes > MAX_HEAD_BYTES
            self._fail(431 if too_big else 400, str(exc.__context__ or exc))
        except Exception as exc:
            if _httptools is None or not isinstance(exc, _httptools.HttpParserUpgrade):
                raise
            # Upgrade (or CONNECT) was answered as a plain request: the client reads our
            # reply, not a 101, and goes on in HTTP/1.1 with a parser of its own.
            self._parser = _httptools.HttpRequestParser(self)
            self.data_received(data[exc.args[0] :])

    def _switch_to_h2(self, data: bytes) -> None:
        h2 = _Http2(self.server)
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
            raise _ParseError(f"request head over {MAX_HEAD_BYTES} bytes")
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
        if len(self._replies) >= _PIPELINE_DEPTH and not self._paused_by_queue:
            self._paused_by_queue = True
            self.transport.pause_reading()

    def _ready(self, entry: list[Any]) -> None:
        entry[3] = True
        replies = self._replies
        while replies and replies[0][3] and not self._closing:
            reply, request, keep_alive, _ = replies.popleft()
            self._send(reply, request, keep_alive)
        if self._paused_by_queue and len(replies) < _PIPELINE_DEPTH // 2:
            self._paused_by_queue = False
            if not self._paused_by_writes:
                self.transport.resume_reading()

    def _send(self, reply: Reply, request: Request | None, keep_alive: bool) -> None:
        close = False and (self._draining and not self._replies)
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
        body = _message(why)
        headers = (("Content-Type", "application/json"), ("Content-Length", str(len(body))))
        self._send(Reply(status=status, headers=headers, body=body), None, keep_alive=False)

    def drain(self) -> None:
        self._draining = True
        if not self._replies and not self._in_request and not self._closing:
            self._closing = True
            self.transport.close()


class _Http2(_Connection):
    """An HTTP/2 connection (cleartext, prior knowledge), driven by the h2 state machine."""

    def __init__(self, server: EchoServer) -> None:
        super().__init__(server)
        config = H2Configuration(client_side=False, header_encoding=None)
        self.h2 = H2Connection(config=config)
        self._streams: dict[int, list[Any]] = {}  # id -> [headers, body bytes]
        self._unsent: dict[int, memoryview] = {}  # reply bodies waiting for window
        self._draining = False
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.h2.initiate_connection()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2Error:
            self._flush()
            self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._streams[event.stream_id] = [event.headers, 0]
            elif isinstance(event, DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream[1] += len(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self._answer(event.stream_id)
            elif isinstance(event, StreamReset):
                self._streams.pop(event.stream_id, None)
                self._unsent.pop(event.stream_id, None)
            elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
                self._send_unsent()
            elif isinstance(event, ConnectionTerminated):
                self.transport.close()
        self._flush()

    def _answer(self, stream_id: int) -> None:
        if stream_id not in self._streams:
            return
        raw_headers, body_bytes = self._streams[stream_id]
        pseudo: dict[bytes, bytes] = {}
        headers: dict[str, list[str]] = {}
        for raw_name, raw_value in raw_headers:
            value = raw_value.decode("utf-8", "replace")
            if raw_name[:1] == b":":
                pseudo[raw_name] = raw_value
            elif raw_name == b"host":
                pseudo.setdefault(b":authority", raw_value)
            else:
                headers.setdefault(canonical_header_key(raw_name.decode("latin-1")), []).append(
                    value
                )
        request = Request(
            method=pseudo.get(b":method", b"").decode("latin-1"),
            target=pseudo.get(b":path", b"").decode("utf-8", "replace"),
            host=pseudo.get(b":authority", b"").decode("utf-8", "replace"),
            proto="HTTP/2.0",
            headers=headers,
            body_bytes=body_bytes,
            client=self.client,
        )
        reply = self.respond(request)
        if reply.delay_s:
            self.later(reply.delay_s, lambda: self._reply(stream_id, request, reply))
        else:
            self._reply(stream_id, request, reply)

    def _reply(self, stream_id: int, request: Request, reply: Reply) -> None:
        if stream_id not in self._streams:  # reset while we waited
            return
        headers = [(b":status", str(reply.status).encode())]
        headers += [(n.lower().encode(), v.encode()) for n, v in reply.headers]
        try:
            self.h2.send_headers(stream_id, headers, end_stream=not reply.body)
        except H2Error:
            self._streams.pop(stream_id, None)
            return
        if reply.body:
            self._unsent[stream_id] = memoryview(reply.body)
            self._send_unsent()
        else:
            self._streams.pop(stream_id, None)
        if self.server.settings.log:
            self.log(request, reply)
        self._flush()

    def _send_unsent(self) -> None:
        for stream_id, data in list(self._unsent.items()):
            try:
                window = self.h2.local_flow_control_window(stream_id)
                while window > 0 and data:
                    size = min(window, self.h2.max_outbound_frame_size, len(data))
                    chunk, data = data[:size], data[size:]
                    self.h2.send_data(stream_id, chunk.tobytes(), end_stream=not data)
                    window -= size
            except H2Error:
                data = memoryview(b"")
            if data:
                self._unsent[stream_id] = data
            else:
                del self._unsent[stream_id]
                self._streams.pop(stream_id, None)

    def _flush(self) -> None:
        if self._closed:
            return
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)
        if self._draining and not self._streams:
            self._closed = True
            self.h2.close_connection()
            self.transport.write(self.h2.data_to_send())
            self.transport.close()

    def drain(self) -> None:
        """Say GOAWAY now so the client opens no more streams, answer the open ones, close."""
        self._draining = True
        self._flush()
        if not self._closed:
            # h2 has no "graceful" GOAWAY that lets streams go on, so the frame is ours.
            goaway = GoAwayFrame(stream_id=0)
            goaway.last_stream_id = self.h2.highest_inbound_stream_id
            self.transport.write(goaway.serialize())


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb_field(number: int, payload: bytes, *, always: bool = False) -> bytes:
    """One length-delimited field (wire type 2); proto3 leaves out empty ones."""
    if not payload and not always:
        return b""
    return _pb_varint(number << 3 | 2) + _pb_varint(len(payload)) + payload


def _pb_fields(data: bytes) -> list[tuple[int, bytes]]:
    """The length-delimited fields of one message, in order; other wire types skipped."""
    fields, pos = [], 0
    while pos < len(data):
        key, pos = _pb_read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _pb_read_varint(data, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _pb_read_varint(data, pos)
            fields.append((key >> 3, data[pos : pos + size]))
            pos += size
        else:
            raise ValueError(f"protobuf wire type {wire} not supported")
    if pos != len(data):
        raise ValueError("protobuf message truncated")
    return fields


def _pb_read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("protobuf varint truncated")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def encode_echo_response(
    *,
    method: str,
    headers: Sequence[tuple[str, str | bytes]],
    authority: str,
    context: Mapping[str, str],
) -> bytes:
    """An ``EchoResponse`` (see the module docstring), serialised."""
    pairs = b"".join(
        _pb_field(
            2,
            _pb_field(1, key.encode())
            + _pb_field(2, value if isinstance(value, bytes) else value.encode()),
            always=True,
        )
        for key, value in headers
    )
    ctx = b"".join(
        _pb_field(number, context.get(name, "").encode())
        for number, name in enumerate(("namespace", "ingress", "serviceName", "pod"), 1)
    )
    assertions = (
        _pb_field(1, method.encode())
        + pairs
        + _pb_field(3, authority.encode())
        + _pb_field(4, ctx, always=True)
    )
    return _pb_field(1, assertions, always=True)


def decode_echo_response(data: bytes) -> dict[str, Any]:
    """An ``EchoResponse`` as protobuf's JSON mapping names it (``fullyQualifiedMethod``...)."""
    out: dict[str, Any] = {
        "fullyQualifiedMethod": "",
        "headers": [],
        "authority": "",
        "context": {},
    }
    for number, assertions in _pb_fields(data):
        if number != 1:
            continue
        for field, value in _pb_fields(assertions):
            if field == 1:
                out["fullyQualifiedMethod"] = value.decode()
            elif field == 2:
                header = dict(_pb_fields(value))
                out["headers"].append([header.get(1, b"").decode(), header.get(2, b"").decode()])
            elif field == 3:
                out["authority"] = value.decode()
            elif field == 4:
                names = {1: "namespace", 2: "ingress", 3: "serviceName", 4: "pod"}
                ctx = {names[n]: v.decode() for n, v in _pb_fields(value) if n in names}
                out["context"] = {name: ctx.get(name, "") for name in names.values()}
    return out


def grpc_status_for(http_status: int) -> str:
    """gRPC's mapping of an HTTP status to a status code name (http-grpc-status-mapping.md)."""
    mapped = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}
    mapped |= {404: "UNIMPLEMENTED", 429: "UNAVAILABLE", 502: "UNAVAILABLE"}
    mapped |= {503: "UNAVAILABLE", 504: "UNAVAILABLE"}
    return mapped.get(http_status, "UNKNOWN")


class EchoServer:
    """The listeners and their connections, with a graceful stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.responder = Responder(settings)
        self.connections: set[_Connection] = set()
        self.ports: list[int] = []  # bound HTTP ports, in the order of settings.ports
        self.grpc_port: int | None = None
        self._listeners: list[asyncio.Server] = []
        self._grpc: Any = None
        self._all_closed = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port in self.settings.ports:
            listener = await loop.create_server(
                lambda: _Http1(self), self.settings.address, port, backlog=1024
            )
            self._listeners.append(listener)
            self.ports.append(listener.sockets[0].getsockname()[1])
        if self.settings.grpc_port is not None:
            await self._start_grpc(self.settings.grpc_port)

    def addresses(self) -> str:
        """``0.0.0.0:8080 (http, h2c), 0.0.0.0:9000 (grpc)``."""
        host = self.settings.address
        out = [f"{_address(host, port)} (http, h2c)" for port in self.ports]
        if self.grpc_port is not None:
            out.append(f"{_address(host, self.grpc_port)} (grpc)")
        return ", ".join(out)

    async def _start_grpc(self, port: int) -> None:
        # Imported here: grpc costs a tenth of a second at start, and most pods never use it.
        grpc = importlib.import_module("grpc")
        server = grpc.aio.server()
        fail = self.settings.status
        context = {
            "namespace": self.settings.namespace,
            "ingress": self.settings.ingress,
            "serviceName": self.settings.service,
            "pod": self.settings.pod,
        }

        def handler(name: str) -> Any:
            full_method = f"/{GRPC_SERVICE}/{name}"

            async def echo(request: bytes, ctx: Any) -> bytes:
                if fail is not None and fail >= 400:
                    code = getattr(grpc.StatusCode, grpc_status_for(fail))
                    await ctx.abort(code, f"echo: --status {fail}")
                metadata = [(m.key, m.value) for m in ctx.invocation_metadata() or ()]
                if self.settings.log:
                    print(f"echo: src.addr={ctx.peer()} grpc={full_method}", file=sys.stderr)
                return encode_echo_response(
                    method=full_method, headers=metadata, authority="", context=context
                )

            return grpc.unary_unary_rpc_method_handler(echo)

        handlers = {name: handler(name) for name in ("Echo", "EchoTwo")}
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(GRPC_SERVICE, handlers)]
        )
        self.grpc_port = server.add_insecure_port(_address(self.settings.address, port))
        await server.start()
        self._grpc = server

    def forget(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if self._stopping and not self.connections:
            self._all_closed.set()

    async def stop(self) -> None:
        """Stop accepting, let every connection finish within the drain deadline, then cut."""
        self._stopping = True
        for listener in self._listeners:
            listener.close()
        grpc_stopped = self._grpc.stop(self.settings.drain_timeout_s) if self._grpc else None
        for connection in list(self.connections):
            connection.drain()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), self.settings.drain_timeout_s)
        for connection in list(self.connections):
            connection.abort()
        if grpc_stopped is not None:
            await grpc_stopped
        for listener in self._listeners:
            await listener.wait_closed()


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """Listen, say so on stderr, serve until ``stop`` is set, then drain."""
    server = EchoServer(settings)
    try:
        await server.start()
    except (OSError, RuntimeError) as exc:  # grpcio says RuntimeError for a busy port
        print(f"echo: cannot listen on {settings.address}: {exc}", file=sys.stderr)
        await server.stop()
        return 1
    print(f"echo: listening on {server.addresses()}", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_argv(argv)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return await serve(settings, stop)

    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.run(run())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())
