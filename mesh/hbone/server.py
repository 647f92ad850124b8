"""The HBONE server: terminate mTLS, accept CONNECT streams, hand each to a handler.

The handler decides (policy, destination lookup) and opens the upstream
socket, or refuses with a status; ``200`` is sent only once the upstream is
connected. TLS runs in :mod:`mesh.hbone.tlsio`, so a failed or stalled
handshake (no certificate, a foreign CA, an expired certificate, a client
that never finishes) is logged with the peer's address and the reason, and
never disturbs the other connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mesh.hbone import connection as core
from mesh.hbone.channel import Channel, PlainProtocol
from mesh.hbone.errors import ConnectionLost, Refused
from mesh.hbone.headers import parse_authority
from mesh.hbone.settings import SERVER_HTTP2, HboneConfig, Http2Settings
from mesh.hbone.tls import TlsIdentity
from mesh.hbone.tlsio import TlsTransport
from mesh.hbone.tunnel import TunnelProtocol
from mesh.identity import SpiffeId

log = logging.getLogger("mesh.hbone.server")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRequest:
    """One accepted CONNECT, as the handler sees it."""

    peer_identity: SpiffeId
    peer_address: str
    authority: str
    host: str
    port: int
    headers: dict[str, str] = field(default_factory=dict)
    stream_id: int = 0


Handler = Callable[[ConnectRequest], Awaitable[PlainProtocol]]


async def open_upstream(
    host: str,
    port: int,
    *,
    timeout_s: float | None = None,
    local_addr: tuple[str, int] | None = None,
) -> PlainProtocol:
    """Connect a plaintext upstream socket for a tunnel; raises :class:`Refused` (503).

    Inside an :class:`HboneServer` handler no ``timeout_s`` is needed: the
    server bounds the whole handler by ``HboneConfig.connect_timeout_s``.
    """
    loop = asyncio.get_running_loop()
    try:
        if timeout_s is None:
            _, protocol = await loop.create_connection(
                PlainProtocol, host, port, local_addr=local_addr
            )
        else:
            async with asyncio.timeout(timeout_s):
                _, protocol = await loop.create_connection(
                    PlainProtocol, host, port, local_addr=local_addr
                )
    except TimeoutError as e:
        raise Refused(503, f"upstream {host}:{port} did not answer within {timeout_s}s") from e
    except OSError as e:
        raise Refused(503, f"upstream {host}:{port} refused: {e.strerror or e}") from e
    return protocol


class ServerTunnel(TunnelProtocol):
    client_side = False

    def __init__(self, server: HboneServer) -> None:
        super().__init__(settings=server.http2, config=server.config, logger=server.log)
        self.server = server
        self._tasks: set[asyncio.Task[None]] = set()
        self._deadlines: dict[asyncio.Task[None], float] = {}
        self._timed_out: set[asyncio.Task[None] | None] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def check_peer(self, identity: SpiffeId) -> None:
        expected = self.server.trust_domain
        if identity.trust_domain != expected:
            raise ConnectionLost(
                f"client identity {identity} is from trust domain {identity.trust_domain!r}, "
                f"not ours ({expected!r})"
            )

    def started(self) -> None:
        self.server.tunnels.add(self)

    def connection_ended(self, reason: str) -> None:
        self.server.tunnels.discard(self)
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in self._tasks:
            task.cancel()

    def other_event(self, ev: core.Event) -> None:
        if isinstance(ev, core.RequestReceived):
            self._request(ev)

    def stream_reset(self, ev: core.StreamReset) -> None:
        pass

    def _request(self, ev: core.RequestReceived) -> None:
        headers: dict[str, str] = {}
        for k, v in ev.headers:
            name = k.decode("latin-1")
            headers[name] = (
                v.decode("latin-1")
                if name not in headers
                else (headers[name] + "," + v.decode("latin-1"))
            )
        method = headers.get(":method", "")
        authority = headers.get(":authority", "")
        if method != "CONNECT":
            self._refuse(ev.stream_id, 400, f"method {method!r} is not CONNECT")
            return
        try:
            host, port = parse_authority(authority)
        except ValueError as e:
            self._refuse(ev.stream_id, 400, str(e))
            return
        assert self.peer_identity is not None
        request = ConnectRequest(
            peer_identity=self.peer_identity,
            peer_address=self.peer,
            authority=authority,
            host=host,
            port=port,
            headers={k: v for k, v in headers.items() if not k.startswith(":")},
            stream_id=ev.stream_id,
        )
        channel = Channel(self, ev.stream_id)
        self.channels[ev.stream_id] = channel
        task = self.loop.create_task(self._serve(channel, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._deadlines[task] = self.loop.time() + self.config.connect_timeout_s
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    @property
    def _sweep_every(self) -> float:
        return max(0.05, self.config.connect_timeout_s / 4)

    def _sweep(self) -> None:
        """Cancel handlers that have not connected upstream within the timeout.

        One timer per connection rather than one per stream, as on the client.
        """
        self._sweeper = None
        now = self.loop.time()
        for task, deadline in list(self._deadlines.items()):
            if task.done():
                del self._deadlines[task]
            elif deadline <= now:
                del self._deadlines[task]
                self._timed_out.add(task)
                task.cancel()
        if self._deadlines and not self.closed:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def _refuse(self, stream_id: int, status: int, reason: str) -> None:
        self.log.info(
            "hbone: refused CONNECT from %s (%s) on stream %d: %d %s",
            self.peer,
            self.peer_identity,
            stream_id,
            status,
            reason,
        )
        self.conn.respond(stream_id, status)
        self.flush()

    async def _serve(self, channel: Channel, request: ConnectRequest) -> None:
        try:
            upstream = await self.server.handler(request)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task not in self._timed_out:
                raise
            self._timed_out.discard(task)
            reason = (
                f"no upstream connection to {request.authority} within "
                f"{self.config.connect_timeout_s:g}s"
            )
            if not channel.closed:
                channel.discard(reason)
                self._refuse(channel.stream_id, 503, reason)
            return
        except Refused as e:
            if not channel.closed:
                channel.discard(e.reason)
                self._refuse(channel.stream_id, e.status, e.reason)
            return
        except Exception as e:
            self.log.exception("hbone: handler failed for %s", request.authority)
            if not channel.closed:
                channel.discard(f"handler error: {e}")
                self._refuse(channel.stream_id, 503, f"handler error: {e}")
            return
        finally:
            self._deadlines.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        if channel.closed or self.closed:
            if upstream.transport is not None:
                upstream.transport.close()
            return
        self.conn.respond(channel.stream_id, 200)
        channel.attach(upstream)
        self.server.stream_started(channel, request)


class HboneServer:
    """Listens on a socket; one :class:`ServerTunnel` per accepted TLS connection."""

    def __init__(
        self,
        *,
        identity: TlsIdentity,
        handler: Handler,
        config: HboneConfig | None = None,
        http2: Http2Settings = SERVER_HTTP2,
        logger: logging.Logger = log,
        on_stream: Callable[[Channel, ConnectRequest], None] | None = None,
    ) -> None:
        self.identity = identity
        self.trust_domain = identity.trust_domain
        self.handler = handler
        self.config = config or HboneConfig()
        self.http2 = http2
        self.log = logger
        self.ssl_context = identity.server_context()
        self.tunnels: set[ServerTunnel] = set()
        self.handshakes_failed = 0
        self._on_stream = on_stream
        self._servers: list[asyncio.Server] = []

    def stream_started(self, channel: Channel, request: ConnectRequest) -> None:
        if self._on_stream is not None:
            self._on_stream(channel, request)

    async def listen(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
    ) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(self._accept, sock=sock, backlog=1024)
        else:
            server = await loop.create_server(
                self._accept, host, port, reuse_port=reuse_port, backlog=1024
            )
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        return bound[0], bound[1]

    def _accept(self) -> TlsTransport:
        return TlsTransport(
            self.ssl_context,
            server_side=True,
            app_factory=lambda: ServerTunnel(self),
            handshake_timeout_s=self.config.handshake_timeout_s,
            on_handshake_failed=self._handshake_failed,
        )

    def _handshake_failed(self, tls: TlsTransport, reason: str, exc: BaseException) -> None:
        self.handshakes_failed += 1
        self.log.warning("hbone: TLS handshake with %s failed: %s", tls.peer, reason)

    def stop_listening(self) -> None:
        """Accept no more connections; the live ones go on. (Closing the listening
        socket object would not do: the loop's server holds a reference to it.)"""
        for server in self._servers:
            server.close()

    async def close(self, *, drain_timeout_s: float | None = None) -> None:
        """Stop accepting, GOAWAY every connection, wait for streams, then close."""
        for server in self._servers:
            server.close()
        timeout = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        tunnels = list(self.tunnels)
        for tunnel in tunnels:
            tunnel.goaway("server shutting down")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Polling is fine here: it runs once, at shutdown.
        while any(t.channels for t in tunnels) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for tunnel in tunnels:
            tunnel.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.gather(*(t.done for t in tunnels))
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
