"""A plaintext listener whose every connection is tunnelled over HBONE.

What ``python -m mesh.hbone forward`` runs, and what tests and benchmarks use
as the client end of a tunnel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from mesh.hbone.channel import Channel, PlainProtocol, reset_transport
from mesh.hbone.headers import connect_headers, parse_authority
from mesh.hbone.pool import HboneClientPool, PoolKey

log = logging.getLogger("mesh.hbone.forward")


class Forwarder:
    """Accepts TCP on a local address; tunnels each connection to ``target`` via ``key``."""

    def __init__(
        self,
        pool: HboneClientPool,
        key: PoolKey,
        target: str,
        *,
        extra_headers: Sequence[tuple[str, str]] = (),
        logger: logging.Logger = log,
    ) -> None:
        parse_authority(target)
        self.pool = pool
        self.key = key
        self.target = target
        self.extra_headers = list(extra_headers)
        self.log = logger
        self.channels: set[Channel] = set()
        self.failures = 0
        self._server: asyncio.Server | None = None

    async def listen(
        self, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False
    ) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accepted, host, port, reuse_port=reuse_port, backlog=1024
        )
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    def _accepted(self) -> PlainProtocol:
        return _Accepted(self)

    def _start(self, plain: PlainProtocol) -> None:
        transport = plain.transport
        assert transport is not None
        transport.pause_reading()  # until the CONNECT is answered
        client = transport.get_extra_info("peername")
        headers = connect_headers(client=(client[0], client[1]) if client else None)

        def done(channel: Channel | None, error: BaseException | None) -> None:
            if channel is not None:
                self.channels.add(channel)
                channel.on_close(self.channels.discard)
                return
            self.failures += 1
            self.log.warning(
                "hbone forward: %s -> %s via %s:%d failed: %s",
                client,
                self.target,
                *self.key.destination,
                error,
            )
            if not transport.is_closing():
                reset_transport(transport)

        self.pool.open_bound(self.key, self.target, headers + self.extra_headers, plain, done)

    async def close(self, *, close_pool: bool = False) -> None:
        if self._server is not None:
            self._server.close()
        for channel in list(self.channels):
            channel.reset("forwarder closing")
        if self._server is not None:
            await self._server.wait_closed()
        if close_pool:
            await self.pool.close()


class _Accepted(PlainProtocol):
    """An accepted plaintext connection: its tunnel starts as soon as it exists."""

    def __init__(self, forwarder: Forwarder) -> None:
        super().__init__()
        self._forwarder = forwarder

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._forwarder._start(self)
