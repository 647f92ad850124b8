"""``Http2``: HTTP/2 over cleartext with prior knowledge, driven by the ``h2`` state machine.

``Http1`` hands a connection over once its first bytes are the HTTP/2 preface.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

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

from meshlab.apps.echo.connection import Connection
from meshlab.apps.echo.responder import Reply, Request, canonical_header_key

if TYPE_CHECKING:
    from meshlab.apps.echo.server import EchoServer


class Http2(Connection):
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
