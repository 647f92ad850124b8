"""What happens to a stream that reaches the waypoint: find its filter chain, then serve it.

The HBONE CONNECT's ``:authority`` is the original destination (a service's
VIP and port, or a pod's IP and port for a pod bound to the waypoint as a
workload): the ``waypoint`` listener's filter chain for it says whether
the stream carries HTTP (an HTTP connection manager: the router serves each
request) or bytes (``tcp_proxy``: relayed to an endpoint of the cluster, or,
for an ORIGINAL_DST cluster, to the authority itself, which must be the one
pod the chain names). A destination without a chain is refused with 503
before any byte flows, and before the waypoint has its configuration every
stream is refused (fail closed: no config, no forwarding). The chain's network
RBAC filters decide first, on the connection alone (:mod:`waypoint.authz`): a
denied stream is accepted and reset at once, nothing dialled, nothing relayed
(Envoy closes such a connection; it decides on the first byte, we need none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

from mesh.hbone import ConnectRequest, LocalSocket, PlainProtocol, Refused
from waypoint import authz
from waypoint.config.model import Cluster, Endpoint, FilterChain, HttpManager, TcpProxy
from waypoint.config.snapshot import WaypointConfig
from waypoint.http.h2server import AutoServer
from waypoint.router import Router
from waypoint.telemetry import Telemetry
from waypoint.upstream.pool import ClusterRuntime, ConnectFailed, Upstreams

log = logging.getLogger("waypoint.proxy")
LISTENER = "waypoint"


class Relay(asyncio.Protocol):
    """One end of a byte relay; ``peer`` is the other end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Relay | None = None
        self.early: list[bytes] = []
        self.early_eof = False
        self.bytes = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def join(self, peer: Relay) -> None:
        self.peer = peer
        peer.peer = self
        for end in (self, peer):
            other = end.peer
            assert other is not None
            for data in end.early:
                other.send(data)
            end.early.clear()
            if end.early_eof:
                other.send_eof()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.send(data)

    def eof_received(self) -> bool:
        if self.peer is None:
            self.early_eof = True
        else:
            self.peer.send_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if exc is not None:
                peer.transport.abort()
            else:
                peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Reset(asyncio.Protocol):
    """A stream RBAC denied: reset as soon as it is attached."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


def original_destination(
    chain: FilterChain, cluster: Cluster, host: str, port: int
) -> Endpoint | str:
    """Where an ORIGINAL_DST cluster sends a connection to ``host:port`` that came in
    by ``chain``: that very address, if the chain names it as a whole host (the pod
    it serves), or a reason to refuse it: such a cluster never sends elsewhere."""
    original = cluster.original_dst
    if original is None:
        return f"cluster {cluster.name} is not an ORIGINAL_DST cluster"
    if not chain.names_host(host):
        return (
            f"{host}:{port} is not the destination filter chain {chain.name} serves "
            f"(cluster {cluster.name} relays only to the pod address its chain names)"
        )
    return original.endpoint(host, port)


class WaypointProxy:
    """The HBONE handler of the waypoint (``HboneServer(handler=proxy.connect)``)."""

    def __init__(
        self,
        config: Callable[[], WaypointConfig],
        upstreams: Upstreams,
        router: Router,
        *,
        logger: logging.Logger = log,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self.upstreams = upstreams
        self.router = router
        self.telemetry = telemetry  # Istio's TCP metrics of the relayed connections
        self.log = logger
        self.streams = 0

    def chain(self, host: str, port: int) -> FilterChain | None:
        listener = self.config().listeners.get(LISTENER)
        return listener.chain_for(host, port) if listener is not None else None

    async def connect(self, request: ConnectRequest) -> PlainProtocol:
        config = self.config()
        if not config.synced:
            raise Refused(503, "the waypoint has no configuration yet")
        chain = self.chain(request.host, request.port)
        if chain is None:
            raise Refused(
                503,
                f"{request.authority} is not a destination of this waypoint "
                "(no service or workload bound to it has that address and port)",
            )
        info: dict[str, Any] = {
            "peer": request.peer_address,
            "peer_identity": str(request.peer_identity),
            "authority": request.authority,
            "source_ip": request.peer_address.rsplit(":", 1)[0],
            "chain": chain.name,
        }
        forwarded = request.headers.get("forwarded", "")
        if 'for="' in forwarded:
            info["source_ip"] = forwarded.split('for="', 1)[1].split('"', 1)[0].rsplit(":", 1)[0]
        self.streams += 1
        if chain.rbac:
            verdict = authz.check(chain.rbac, authz.Attributes(authz.connection(info)))
            if not verdict.allowed:
                self.log.debug(
                    "waypoint: %s from %s (%s) closed: %s",
                    request.authority,
                    info["source_ip"],
                    info["peer_identity"],
                    authz.response_detail(verdict.policy or "none"),
                )
                return LocalSocket(_Reset(), {"peername": request.peer_address})
        handler = chain.handler
        if isinstance(handler, HttpManager):
            manager = handler
            server = AutoServer(lambda exchange: self.router.handle(exchange, manager), info)
            return LocalSocket(server, {"peername": request.peer_address})
        return await self._tcp(handler, chain, request)

    async def _tcp(
        self, proxy: TcpProxy, chain: FilterChain, request: ConnectRequest
    ) -> PlainProtocol:
        runtime = self.upstreams.clusters.get(proxy.cluster)
        if runtime is None:
            raise Refused(503, f"cluster {proxy.cluster} is not known")
        if runtime.cluster.original_dst is not None:
            target = original_destination(chain, runtime.cluster, request.host, request.port)
            if isinstance(target, str):
                raise Refused(503, target)
            return await self._relay(runtime, target, request, chain)
        host = runtime.balancer.choose(self.router.rng)
        if host is None:
            raise Refused(503, f"no healthy upstream in {proxy.cluster}")
        try:
            return await self._relay(runtime, host.endpoint, request, chain)
        except Refused:
            runtime.record(host, 0)
            raise

    async def _relay(
        self,
        runtime: ClusterRuntime,
        endpoint: Endpoint,
        request: ConnectRequest,
        chain: FilterChain,
    ) -> PlainProtocol:
        downstream = Relay()
        try:
            upstream = await runtime.connector.open(
                endpoint, runtime.cluster.connect_timeout_s, Relay
            )
        except ConnectFailed as e:
            raise Refused(503, f"{endpoint.address}: {e}") from e
        downstream.join(upstream)
        if (telemetry := self.telemetry) is not None:
            labels = telemetry.tcp_labels(
                str(request.peer_identity or ""),
                chain.name,
                runtime.cluster.name,
                endpoint.workload,
                endpoint.identity,
            )
            handler = chain.handler
            stats = handler.stats if isinstance(handler, TcpProxy) else None
            peer = str(request.peer_identity or "")
            telemetry.tcp_opened_with(labels, stats, peer, chain.name)

            def closed(_: object) -> None:
                if downstream.closed.done() and upstream.closed.done():
                    telemetry.tcp_closed_with(
                        labels, upstream.bytes, downstream.bytes, stats, peer, chain.name
                    )

            downstream.closed.add_done_callback(closed)
            upstream.closed.add_done_callback(closed)
        return LocalSocket(downstream, {"peername": request.peer_address})


async def serve_http(
    proxy: WaypointProxy, host: str, port: int, authority: str, *, peer_identity: str = ""
) -> asyncio.Server:
    """A plaintext HTTP listener in front of the chain for ``authority`` (tests, benchmarks,
    the Envoy differential test): what an HBONE stream to that destination would get, from
    a client whose HBONE identity is ``peer_identity`` ("" for none). The chain's network
    RBAC filters are not applied here (meshd puts none ahead of an HTTP manager)."""
    dest_host, _, dest_port = authority.rpartition(":")
    info = {"authority": authority}
    if peer_identity:
        info["peer_identity"] = peer_identity
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.Protocol:
        chain = proxy.chain(dest_host, int(dest_port))
        if chain is None or not isinstance(chain.handler, HttpManager):
            raise ConnectionRefusedError(f"no HTTP chain for {authority}")
        manager = chain.handler
        info["chain"] = chain.name
        return AutoServer(lambda exchange: proxy.router.handle(exchange, manager), info)

    server = await loop.create_server(factory, host, port)
    return server


async def drain(router: Router, timeout_s: float) -> None:
    """Let the requests in flight finish, up to ``timeout_s``."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while router.active:  # noqa: ASYNC110 - polled once, at shutdown
                await asyncio.sleep(0.05)
