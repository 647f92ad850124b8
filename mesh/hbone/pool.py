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
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from mesh import netio
from mesh.hbone import connection as core
from mesh.hbone.channel import Channel, PlainProtocol
from mesh.hbone.errors import (
    ConnectionLost,
    HboneError,
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
ResponseCallback = Callable[[core.ResponseReceived | None, BaseException | None], None]


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
        self._responses: dict[int, ResponseCallback] = {}
        self._deadlines: dict[int, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
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

    def start_stream(
        self, authority: str, headers: Sequence[tuple[str, str]], done: ResponseCallback
    ) -> Channel:
        """Send a CONNECT; ``done(response, error)`` is called once with the outcome.

        Callbacks rather than futures: a new tunnelled connection is the
        busiest path of a ztunnel, and a task per connection was a visible
        share of its cost.
        """
        stream_id = self.conn.open_stream(authority, headers)
        self._cancel_idle()
        self._responses[stream_id] = done
        self._deadlines[stream_id] = self.loop.time() + self.config.connect_timeout_s
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)
        channel = Channel(self, stream_id)
        self.channels[stream_id] = channel
        self.flush()
        return channel

    async def open_stream(
        self, authority: str, headers: Sequence[tuple[str, str]]
    ) -> tuple[Channel, core.ResponseReceived]:
        future: asyncio.Future[core.ResponseReceived] = self.loop.create_future()

        def done(response: core.ResponseReceived | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                assert response is not None
                future.set_result(response)

        channel = self.start_stream(authority, headers, done)
        try:
            response = await future
        except BaseException:
            self._abandon(channel)
            raise
        if response.status != 200:
            channel.discard(f"CONNECT answered {response.status}")
            raise StatusError(response.status, authority, self.peer)
        return channel, response

    def _abandon(self, channel: Channel) -> None:
        self._responses.pop(channel.stream_id, None)
        self._deadlines.pop(channel.stream_id, None)
        channel.reset("CONNECT abandoned")

    def _settle(
        self,
        stream_id: int,
        response: core.ResponseReceived | None = None,
        error: BaseException | None = None,
    ) -> None:
        done = self._responses.pop(stream_id, None)
        self._deadlines.pop(stream_id, None)
        if done is not None:
            done(response, error)

    @property
    def _sweep_every(self) -> float:
        return max(0.05, self.config.connect_timeout_s / 4)

    def _sweep(self) -> None:
        """Fail CONNECTs unanswered past their deadline.

        One timer per connection instead of one per stream: timers were a
        measurable share of the cost of a new tunnelled connection.
        """
        self._sweeper = None
        now = self.loop.time()
        for stream_id, deadline in list(self._deadlines.items()):
            if deadline <= now:
                message = (
                    f"no answer to CONNECT from {self.peer} within "
                    f"{self.config.connect_timeout_s:g}s"
                )
                self._settle(stream_id, error=TimeoutError(message))
        if self._deadlines and not self.closed:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def other_event(self, ev: core.Event) -> None:
        if type(ev) is core.ResponseReceived:
            assert isinstance(ev, core.ResponseReceived)
            self._settle(ev.stream_id, response=ev)

    def stream_reset(self, ev: core.StreamReset) -> None:
        if ev.stream_id in self._responses:
            reason = f"CONNECT reset by {self.peer} before a response ({code_name(ev.error_code)})"
            self._settle(ev.stream_id, error=ConnectionLost(reason))

    def goaway_received(self, ev: core.GoAway) -> None:
        super().goaway_received(ev)
        for stream_id in [s for s in self._responses if s > ev.last_stream_id]:
            self._settle(stream_id, error=ConnectionLost(f"{self.peer} sent GOAWAY: {ev.reason}"))
        self.pool._forget(self)

    def stream_finished(self, channel: Channel) -> None:
        if not self.channels and not self._responses:
            self._schedule_idle()

    def connection_ended(self, reason: str) -> None:
        self._cancel_idle()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.conn.stats.frames_received == 0 and "alert" not in reason:
            # TLS 1.3 clients finish their handshake before the server has
            # checked their certificate; a refusal then looks like a hang-up.
            reason += " before HTTP/2 began (hint: did the peer refuse our certificate?)"
        error = self.failure or ConnectionLost(f"connection to {self.peer} ended: {reason}")
        for stream_id in list(self._responses):
            self._settle(stream_id, error=error)
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
        socket_factory: Callable[[], Awaitable[socket.socket]] | None = None,
    ) -> None:
        """``socket_factory`` makes the (unconnected) socket of each new connection, for a
        proxy that dials from inside a pod's network namespace with its mark."""
        self.socket_factory = socket_factory
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
        self._tasks: set[asyncio.Task[None]] = set()

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

    def open_bound(
        self,
        key: PoolKey,
        authority: str,
        headers: Sequence[tuple[str, str]],
        plain: PlainProtocol,
        done: Callable[[Channel | None, BaseException | None], None],
    ) -> None:
        """Tunnel the socket of ``plain``; ``done(channel, error)`` says how it went.

        When a pooled connection has room this runs without a task: the
        CONNECT goes out now and the socket is attached when the 200 comes.
        Otherwise a task dials first.
        """
        for tunnel in self._pools.get(key, ()):
            if tunnel.has_capacity:
                self._bind(tunnel, authority, headers, plain, done)
                return
        task = asyncio.get_running_loop().create_task(
            self._open_bound_slowly(key, authority, headers, plain, done)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_bound_slowly(
        self,
        key: PoolKey,
        authority: str,
        headers: Sequence[tuple[str, str]],
        plain: PlainProtocol,
        done: Callable[[Channel | None, BaseException | None], None],
    ) -> None:
        try:
            tunnel = await self._tunnel(key)
        except (HboneError, OSError) as e:
            done(None, e)
            return
        self._bind(tunnel, authority, headers, plain, done)

    def _bind(
        self,
        tunnel: ClientTunnel,
        authority: str,
        headers: Sequence[tuple[str, str]],
        plain: PlainProtocol,
        done: Callable[[Channel | None, BaseException | None], None],
    ) -> None:
        channel: Channel

        def answered(response: core.ResponseReceived | None, error: BaseException | None) -> None:
            if error is not None:
                channel.reset(str(error))
                done(None, error)
            elif response is not None and response.status != 200:
                channel.discard(f"CONNECT answered {response.status}")
                done(None, StatusError(response.status, authority, tunnel.peer))
            else:
                channel.attach(plain)
                done(channel, None)

        try:
            channel = tunnel.start_stream(authority, headers, answered)
        except core.TooManyStreams as e:
            done(None, ConnectionLost(str(e)))

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
                if self.socket_factory is None:
                    _, transport = await loop.create_connection(tls, host, port)
                else:
                    sock = await self.socket_factory()
                    try:
                        sock.setblocking(False)
                        await netio.connect(sock, (host, port))
                    except BaseException:
                        sock.close()
                        raise
                    _, transport = await loop.create_connection(tls, sock=sock)
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
        for task in list(self._tasks):
            task.cancel()
        tunnels = self.connections()
        self._pools.clear()
        for tunnel in tunnels:
            tunnel.goaway("client shutting down")
            tunnel.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(*(t.done for t in tunnels), return_exceptions=True)
