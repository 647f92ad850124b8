"""The HBONE client: a pool of mTLS HTTP/2 connections carrying CONNECT streams.

Connections are pooled by :class:`PoolKey` (source identity, the identities
the destination may present, destination address), as ztunnel does. Many
streams share one connection; another connection opens when the current ones
are at their stream limit (ours, 100, or the peer's SETTINGS). A burst of
new streams to one key waits for a single handshake rather than opening one
connection each. A connection without streams closes after
``pool_idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.hbone import connection as core
from mesh.hbone.channel import Channel, PlainProtocol
from mesh.hbone.errors import (
    ConnectionLost,
    PeerIdentityMismatch,
    PoolClosed,
    StatusError,
)
from mesh.hbone.frames import code_name
from mesh.hbone.settings import CLIENT_HTTP2, HboneConfig, Http2Settings
from mesh.hbone.tls import TlsIdentity, describe_tls_error
from mesh.hbone.tlsio import TlsTransport
from mesh.hbone.tunnel import TunnelProtocol
from mesh.identity import SpiffeId

log = logging.getLogger("mesh.hbone.client")


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolKey:
    """What a pooled connection is for: who we are, who they must be, where they are."""

    source: SpiffeId
    destination: tuple[str, int]
    destination_identities: tuple[SpiffeId, ...] = ()

    def __str__(self) -> str:
        ids = ",".join(map(str, self.destination_identities)) or "*"
        return f"{self.source}->{self.destination[0]}:{self.destination[1]}[{ids}]"


class ClientTunnel(TunnelProtocol):
    client_side = True

    def __init__(self, pool: HboneClientPool, key: PoolKey, trust_domain: str) -> None:
        super().__init__(settings=pool.http2, config=pool.config, logger=pool.log)
        self.pool = pool
        self.key = key
        self.trust_domain = trust_domain
        self.failure: BaseException | None = None
        self.settings_received = False
        self._responses: dict[int, asyncio.Future[core.ResponseReceived]] = {}
        self._idle: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------- identity

    def check_peer(self, identity: SpiffeId) -> None:
        expected = self.key.destination_identities
        if expected and identity not in expected:
            raise PeerIdentityMismatch([str(i) for i in expected], str(identity), self.peer)
        if not expected and identity.trust_domain != self.trust_domain:
            raise PeerIdentityMismatch(
                [f"any identity in trust domain {self.trust_domain}"], str(identity), self.peer
            )

    def refuse_connection(self, reason: str, exc: BaseException | None = None) -> None:
        self.failure = self.failure or (
            exc if isinstance(exc, PeerIdentityMismatch) else ConnectionLost(reason)
        )
        super().refuse_connection(reason, exc)

    # ---------------------------------------------------------- capacity

    @property
    def max_streams(self) -> int:
        peer = self.conn.peer_max_concurrent_streams if self.conn.peer_settings_received else 100
        return max(0, min(self.pool.config.pool_max_streams, peer))

    @property
    def usable(self) -> bool:
        conn = self.conn
        return not (self.closed or conn.goaway_received or conn.goaway_sent or conn.closed) and (
            conn.stream_ids_left > 0
        )

    @property
    def has_capacity(self) -> bool:
        return self.usable and self.conn.open_streams < self.max_streams

    # ----------------------------------------------------------- streams

    async def open_stream(
        self, authority: str, headers: Sequence[tuple[str, str]]
    ) -> tuple[Channel, core.ResponseReceived]:
        stream_id = self.conn.open_stream(authority, headers)
        self._cancel_idle()
        future: asyncio.Future[core.ResponseReceived] = self.loop.create_future()
        self._responses[stream_id] = future
        channel = Channel(self, stream_id)
        self.channels[stream_id] = channel
        self.flush()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                response = await future
        except BaseException:
            self._responses.pop(stream_id, None)
            channel.reset("CONNECT abandoned")
            raise
        if response.status != 200:
            channel.discard(f"CONNECT answered {response.status}")
            raise StatusError(response.status, authority, self.peer)
        return channel, response

    def other_event(self, ev: core.Event) -> None:
        if isinstance(ev, core.ResponseReceived):
            future = self._responses.pop(ev.stream_id, None)
            if future is not None and not future.done():
                future.set_result(ev)
        elif isinstance(ev, core.SettingsChanged):
            self.settings_received = True

    def stream_reset(self, ev: core.StreamReset) -> None:
        future = self._responses.pop(ev.stream_id, None)
        if future is not None and not future.done():
            future.set_exception(
                ConnectionLost(
                    f"CONNECT reset by {self.peer} before a response ({code_name(ev.error_code)})"
                )
            )

    def goaway_received(self, ev: core.GoAway) -> None:
        super().goaway_received(ev)
        for stream_id in [s for s in self._responses if s > ev.last_stream_id]:
            future = self._responses.pop(stream_id)
            if not future.done():
                future.set_exception(ConnectionLost(f"{self.peer} sent GOAWAY: {ev.reason}"))
        self.pool._forget(self)

    def stream_finished(self, channel: Channel) -> None:
        if not self.channels and not self._responses:
            self._schedule_idle()

    def connection_ended(self, reason: str) -> None:
        self._cancel_idle()
        if self.conn.stats.frames_received == 0 and "alert" not in reason:
            # TLS 1.3 clients finish their handshake before the server has
            # checked their certificate; a refusal then looks like a hang-up.
            reason += " before HTTP/2 began (hint: did the peer refuse our certificate?)"
        error = self.failure or ConnectionLost(f"connection to {self.peer} ended: {reason}")
        for future in self._responses.values():
            if not future.done():
                future.set_exception(error)
        self._responses.clear()
        self.pool._forget(self)

    def _schedule_idle(self) -> None:
        self._cancel_idle()
        self._idle = self.loop.call_later(self.config.pool_idle_timeout_s, self._idle_close)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _idle_close(self) -> None:
        if not self.channels and not self._responses and not self.closed:
            self.log.debug("hbone: closing idle connection %s", self.key)
            self.pool._forget(self)
            self.goaway("idle")
            self.close()


class HboneClientPool:
    """Opens CONNECT streams to HBONE peers over pooled connections."""

    def __init__(
        self,
        *,
        identities: Callable[[SpiffeId], TlsIdentity] | TlsIdentity,
        config: HboneConfig | None = None,
        http2: Http2Settings = CLIENT_HTTP2,
        logger: logging.Logger = log,
    ) -> None:
        if isinstance(identities, TlsIdentity):
            single = identities
            self._identities: Callable[[SpiffeId], TlsIdentity] = lambda _: single
        else:
            self._identities = identities
        self.config = config or HboneConfig()
        self.http2 = http2
        self.log = logger
        self._pools: dict[PoolKey, list[ClientTunnel]] = {}
        self._dialing: dict[PoolKey, asyncio.Future[ClientTunnel]] = {}
        self._contexts: dict[int, tuple[TlsIdentity, ssl.SSLContext]] = {}
        self.connections_opened = 0
        self._closed = False

    async def connect(
        self,
        key: PoolKey,
        authority: str,
        headers: Sequence[tuple[str, str]] = (),
        plain: PlainProtocol | None = None,
    ) -> Channel:
        """Open a CONNECT stream; with ``plain``, bind it to that socket at once."""
        while True:
            if self._closed:
                raise PoolClosed("the HBONE client pool is closed")
            tunnel = await self._tunnel(key)
            try:
                channel, _ = await tunnel.open_stream(authority, headers)
            except core.TooManyStreams:
                continue  # the peer lowered its limit meanwhile: use another connection
            if plain is not None:
                channel.attach(plain)
            return channel

    async def _tunnel(self, key: PoolKey) -> ClientTunnel:
        while True:
            for tunnel in self._pools.get(key, ()):
                if tunnel.has_capacity:
                    return tunnel
            dialing = self._dialing.get(key)
            if dialing is None:
                dialing = asyncio.ensure_future(self._dial(key))
                self._dialing[key] = dialing
                dialing.add_done_callback(functools.partial(self._dial_done, key))
            tunnel = await asyncio.shield(dialing)
            if tunnel.has_capacity:
                return tunnel
            # Someone else filled the new connection first: look again.

    def _dial_done(self, key: PoolKey, _future: object) -> None:
        self._dialing.pop(key, None)

    async def _dial(self, key: PoolKey) -> ClientTunnel:
        identity = self._identities(key.source)
        ctx = self._context(identity)
        loop = asyncio.get_running_loop()
        host, port = key.destination

        def tls() -> TlsTransport:
            return TlsTransport(
                ctx,
                server_side=False,
                app_factory=lambda: ClientTunnel(self, key, identity.trust_domain),
                handshake_timeout_s=self.config.handshake_timeout_s,
            )

        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                _, transport = await loop.create_connection(tls, host, port)
                await transport.handshake
        except (OSError, TimeoutError) as e:
            raise ConnectionLost(
                f"cannot reach HBONE peer {host}:{port}: {describe_tls_error(e)}"
                + (
                    " (hint: is port 15008 blocked, e.g. by a NetworkPolicy?)"
                    if isinstance(e, ConnectionRefusedError | TimeoutError)
                    else ""
                )
            ) from e
        tunnel = transport.protocol
        if not isinstance(tunnel, ClientTunnel):
            raise ConnectionLost(f"connection to {host}:{port} closed right after the handshake")
        if tunnel.failure is not None:
            raise tunnel.failure
        self.connections_opened += 1
        self._pools.setdefault(key, []).append(tunnel)
        return tunnel

    def _context(self, identity: TlsIdentity) -> ssl.SSLContext:
        cached = self._contexts.get(id(identity))
        if cached is None or cached[0] is not identity:
            cached = (identity, identity.client_context())
            self._contexts[id(identity)] = cached
        return cached[1]

    def _forget(self, tunnel: ClientTunnel) -> None:
        tunnels = self._pools.get(tunnel.key)
        if tunnels and tunnel in tunnels:
            tunnels.remove(tunnel)
            if not tunnels:
                del self._pools[tunnel.key]

    def connections(self, key: PoolKey | None = None) -> list[ClientTunnel]:
        if key is not None:
            return list(self._pools.get(key, ()))
        return [t for ts in self._pools.values() for t in ts]

    async def close(self) -> None:
        self._closed = True
        tunnels = self.connections()
        self._pools.clear()
        for tunnel in tunnels:
            tunnel.goaway("client shutting down")
            tunnel.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(*(t.done for t in tunnels), return_exceptions=True)
