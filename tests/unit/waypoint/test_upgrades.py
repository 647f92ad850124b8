"""Through the waypoint: a WebSocket upgrade becomes a byte tunnel, and
``Expect: 100-continue`` is passed to the backend and its 100 passed back."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from controlplane.state import ServicePortInfo
from tests.support.l7world import service, world
from tests.support.waypoint_harness import config_for, waypoint
from tests.unit.hbone.conftest import run

AUTHORITY = "10.96.0.20:9080"
BACKEND = "127.0.0.41"


async def raw_backend(handle: object) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handle, BACKEND, 0)  # type: ignore[arg-type]
    return server, server.sockets[0].getsockname()[1]


def state_for(port: int) -> object:
    base = world()
    pods = tuple(replace(p, ip=BACKEND) for p in base.pods if p.name == "reviews-v2-a")
    reviews = service(
        "reviews",
        {"app": "reviews"},
        ports=(ServicePortInfo(port=9080, target_port=port, name="http"),),
    )
    namespaces = tuple(
        replace(ns, labels={k: v for k, v in ns.labels.items() if k != "istio.io/dataplane-mode"})
        for ns in base.namespaces
    )
    return replace(base, pods=pods, services=(reviews,), namespaces=namespaces)


async def read_head(reader: asyncio.StreamReader) -> list[str]:
    lines = []
    while (line := await reader.readline()) not in (b"\r\n", b""):
        lines.append(line.decode().strip())
    return lines


def test_a_websocket_upgrade_is_tunnelled() -> None:
    finished: list[bool] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        assert any(h.lower() == "upgrade: websocket" for h in head), head
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        )
        while data := await reader.read(1024):
            writer.write(b"echo:" + data)
            await writer.drain()
        finished.append(True)  # the client's close reached the backend through the tunnel
        writer.close()

    async def body() -> tuple[list[str], bytes]:
        server, port = await raw_backend(backend)
        try:
            async with waypoint(config_for(state_for(port)), AUTHORITY) as wp:  # type: ignore[arg-type]
                reader, writer = await asyncio.open_connection(*wp.address)
                writer.write(
                    b"GET /chat HTTP/1.1\r\nhost: reviews\r\nconnection: upgrade\r\n"
                    b"upgrade: websocket\r\nsec-websocket-version: 13\r\n\r\n"
                )
                head = await read_head(reader)
                writer.write(b"frame-1")
                first = await reader.readexactly(len(b"echo:frame-1"))
                writer.write_eof()
                rest = await reader.read()  # the backend's close comes back: the tunnel ends
                writer.close()
                assert rest == b""
                return head, first
        finally:
            server.close()
            await server.wait_closed()

    head, first = run(body)
    assert head[0].startswith("HTTP/1.1 101")
    assert "upgrade: websocket" in [h.lower() for h in head]
    assert first == b"echo:frame-1"
    assert finished == [True]


def test_expect_100_continue_goes_to_the_backend_and_back() -> None:
    seen: list[list[str]] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        seen.append(head)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        body = await reader.readexactly(5)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        writer.close()

    async def body() -> tuple[list[str], bytes]:
        server, port = await raw_backend(backend)
        try:
            async with waypoint(config_for(state_for(port)), AUTHORITY) as wp:  # type: ignore[arg-type]
                reader, writer = await asyncio.open_connection(*wp.address)
                writer.write(
                    b"POST /upload HTTP/1.1\r\nhost: reviews\r\ncontent-length: 5\r\n"
                    b"expect: 100-continue\r\n\r\n"
                )
                interim = await read_head(reader)
                writer.write(b"hello")
                final = await read_head(reader)
                data = await reader.readexactly(5)
                writer.close()
                return interim + final, data
        finally:
            server.close()
            await server.wait_closed()

    heads, data = run(body)
    assert heads[0] == "HTTP/1.1 100 Continue"
    assert any(h.startswith("HTTP/1.1 200") for h in heads) and data == b"hello"
    assert "expect: 100-continue" in [h.lower() for h in seen[0]]
