"""A misbehaving peer on the wire: it is refused or closed with a clear log line,
with the right GOAWAY code, and the server goes on serving everyone else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes

from mesh.hbone import ConnectRequest, HboneServer, PlainProtocol, open_upstream
from mesh.hbone.settings import HboneConfig
from tests.unit.hbone.conftest import Pki, Upstream, echo, run
from tests.unit.hbone.test_tunnel import mesh, talk


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", (len(payload) << 8) | kind, flags, stream) + payload


class RawPeer:
    """A TLS client that speaks HTTP/2 through the h2 library, or raw bytes when asked."""

    def __init__(self, pki: Pki, address: tuple[str, int]) -> None:
        self.pki = pki
        self.address = address
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))

    async def __aenter__(self) -> RawPeer:
        ctx = self.pki.client.client_context()
        self.reader, self.writer = await asyncio.open_connection(
            *self.address, ssl=ctx, server_hostname=""
        )
        self.h2.initiate_connection()
        await self.send()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def send(self, raw: bytes = b"") -> None:
        self.writer.write(self.h2.data_to_send() + raw)
        await self.writer.drain()

    async def events(self, until: type, timeout_s: float = 3) -> list[h2.events.Event]:
        seen: list[h2.events.Event] = []
        async with asyncio.timeout(timeout_s):
            while not any(isinstance(e, until) for e in seen):
                data = await self.reader.read(65536)
                if not data:
                    break
                seen += self.h2.receive_data(data)
                await self.send()
        return seen


async def serve(pki: Pki) -> tuple[HboneServer, tuple[str, int]]:
    async def handler(request: ConnectRequest) -> PlainProtocol:
        return await open_upstream(request.host, request.port)

    server = HboneServer(identity=pki.server, handler=handler, config=HboneConfig())
    return server, await server.listen()


@pytest.mark.parametrize(
    ("raw", "code", "why"),
    [
        (frame(0x0, 0, 0, b"x"), ErrorCodes.PROTOCOL_ERROR, "stream 0"),
        (frame(0x8, 0, 0, b"\0\0\0"), ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE"),
        (frame(0x8, 0, 0, b"\0\0\0\0"), ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE of 0"),
        (
            struct.pack(">IBI", ((2 << 20) << 8) | 0, 0, 1),
            ErrorCodes.FRAME_SIZE_ERROR,
            "exceeds our SETTINGS_MAX_FRAME_SIZE",
        ),
        (frame(0x4, 0, 0, b"\0\0\0"), ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS"),
    ],
)
def test_malformed_frames_get_a_goaway_with_the_right_code(
    pki: Pki, raw: bytes, code: int, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with Upstream(echo) as up, mesh(pki) as m:
            good_fwd, good_port = await m.forwarder(up.authority)
            async with RawPeer(pki, m.address) as peer:
                await peer.send(raw)
                events = await peer.events(h2.events.ConnectionTerminated)
                (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
                assert goaway.error_code == code
                assert await peer.reader.read() == b"", "and the connection is closed"
            assert await talk(good_port, b"ok") == b"okbye 2"
            del good_fwd

    with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
        run(body)
    lines = [r.getMessage() for r in caplog.records if "peer broke HTTP/2" in r.getMessage()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0], lines
    assert why.lower() in lines[0].lower() or ErrorCodes(code).name in lines[0]


def test_an_oversized_header_list_is_refused(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with mesh(pki) as m, RawPeer(pki, m.address) as peer:
            peer.h2.send_headers(
                1, [(":method", "CONNECT"), (":authority", "1.2.3.4:80"), ("x-big", "a" * 100_000)]
            )
            await peer.send()
            events = await peer.events(h2.events.ConnectionTerminated)
            (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM

    with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
        run(body)
    assert any("header" in r.getMessage().lower() for r in caplog.records)


def test_a_request_that_is_not_connect_gets_400(pki: Pki) -> None:
    async def body() -> None:
        async with mesh(pki) as m, RawPeer(pki, m.address) as peer:
            peer.h2.send_headers(
                1,
                [
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/"),
                    (":authority", "1.2.3.4:80"),
                ],
                end_stream=True,
            )
            await peer.send()
            events = await peer.events(h2.events.ResponseReceived)
            (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
            assert dict(response.headers)[b":status"] == b"400"

    run(body)


def test_a_stalled_reader_does_not_stall_other_streams(pki: Pki) -> None:
    async def body() -> None:
        async with Upstream(echo) as up, mesh(pki) as m:
            # One stream's socket never reads: its window fills, the others flow.
            stuck = await m.pool.connect(m.key(), up.authority)
            stuck.plain_data(memoryview(b"x" * (8 << 20)))
            _, port = await m.forwarder(up.authority)
            for _ in range(5):
                assert await talk(port, b"fine") == b"finebye 4"

    run(body)


def test_a_peer_that_floods_pings_without_reading_is_cut_off(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        config = HboneConfig(max_write_buffer_bytes=256 * 1024)
        async with Upstream(echo) as up, mesh(pki, config=config) as m:
            _, port = await m.forwarder(up.authority)
            async with RawPeer(pki, m.address) as peer:
                sock = peer.writer.get_extra_info("socket")
                import socket as socketlib

                sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 4096)
                flood = frame(0x6, 0, 0, b"12345678") * 2000
                with contextlib.suppress(ConnectionError, OSError):
                    for _ in range(200):  # ~3 MB of PINGs, never reading the ACKs
                        peer.writer.write(flood)
                        await asyncio.wait_for(peer.writer.drain(), 2)
            assert await talk(port, b"ok") == b"okbye 2", "everyone else is still served"

    with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
        run(body)
    assert any("peer does not read" in r.getMessage() for r in caplog.records)
