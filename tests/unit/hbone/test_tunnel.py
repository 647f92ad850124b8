"""HBONE end to end on loopback: a client app, our forwarder, our server, an upstream.

What a user of the tunnel notices: bytes arrive intact both ways, half-close
and resets cross the tunnel, refusals carry their status, identities are
checked, connections are pooled, and one misbehaving peer never hurts others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from mesh.hbone import (
    ConnectRequest,
    Forwarder,
    HboneClientPool,
    HboneConfig,
    HboneServer,
    PeerIdentityMismatch,
    PlainProtocol,
    PoolKey,
    Refused,
    StatusError,
    TlsIdentity,
    open_upstream,
)
from mesh.hbone.errors import ConnectionLost
from mesh.hbone.settings import SERVER_HTTP2, Http2Settings
from mesh.identity import SpiffeId
from tests.unit.hbone.conftest import Pki, Upstream, echo, run

CLIENT_ID = SpiffeId.parse("spiffe://cluster.local/ns/client/sa/client")
FAST = HboneConfig(handshake_timeout_s=2, connect_timeout_s=5, pool_idle_timeout_s=30)


@dataclass
class Mesh:
    server: HboneServer
    pool: HboneClientPool
    address: tuple[str, int]
    requests: list[ConnectRequest] = field(default_factory=list)

    def key(self, *expected: SpiffeId) -> PoolKey:
        return PoolKey(
            source=self.pool_identity, destination=self.address, destination_identities=expected
        )

    pool_identity: SpiffeId = field(default_factory=lambda: CLIENT_ID)

    forwarders: list[Forwarder] = field(default_factory=list)

    async def forwarder(self, target: str, *expected: SpiffeId) -> tuple[Forwarder, int]:
        fwd = Forwarder(self.pool, self.key(*expected), target)
        _, port = await fwd.listen()
        self.forwarders.append(fwd)
        return fwd, port


@contextlib.asynccontextmanager
async def mesh(
    pki: Pki,
    *,
    server_identity: TlsIdentity | None = None,
    client_identity: TlsIdentity | None = None,
    config: HboneConfig = FAST,
    http2: Http2Settings = SERVER_HTTP2,
    deny: bool = False,
) -> AsyncIterator[Mesh]:
    requests: list[ConnectRequest] = []

    async def handler(request: ConnectRequest) -> PlainProtocol:
        requests.append(request)
        if deny:
            raise Refused(401, "denied by policy")
        return await open_upstream(request.host, request.port)

    server = HboneServer(
        identity=server_identity or pki.server, handler=handler, config=config, http2=http2
    )
    address = await server.listen()
    pool = HboneClientPool(identities=client_identity or pki.client, config=config)
    m = Mesh(server=server, pool=pool, address=address, requests=requests)
    if client_identity is not None:
        m.pool_identity = client_identity.identity
    try:
        yield m
    finally:
        for fwd in m.forwarders:
            await fwd.close()
        await pool.close()
        await server.close(drain_timeout_s=0.2)


async def talk(port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, read everything back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


def test_bytes_cross_both_ways_and_half_close_is_kept(pki: Pki) -> None:
    async def body() -> None:
        async with Upstream(echo) as up, mesh(pki) as m:
            _, port = await m.forwarder(up.authority)
            payload = bytes(range(256)) * 40_000  # 10 MB: many frames, windows refilled
            reply = await talk(port, payload)
            assert reply == payload + f"bye {len(payload)}".encode()
            # The upstream saw our EOF (it wrote "bye" only after it), and we
            # saw its EOF (read() returned): FIN crossed the tunnel both ways.

    run(body)


def test_the_handler_sees_identity_authority_and_headers(pki: Pki) -> None:
    async def body() -> None:
        async with Upstream(echo) as up, mesh(pki) as m:
            _, port = await m.forwarder(up.authority)
            assert await talk(port, b"hi") == b"hibye 2"
            (request,) = m.requests
            assert request.peer_identity == SpiffeId.parse(
                "spiffe://cluster.local/ns/client/sa/client"
            )
            assert request.authority == up.authority
            assert (request.host, request.port) == ("127.0.0.1", up.port)
            assert request.headers["forwarded"].startswith('for="127.0.0.1:')
            trace = request.headers["traceparent"].split("-")
            assert trace[0] == "00" and len(trace[1]) == 32 and len(trace[2]) == 16

    run(body)


def test_refusals_carry_their_status(pki: Pki) -> None:
    async def body() -> None:
        async with mesh(pki, deny=True) as m:
            with pytest.raises(StatusError) as denied:
                await m.pool.connect(m.key(), "127.0.0.1:9")
            assert denied.value.status == 401
            assert "denied by the destination's policy" in str(denied.value)
        async with mesh(pki) as m:
            with pytest.raises(StatusError) as bad:
                await m.pool.connect(m.key(), "not-an-ip:80")
            assert bad.value.status == 400
            closed = socket.socket()
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
            closed.close()
            with pytest.raises(StatusError) as unreachable:
                await m.pool.connect(m.key(), f"127.0.0.1:{port}")
            assert unreachable.value.status == 503
            # The connection survived all three refusals.
            assert len(m.pool.connections()) == 1

    run(body)


def test_a_server_with_the_wrong_identity_is_refused_naming_both(pki: Pki) -> None:
    async def body() -> None:
        async with mesh(pki, server_identity=pki.other_sa) as m:
            expected = SpiffeId.parse("spiffe://cluster.local/ns/server/sa/server")
            with pytest.raises(PeerIdentityMismatch) as info:
                await m.pool.connect(m.key(expected), "127.0.0.1:9")
            text = str(info.value)
            assert str(expected) in text
            assert "spiffe://cluster.local/ns/server/sa/impostor" in text
            assert m.server.tunnels == set() or all(not t.channels for t in m.server.tunnels)

    run(body)


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("foreign_ca", "certificate verify failed"),
        ("expired", "certificate has expired"),
        ("other_domain", "trust domain 'other.local'"),
    ],
)
def test_untrusted_clients_are_refused_with_a_log_line(
    pki: Pki, client: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    identity: TlsIdentity = getattr(pki, client)
    server_identity = pki.server_trusting_both if client == "other_domain" else pki.server

    async def body() -> None:
        async with (
            Upstream(echo) as up,
            mesh(pki, server_identity=server_identity, client_identity=identity) as m,
        ):
            with pytest.raises((ConnectionLost, PeerIdentityMismatch)):
                await m.pool.connect(m.key(), up.authority)
            # Everyone else is still served.
            good = HboneClientPool(identities=pki.client, config=FAST)
            key = PoolKey(source=pki.client.identity, destination=m.address)
            channel = await good.connect(key, up.authority)
            assert channel.stream_id == 1
            await good.close()

    with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
        run(body)
    lines = [r.getMessage() for r in caplog.records if "127.0.0.1" in r.getMessage()]
    assert any(reason in line for line in lines), lines


def test_a_client_without_a_certificate_is_refused(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with mesh(pki) as m:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.load_verify_locations(cadata=pki.ca.root_pem.decode())
            ctx.set_alpn_protocols(["h2"])
            reader, writer = await asyncio.open_connection(*m.address, ssl=ctx, server_hostname="")
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            with contextlib.suppress(ConnectionError, OSError):
                assert await reader.read() == b""
            writer.close()

    with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
        run(body)
    assert any(
        "TLS handshake with 127.0.0.1" in r.getMessage() and "certificate" in r.getMessage()
        for r in caplog.records
    )


def test_a_handshake_that_never_finishes_is_timed_out(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        config = HboneConfig(handshake_timeout_s=0.3)
        async with mesh(pki, config=config) as m:
            reader, writer = await asyncio.open_connection(*m.address)
            started = asyncio.get_running_loop().time()
            assert await reader.read() == b""  # the server hung up on us
            assert asyncio.get_running_loop().time() - started < 2
            writer.close()

    with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
        run(body)
    assert any("handshake not finished within 0.3s" in r.getMessage() for r in caplog.records)


def test_many_streams_share_one_connection_and_a_burst_shares_one_handshake(pki: Pki) -> None:
    async def body() -> None:
        async with Upstream(echo) as up, mesh(pki) as m:
            channels = await asyncio.gather(
                *(m.pool.connect(m.key(), up.authority) for _ in range(30))
            )
            assert m.pool.connections_opened == 1
            assert len({c.tunnel for c in channels}) == 1
            assert len(m.server.tunnels) == 1

    run(body)


def test_a_new_connection_opens_at_the_peers_stream_limit(pki: Pki) -> None:
    async def body() -> None:
        limited = Http2Settings(max_concurrent_streams=5)
        async with Upstream(echo) as up, mesh(pki, http2=limited) as m:
            first = await m.pool.connect(m.key(), up.authority)  # learns the peer's limit
            await asyncio.sleep(0.05)
            rest = [await m.pool.connect(m.key(), up.authority) for _ in range(11)]
            tunnels = {c.tunnel for c in [first, *rest]}
            assert len(tunnels) == 3  # 5 + 5 + 2
            assert all(len(t.channels) <= 5 for t in tunnels)

    run(body)


def test_our_own_stream_limit_opens_a_new_connection(pki: Pki) -> None:
    async def body() -> None:
        config = HboneConfig(pool_max_streams=4)
        async with Upstream(echo) as up, mesh(pki, config=config) as m:
            channels = [await m.pool.connect(m.key(), up.authority) for _ in range(9)]
            assert len({c.tunnel for c in channels}) == 3

    run(body)


def test_idle_connections_close_after_the_idle_timeout(pki: Pki) -> None:
    async def body() -> None:
        config = HboneConfig(pool_idle_timeout_s=0.2)
        async with Upstream(echo) as up, mesh(pki, config=config) as m:
            _, port = await m.forwarder(up.authority)
            assert await talk(port, b"x") == b"xbye 1"
            assert len(m.pool.connections()) == 1
            await asyncio.sleep(0.5)
            assert m.pool.connections() == []
            # And the next stream simply dials again.
            assert await talk(port, b"y") == b"ybye 1"
            assert m.pool.connections_opened == 2

    run(body)


def test_keepalive_pings_keep_a_quiet_connection_and_drop_a_silent_peer(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        config = HboneConfig(ping_interval_s=0.1, ping_timeout_s=0.35)
        async with Upstream(echo) as up, mesh(pki, config=config) as m:
            channel = await m.pool.connect(m.key(), up.authority)
            await asyncio.sleep(0.8)  # quiet, but both ends answer PINGs
            assert not channel.closed and not channel.tunnel.closed
            # A peer that completes TLS and then says nothing at all.
            import ssl

            ctx = pki.client.client_context()
            reader, writer = await asyncio.open_connection(*m.address, ssl=ctx, server_hostname="")
            with contextlib.suppress(ConnectionError, OSError):
                while await reader.read(65536):
                    pass  # read (and ignore) the server's SETTINGS and PINGs
            writer.close()
            del ssl

    with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
        run(body)
    assert any("peer silent for" in r.getMessage() for r in caplog.records)


def test_an_answer_and_the_fin_right_behind_it_reach_the_client_together(pki: Pki) -> None:
    """An HTTP server answering ``Connection: close`` writes its answer and closes at once.

    The client must find the FIN behind the answer when it reads it: if the
    FIN came later, the client would close first and keep the TIME_WAIT, one
    of its pod's ephemeral ports held for 60 s per connection (the mesh bench
    ran out of them within seconds). Here the app's bytes and FIN are in the
    kernel before the tunnel reads them, and the client reads the answer
    without giving the loop another turn.
    """

    async def body() -> None:
        loop = asyncio.get_running_loop()
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)

        async def app() -> None:
            conn, _ = await loop.sock_accept(listener)
            with conn:
                await loop.sock_recv(conn, 1024)
                conn.send(answer)  # both into the kernel before the loop turns
                conn.shutdown(socket.SHUT_WR)
                await loop.sock_recv(conn, 1024)  # the client's FIN

        serving = asyncio.ensure_future(app())
        async with mesh(pki) as m:
            _, port = await m.forwarder(f"127.0.0.1:{listener.getsockname()[1]}")
            client = socket.socket()
            client.setblocking(False)
            with client:
                await loop.sock_connect(client, ("127.0.0.1", port))
                await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                received = b""
                while len(received) < len(answer):
                    received += await loop.sock_recv(client, 1024)
                assert received == answer
                assert client.recv(1, socket.MSG_DONTWAIT) == b"", "the FIN came after the answer"
            await asyncio.wait_for(serving, 3)
        listener.close()

    run(body)


def test_a_server_that_stops_listening_refuses_new_connections_and_keeps_live_ones(
    pki: Pki,
) -> None:
    async def body() -> None:
        async with Upstream(echo) as up, mesh(pki) as m:
            _, port = await m.forwarder(up.authority)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"before")
            assert await asyncio.wait_for(reader.readexactly(6), 3) == b"before"
            m.server.stop_listening()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*m.address)
            writer.write(b" and after")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 3) == b" and afterbye 16"
            writer.close()

    run(body)


def test_a_reset_crosses_the_tunnel_as_a_reset(pki: Pki) -> None:
    async def body() -> None:
        reset_seen = asyncio.Event()

        async def wait_for_reset(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            try:
                await reader.read()
            except ConnectionResetError:
                reset_seen.set()

        async with Upstream(wait_for_reset) as up, mesh(pki) as m:
            _, port = await m.forwarder(up.authority)
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            await writer.drain()
            await asyncio.sleep(0.1)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await asyncio.wait_for(reset_seen.wait(), 3)

    run(body)


def test_an_upstream_reset_reaches_the_client_as_a_reset(pki: Pki) -> None:
    async def body() -> None:
        async def reset_after_hello(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await reader.readexactly(5)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

        async with Upstream(reset_after_hello) as up, mesh(pki) as m:
            _, port = await m.forwarder(up.authority)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 3)
            writer.close()

    run(body)


def test_a_slow_reader_holds_at_most_a_window_of_memory(pki: Pki) -> None:
    async def body() -> None:
        written = 0
        blocked = asyncio.Event()

        async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal written
            chunk = b"x" * 65536
            while True:
                writer.write(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                except TimeoutError:
                    blocked.set()
                    await asyncio.sleep(3600)
                written += len(chunk)

        async with Upstream(firehose) as up, mesh(pki) as m:
            _, port = await m.forwarder(up.authority)
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.wait_for(blocked.wait(), 10)
            (tunnel,) = m.server.tunnels
            (channel,) = tunnel.channels.values()
            # The upstream is stopped by TCP back-pressure, not buffered in us:
            # what left it is bounded by the stream window plus socket buffers.
            assert channel.window_blocked
            in_flight = channel.bytes_to_peer
            assert in_flight <= SERVER_HTTP2.stream_window + 8 * 1024 * 1024
            assert written < 64 * 1024 * 1024
            writer.close()

    run(body)


def test_a_peer_that_vanishes_mid_stream_resets_the_upstream_and_others_go_on(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        reset_seen = asyncio.Event()

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while await reader.read(65536):
                    pass
            except ConnectionResetError:
                reset_seen.set()

        async with Upstream(hold) as up, Upstream(echo) as up2, mesh(pki) as m:
            doomed = HboneClientPool(identities=pki.client, config=FAST)
            key = PoolKey(source=pki.client.identity, destination=m.address)
            channel = await doomed.connect(key, up.authority)
            await asyncio.sleep(0.05)
            assert channel.tunnel.transport is not None
            channel.tunnel.transport.abort()  # the peer is gone: no GOAWAY, no FIN
            await asyncio.wait_for(reset_seen.wait(), 3)
            _, port = await m.forwarder(up2.authority)
            assert await talk(port, b"still here") == b"still herebye 10"
            await doomed.close()

    with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
        run(body)
    assert any("lost" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)


def test_a_handler_that_never_connects_is_answered_503_in_time(pki: Pki) -> None:
    async def body() -> None:
        async def stuck(request: ConnectRequest) -> PlainProtocol:
            await asyncio.sleep(3600)
            raise AssertionError("not reached")

        config = HboneConfig(connect_timeout_s=0.3)
        server = HboneServer(identity=pki.server, handler=stuck, config=config)
        address = await server.listen()
        pool = HboneClientPool(identities=pki.client, config=HboneConfig(connect_timeout_s=5))
        key = PoolKey(source=pki.client.identity, destination=address)
        started = asyncio.get_running_loop().time()
        try:
            with pytest.raises(StatusError) as info:
                await pool.connect(key, "10.0.0.1:80")
            assert info.value.status == 503
            assert asyncio.get_running_loop().time() - started < 2
        finally:
            await pool.close()
            await server.close(drain_timeout_s=0.1)

    run(body)
