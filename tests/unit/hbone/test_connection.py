"""The sans-I/O HTTP/2 core, against itself and against the h2 library as a peer.

Each test reads as a transcript: bytes go from one side to the other, and the
events that come out are what a user of the tunnel would see.
"""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hbone import connection as core
from mesh.hbone.errors import ProtocolViolation
from mesh.hbone.settings import CLIENT_HTTP2, SERVER_HTTP2, Http2Settings, MiB


def wire(out: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(x) for x in out)


def pump(src: core.TunnelConnection, dst: core.TunnelConnection) -> list[core.Event]:
    return dst.receive(wire(src.take_output()))


def pair() -> tuple[core.TunnelConnection, core.TunnelConnection]:
    client = core.TunnelConnection(client_side=True, settings=CLIENT_HTTP2)
    server = core.TunnelConnection(client_side=False, settings=SERVER_HTTP2)
    client.initiate()
    server.initiate()
    pump(client, server)
    pump(server, client)
    pump(client, server)  # SETTINGS ACK
    return client, server


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", (len(payload) << 8) | kind, flags, stream) + payload


def data_of(events: list[core.Event], stream_id: int) -> bytes:
    return b"".join(
        bytes(e.data)
        for e in events
        if isinstance(e, core.DataReceived) and e.stream_id == stream_id
    )


def open_tunnel(client: core.TunnelConnection, server: core.TunnelConnection) -> int:
    sid = client.open_stream("10.0.0.1:8080", [("forwarded", 'for="10.0.0.2:4000"')])
    (request,) = [e for e in pump(client, server) if isinstance(e, core.RequestReceived)]
    assert request.stream_id == sid
    headers = dict(request.headers)
    assert headers[b":method"] == b"CONNECT" and headers[b":authority"] == b"10.0.0.1:8080"
    assert headers[b"forwarded"] == b'for="10.0.0.2:4000"'
    assert b":path" not in headers and b":scheme" not in headers
    server.respond(sid, 200)
    (response,) = [e for e in pump(server, client) if isinstance(e, core.ResponseReceived)]
    assert response.status == 200 and not response.end_stream
    return sid


def test_connect_then_bytes_both_ways_then_half_close_each_way() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    assert client.send_data(sid, b"ping") == 4
    assert data_of(pump(client, server), sid) == b"ping"
    client.end_stream(sid)  # the client's FIN
    assert [type(e) for e in pump(client, server)] == [core.StreamEnded]
    # Half-closed: the server can still send.
    assert server.send_data(sid, b"pong") == 4
    assert data_of(pump(server, client), sid) == b"pong"
    server.end_stream(sid)
    assert [type(e) for e in pump(server, client)] == [core.StreamEnded]
    assert client.open_streams == 0 and server.open_streams == 0


def test_reset_reaches_the_other_side_with_its_code() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    server.reset_stream(sid, ErrorCodes.CONNECT_ERROR)
    (reset,) = pump(server, client)
    assert reset == core.StreamReset(sid, ErrorCodes.CONNECT_ERROR, remote=True)
    assert client.send_data(sid, b"x") == 0, "nothing is sent on a reset stream"


def test_refusal_ends_the_stream_and_tells_the_client_to_stop() -> None:
    client, server = pair()
    sid = client.open_stream("10.0.0.1:1")
    pump(client, server)
    server.respond(sid, 401)
    events = pump(server, client)
    assert core.ResponseReceived(sid, 401, [(b":status", b"401")], True) in events
    assert core.StreamReset(sid, ErrorCodes.NO_ERROR, remote=True) in events


def test_our_settings_are_istios() -> None:
    server_peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server_peer.initiate_connection()
    client = core.TunnelConnection(client_side=True, settings=CLIENT_HTTP2)
    client.initiate()
    server_peer.receive_data(wire(client.take_output()))
    remote = server_peer.remote_settings
    assert remote.initial_window_size == 4 * MiB
    assert remote.max_frame_size == 1 * MiB
    assert remote.max_concurrent_streams == 100
    assert remote.max_header_list_size == 16 * 1024
    assert remote.enable_push == 0
    # The connection window is raised to 16 MiB right after the preface.
    assert server_peer.outbound_flow_control_window == 16 * MiB

    client_peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client_peer.initiate_connection()
    server = core.TunnelConnection(client_side=False, settings=SERVER_HTTP2)
    server.initiate()
    server.receive(client_peer.data_to_send())
    client_peer.receive_data(wire(server.take_output()))
    assert client_peer.remote_settings.max_concurrent_streams == 200
    assert client_peer.remote_settings.max_header_list_size == 64 * 1024


def test_interop_with_h2_as_the_client() -> None:
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    server = core.TunnelConnection(client_side=False, settings=SERVER_HTTP2)
    server.initiate()
    server.receive(peer.data_to_send())
    peer.receive_data(wire(server.take_output()))
    server.receive(peer.data_to_send())
    peer.send_headers(1, [(":method", "CONNECT"), (":authority", "1.2.3.4:80")])
    (request,) = server.receive(peer.data_to_send())
    assert isinstance(request, core.RequestReceived)
    server.respond(1, 200)
    peer.receive_data(wire(server.take_output()))
    peer.send_data(1, b"a" * 60_000)
    peer.end_stream(1)
    events = server.receive(peer.data_to_send())
    assert data_of(events, 1) == b"a" * 60_000
    assert isinstance(events[-1], core.StreamEnded)
    server.release(1, 60_000)
    assert server.send_data(1, b"b" * 2_000_000) == 65535, "h2's default window bounds us"
    server.end_stream(1)
    received = peer.receive_data(wire(server.take_output()))
    got = b"".join(e.data for e in received if isinstance(e, h2.events.DataReceived))
    assert got == b"b" * 65535
    assert any(isinstance(e, h2.events.StreamEnded) for e in received)


def test_interop_with_h2_as_the_server_and_its_window_updates() -> None:
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    client = core.TunnelConnection(client_side=True, settings=CLIENT_HTTP2)
    client.initiate()
    peer.receive_data(wire(client.take_output()))
    client.receive(peer.data_to_send())
    sid = client.open_stream("1.2.3.4:80")
    peer.receive_data(wire(client.take_output()))
    peer.send_headers(sid, [(":status", "200")])
    client.receive(peer.data_to_send())
    sent = client.send_data(sid, b"z" * 100_000)
    assert sent == 65535
    events = peer.receive_data(wire(client.take_output()))
    received = sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived))
    assert received == 65535
    # Our sends respect the peer's 16 KiB frame size.
    peer.acknowledge_received_data(received, sid)
    peer.increment_flow_control_window(100_000)
    (opened, *_rest) = client.receive(peer.data_to_send())
    assert isinstance(opened, core.WindowOpened)
    assert client.stream_send_window(sid) > 0


def test_data_arrives_whole_whatever_the_chunking() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    payload = bytes(range(256)) * 4000  # 1 MiB minus a bit: one frame
    client.send_data(sid, payload)
    blob = wire(client.take_output())
    got = bytearray()
    for i in range(0, len(blob), 7919):
        got += data_of(server.receive(blob[i : i + 7919]), sid)
    assert bytes(got) == payload


@settings(max_examples=60, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=40),
    sizes=st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=6),
)
def test_any_split_of_the_byte_stream_gives_the_same_events(
    cuts: list[int], sizes: list[int]
) -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    expected = b""
    for i, n in enumerate(sizes):
        chunk = bytes([i % 251]) * n
        client.send_data(sid, chunk)
        expected += chunk
    client.ping(b"12345678")
    client.end_stream(sid)
    blob = wire(client.take_output())
    events: list[core.Event] = []
    pos = 0
    for cut in cuts:
        events += server.receive(blob[pos : pos + cut])
        pos += cut
    events += server.receive(blob[pos:])
    assert data_of(events, sid) == expected
    assert isinstance(events[-1], core.StreamEnded)


def test_padded_data_is_delivered_without_its_padding() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    padded = frame(core.DATA, core.FLAG_PADDED, sid, bytes([5]) + b"hello" + b"\0" * 5)
    events = server.receive(padded[:12]) + server.receive(padded[12:])
    assert data_of(events, sid) == b"hello"


def test_window_is_given_back_only_when_released() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    window = SERVER_HTTP2.stream_window
    assert client.send_data(sid, b"x" * (window + 10)) == window
    pump(client, server)
    assert client.stream_send_window(sid) == 0
    assert client.send_data(sid, b"more") == 0
    assert pump(server, client) == [], "nothing was released yet"
    server.release(sid, window // 2)
    opened = pump(server, client)
    assert core.WindowOpened(sid) in opened
    assert client.stream_send_window(sid) == window // 2


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (frame(core.DATA, 0, 0, b"x"), ErrorCodes.PROTOCOL_ERROR),
        (frame(core.DATA, 0, 99, b"x"), ErrorCodes.PROTOCOL_ERROR),  # idle stream
        (frame(core.WINDOW_UPDATE, 0, 0, b"\0\0\0"), ErrorCodes.FRAME_SIZE_ERROR),
        (frame(core.WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), ErrorCodes.PROTOCOL_ERROR),
        (
            frame(core.WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1)),
            ErrorCodes.FLOW_CONTROL_ERROR,
        ),
        (struct.pack(">IBI", ((2 * MiB) << 8) | core.DATA, 0, 1), ErrorCodes.FRAME_SIZE_ERROR),
        (frame(0x4, 0, 0, b"\0\0\0"), ErrorCodes.FRAME_SIZE_ERROR),  # SETTINGS not 6n
        (
            frame(core.HEADERS, 0, 1, b"\x82") + frame(core.DATA, 0, 1, b"x"),
            ErrorCodes.PROTOCOL_ERROR,
        ),  # DATA where a CONTINUATION must come
        (frame(core.DATA, core.FLAG_PADDED, 1, b""), ErrorCodes.PROTOCOL_ERROR),
    ],
)
def test_malformed_frames_end_the_connection_with_the_right_goaway(raw: bytes, code: int) -> None:
    _client, server = pair()
    with pytest.raises(ProtocolViolation) as info:
        server.receive(raw)
    assert info.value.error_code == code
    goaway = wire(server.take_output())
    assert goaway[3] == 0x7, "a GOAWAY frame"
    assert struct.unpack(">I", goaway[13:17])[0] == code
    assert server.closed


def test_data_beyond_the_stream_window_resets_only_that_stream() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    other = open_tunnel(client, server)
    window = SERVER_HTTP2.stream_window
    events = server.receive(frame(core.DATA, 0, sid, b"x" * 16384) * (window // 16384 + 1))
    assert core.StreamReset(sid, ErrorCodes.FLOW_CONTROL_ERROR, remote=False) in events
    client.send_data(other, b"still fine")
    assert data_of(pump(client, server), other) == b"still fine"


def test_data_beyond_the_connection_window_is_a_connection_error() -> None:
    small = Http2Settings(connection_window=65535, stream_window=65535)
    client = core.TunnelConnection(client_side=True, settings=CLIENT_HTTP2)
    server = core.TunnelConnection(client_side=False, settings=small)
    client.initiate()
    server.initiate()
    pump(client, server)
    pump(server, client)
    sids = [open_tunnel(client, server) for _ in range(2)]
    server.receive(frame(core.DATA, 0, sids[0], b"x" * 60000))
    with pytest.raises(ProtocolViolation) as info:
        server.receive(frame(core.DATA, 0, sids[1], b"x" * 10000))
    assert info.value.error_code == ErrorCodes.FLOW_CONTROL_ERROR


def test_data_after_end_stream_resets_that_stream() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    client.end_stream(sid)
    pump(client, server)
    # RFC 9113 5.1: a stream error STREAM_CLOSED; the connection lives on.
    events = server.receive(frame(core.DATA, 0, sid, b"late"))
    assert events == [core.StreamReset(sid, ErrorCodes.STREAM_CLOSED, remote=False)]
    rst = wire(server.take_output())
    assert rst[3] == 0x3 and struct.unpack(">I", rst[9:13])[0] == ErrorCodes.STREAM_CLOSED
    assert not server.closed


def test_late_data_on_a_stream_we_reset_is_ignored_and_the_window_kept() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    server.reset_stream(sid, ErrorCodes.CANCEL)
    server.take_output()
    before = server.recv_window
    events = server.receive(frame(core.DATA, 0, sid, b"x" * 1000))
    assert data_of(events, sid) == b""
    assert server.recv_window == before - 1000
    # The dropped bytes count as released: enough of them send a WINDOW_UPDATE.
    server.release(0, SERVER_HTTP2.connection_window // 4)
    assert any(bytes(b)[3:4] == b"\x08" for b in server.take_output())


def test_oversized_header_lists_are_refused() -> None:
    client, server = pair()
    sid = client.open_stream("1.2.3.4:80", [("x-big", "a" * 70_000)])
    with pytest.raises(ProtocolViolation) as info:
        pump(client, server)
    assert info.value.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert sid == 1


def test_peer_settings_change_frame_size_and_windows() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    assert client.peer_max_frame_size == 1 * MiB
    client.send_data(sid, b"x" * (2 * MiB))
    out = client.take_output()
    headers = [bytes(b) for b in out if len(b) == 9]
    assert all(struct.unpack(">I", b"\0" + h[:3])[0] <= 1 * MiB for h in headers)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    c2 = core.TunnelConnection(client_side=True, settings=CLIENT_HTTP2)
    c2.initiate()
    peer.receive_data(wire(c2.take_output()))
    peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100})
    events = c2.receive(peer.data_to_send())
    assert any(isinstance(e, core.SettingsChanged) for e in events)
    s2 = c2.open_stream("1.2.3.4:1")
    assert c2.stream_send_window(s2) == 100
