"""Everything ztunnel runs for one enrolled pod, inside the pod's network namespace.

Per pod: a worker thread that lives in the pod's namespace and makes its
sockets; the listeners on 15001 (outbound), 15006 (inbound plaintext),
15008 (inbound HBONE) and 15053 (DNS, UDP and TCP: :mod:`ztunnel.dns`);
an HBONE client pool whose connections start in the pod (so peers see the
pod's own address) with ztunnel's mark; and the pod's certificate.
Connections are decided against the node's current snapshot
(:class:`~ztunnel.index.StateIndex`), never a stale one.

Fail closed: before the first xDS snapshot every connection is refused; a
destination the snapshot does not know is passed through only once the
snapshot exists; no certificate means the pod is not enrolled.

Every inbound connection that authorization lets in (HBONE on 15008,
plaintext on 15006) stays registered, with the facts it was decided on,
until it ends. A new snapshot re-checks them (:meth:`PodProxy.recheck`,
the decision is :func:`ztunnel.authz.revoked`) and closes the ones it now
denies, as Istio's ztunnel does: an HBONE stream is reset (RST_STREAM to
the peer, a reset to the app); a plaintext client gets a TCP reset and the
app a close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ebpf.capture import NodeMaps
from mesh import netio
from mesh.hbone.channel import Channel, PlainProtocol, reset_transport
from mesh.hbone.errors import Refused
from mesh.hbone.headers import connect_headers, parse_baggage
from mesh.hbone.pool import HboneClientPool, PoolKey
from mesh.hbone.server import ConnectRequest, HboneServer
from mesh.hbone.tls import TlsIdentity
from mesh.identity import SpiffeId
from mesh.identity.store import WorkloadCertificate
from mesh.model import Workload
from ztunnel import netns
from ztunnel.authz import Connection, Decision, authorize, revoked
from ztunnel.baggage import SourceBaggage, inbound_service
from ztunnel.dns import DNS_PORT, DnsProxy, TableCache
from ztunnel.index import StateIndex
from ztunnel.podconns import (
    REFUSED_KIND,
    AppSide,
    Inbound,
    NoRoute,
    Outbound,
    addr,
    original_destination,
    refusal_kind,
    why,
)
from ztunnel.route import Kind, route_outbound
from ztunnel.splice import Half, splice
from ztunnel.telemetry import Conn, Telemetry
from ztunnel.zds.protocol import PodInfo

log = logging.getLogger("ztunnel")
T = TypeVar("T")

OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT = 15001, 15006, 15008
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h
CONNECT_TIMEOUT_S = 10.0


class PodProxy:
    def __init__(
        self,
        uid: str,
        pod: PodInfo,
        netns_fd: int,
        *,
        trust_domain: str,
        index: Callable[[], StateIndex],
        certificate: Callable[[], WorkloadCertificate | None],
        dns_upstreams: Sequence[tuple[str, int]] = (),
        dns_tables: TableCache | None = None,
        telemetry: Telemetry | None = None,
        bpf: NodeMaps | None = None,
    ) -> None:
        self.uid = uid
        # Captured by the node's eBPF programs (the destination asked for is in their
        # map, or the accepted socket's own address), else by iptables (SO_ORIGINAL_DST).
        self.bpf = bpf
        self.capture = "ebpf" if bpf is not None else "iptables"
        self.pod = pod
        self.key = f"{pod.namespace}/{pod.name}"
        self.telemetry = telemetry or Telemetry()
        self.identity = SpiffeId(
            trust_domain=trust_domain, namespace=pod.namespace, service_account=pod.service_account
        )
        self.index = index
        self._certificate = certificate
        cert = certificate()
        if cert is None:
            raise ConnectionRefusedError(f"no certificate for {self.identity}")
        self._cert = cert
        self.tls = _tls(cert)
        self._fd = os.dup(netns_fd)
        self._executor = ThreadPoolExecutor(
            max_workers=2,
            thread_name_prefix=f"pod-{pod.namespace}-{pod.name}",
            initializer=netns.enter,
            initargs=(self._fd,),
        )
        self.pool = HboneClientPool(identities=lambda _: self.tls, socket_factory=self._dial_socket)
        self.hbone = HboneServer(identity=self.tls, handler=self._inbound_hbone)
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._listeners: list[socket.socket] = []
        self._outbound_server: asyncio.AbstractServer | None = None
        self.inbound: set[Inbound] = set()  # live, allowed inbound connections
        self._passthrough: set[Half] = set()  # live outbound plain TCP (one Half each)
        self.dns = DnsProxy(
            state=index,
            pod_namespace=pod.namespace,
            upstreams=dns_upstreams,
            socket_factory=self._dns_socket,
            tables=dns_tables,
        )
        self.baggage = SourceBaggage()
        self.connections = 0
        self.refused = 0
        self.revoked = 0  # live connections a later snapshot denied

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        specs = [
            netns.ListenSpec(OUTBOUND_PORT),
            netns.ListenSpec(INBOUND_PLAINTEXT_PORT),
            netns.ListenSpec(HBONE_PORT),
            # The pod's DNS is REDIRECTed on OUTPUT, which sends it to 127.0.0.1: a
            # reply must leave from there for conntrack to turn it back into the
            # server the pod asked (a wildcard socket would answer from the pod IP).
            netns.ListenSpec(DNS_PORT, socket.SOCK_DGRAM, host="127.0.0.1"),
            netns.ListenSpec(DNS_PORT, host="127.0.0.1"),
        ]
        made = await self._in_pod(lambda: netns.listen_sockets(specs))
        outbound, plaintext, hbone, dns_udp, dns_tcp = made
        self._listeners = made
        await self.hbone.listen(sock=hbone)
        self._outbound_server = await asyncio.get_running_loop().create_server(
            lambda: Outbound(self), sock=outbound
        )
        self._tasks = [
            asyncio.ensure_future(self._accept_loop(plaintext, self._inbound_plaintext, "inbound")),
            asyncio.ensure_future(self.dns.serve_udp(dns_udp)),
            asyncio.ensure_future(self.dns.serve_tcp(dns_tcp)),
            asyncio.ensure_future(self._follow_certificate()),
        ]
        log.info("ztunnel: %s/%s enrolled as %s", self.pod.namespace, self.pod.name, self.identity)

    @property
    def netns_fd(self) -> int:
        """The pod's network namespace (ztunnel's own descriptor of it)."""
        return self._fd

    def live(self) -> int:
        """Connections still open: inbound, outbound over HBONE, outbound passthrough."""
        streams = sum(len(t.channels) for t in self.pool.connections())
        return len(self.inbound) + streams + len(self._passthrough)

    async def drain(self, deadline_s: float) -> None:
        """Stop accepting; give live connections up to ``deadline_s`` to end by themselves.

        HBONE peers are sent GOAWAY, so they open new streams elsewhere; what is
        still open at the deadline is closed by :meth:`close`.
        """
        for task in self._tasks:
            task.cancel()
        self._stop_listening()
        closing = asyncio.ensure_future(self.hbone.close(drain_timeout_s=deadline_s))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        while self.live() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await closing
        if self.live():
            log.info(
                "ztunnel: %s/%s: %d connections still open after %g s of draining",
                self.pod.namespace,
                self.pod.name,
                self.live(),
                deadline_s,
            )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._stop_listening()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.hbone.close(drain_timeout_s=1.0)
        await self.pool.close()
        for conn in list(self.inbound):
            conn.close("the pod left ztunnel")
        self.inbound.clear()
        for half in list(self._passthrough):
            if half.transport is not None:
                half.transport.close()
        self._executor.shutdown(wait=False)
        os.close(self._fd)

    def _stop_listening(self) -> None:
        """No new connections on any of the pod's ports (the live ones go on)."""
        if self._outbound_server is not None:
            self._outbound_server.close()
        self.hbone.stop_listening()
        for sock in self._listeners:
            sock.close()

    async def _follow_certificate(self, every_s: float = 30.0) -> None:
        """Take renewed certificates (renewal is at half life: a check every 30 s is
        plenty). With none left (expired, not renewed) the pod stops accepting."""
        while True:
            await asyncio.sleep(every_s)
            cert = self._certificate()
            if cert is None:
                log.error(
                    "ztunnel: %s has no valid certificate: closing its listeners", self.identity
                )
                self._stop_listening()
                return
            if cert is not self._cert:
                self._cert, self.tls = cert, _tls(cert)
                self.hbone.identity = self.tls
                self.hbone.ssl_context = self.tls.server_context()

    # -- sockets made inside the pod -------------------------------------------------------

    async def _in_pod(self, make: Callable[[], T]) -> T:
        """Slow or blocking work inside the pod: on the pod's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, make)

    def _in_pod_now(self, make: Callable[[], T]) -> T:
        """A socket for one connection: made on this thread, stepped into the pod for
        the two syscalls (a worker-thread hop costs tens of microseconds, and under load
        much more)."""
        return netns.in_netns_now(self._fd, make)

    async def _dial_socket(self) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, netns.INPOD_MARK)
            return s

        return self._in_pod_now(make)

    async def _dns_socket(self, family: int, kind: int) -> socket.socket:
        """An upstream DNS socket, in the pod and marked so capture lets it out."""

        def make() -> socket.socket:
            s = socket.socket(family, kind | socket.SOCK_CLOEXEC)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, netns.INPOD_MARK)
            return s

        return self._in_pod_now(make)

    async def _upstream(
        self, source_ip: str, host: str, port: int, *, bounded: bool = True
    ) -> socket.socket:
        """A connection to the app, from the client's own address (IP_TRANSPARENT).

        ``bounded``: within :data:`CONNECT_TIMEOUT_S` (off where the caller is bounded
        already: the HBONE server cancels a handler that has not connected in time).
        """

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, netns.INPOD_DELIVER_MARK)
                s.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
                # The port is picked at connect, by the whole 4-tuple: a bind to
                # (ip, 0) would search for a port free for every destination, which
                # gets slow once thousands of connections sit in TIME_WAIT (Envoy
                # sets this for its source-address binds too).
                s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((source_ip, 0))
                s.setblocking(False)
            except BaseException:
                s.close()
                raise
            return s

        sock = self._in_pod_now(make)
        try:
            if bounded:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await netio.connect(sock, (host, port))
            else:
                await netio.connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    # -- accepting -------------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket, handle: Handler, direction: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as e:
                log.warning("ztunnel: accept on %s failed: %s", listener.getsockname(), e)
                await asyncio.sleep(0.1)
                continue
            self.connections += 1
            task = asyncio.ensure_future(self._guard(handle, sock, peer, direction))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _guard(
        self, handle: Handler, sock: socket.socket, peer: tuple[str, int], direction: str
    ) -> None:
        # The handler fills in what it learns (destination, identities) as it goes,
        # so a refusal is logged with all that was known.
        conn = Conn(self.key, direction, "TCP", addr(peer), "-", "-")
        try:
            await handle(sock, peer, conn)
        except Exception as e:
            self.refused += 1
            log.debug("ztunnel: %s: connection from %s refused: %s", self.key, peer, e)
            self.telemetry.refuse(conn, str(e), refusal_kind(e))
            _reset(sock)

    def _workload(self, index: StateIndex) -> Workload | None:
        return index.workload_by_name(self.pod.namespace, self.pod.name)

    # -- live inbound connections, re-checked on every new snapshot ------------------------

    def recheck(self, index: StateIndex) -> int:
        """Authorize every live inbound connection again against ``index``; close the
        ones it denies (one log line each, naming the deciding policy). Returns how many."""
        if not self.inbound:
            return 0
        return self._close_denied(index, list(self.inbound))

    def _close_denied(self, index: StateIndex, live: list[Inbound]) -> int:
        destination = (self.pod.namespace, self.pod.name)
        closing = revoked(index, destination, ((c, c.facts) for c in live))
        for conn, decision in closing:
            self.inbound.discard(conn)
            self.revoked += 1
            reason = why(decision)
            log.warning(
                "ztunnel: %s/%s: closing live %s: %s",
                self.pod.namespace,
                self.pod.name,
                conn,
                reason,
            )
            conn.close(f"no longer authorized: {reason}")
        return len(closing)

    def _denied_now(self, facts: Connection, decided: StateIndex) -> Decision | None:
        """Whether a snapshot newer than ``decided`` (the one a new connection was let
        in on, before the awaits that connected its app) denies it; None if not."""
        current = self.index()
        if current is decided:
            return None
        workload = self._workload(current)
        if workload is None:
            return Decision(False, f"{self.pod.namespace}/{self.pod.name} left the xDS state")
        decision = authorize(current, workload, facts)
        return None if decision else decision

    # -- outbound (15001) ------------------------------------------------------------------

    def outbound_made(self, plain: Outbound) -> None:
        """A connection the pod made, accepted on 15001 (uvloop accepts in C and makes the
        transport): decided at once, no task and no await on the way to HBONE."""
        transport = plain.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        if peer is None:  # reset by the client before we looked: nothing to carry
            transport.abort()
            return
        self.connections += 1
        conn = Conn(self.key, "outbound", "TCP", addr(peer), "-", "-")
        try:
            self._outbound(plain, transport.get_extra_info("socket"), peer, conn)
        except Exception as e:
            self._refused(conn, peer, e)
            reset_transport(transport)

    def _refused(self, conn: Conn, peer: tuple[str, int], e: Exception) -> None:
        self.refused += 1
        log.debug("ztunnel: %s: connection from %s refused: %s", self.key, peer, e)
        self.telemetry.refuse(conn, str(e), refusal_kind(e))

    def _outbound(self, plain: Outbound, sock: Any, peer: tuple[str, int], conn: Conn) -> None:
        if self.bpf is not None:
            asked = self.bpf.original_destination(peer, sock.getsockname())
            if asked is None:
                raise ConnectionRefusedError("not redirected by the capture (no destination kept)")
            dst_ip, dst_port = asked
        else:
            dst_ip, dst_port = original_destination(sock)
        conn.original_dst = f"{dst_ip}:{dst_port}"
        conn.src_identity = str(self.identity)
        index = self.index()
        if not index.state.synced:
            raise ConnectionRefusedError("no xDS state yet: refusing rather than guessing")
        source = self._workload(index)
        conn.src_workload = source
        route = route_outbound(index, dst_ip, dst_port, random.choice, source=source)
        conn.dst_service, conn.dst_workload = route.service, route.destination
        if route.kind is Kind.REFUSE:
            raise NoRoute(route.reason)
        conn.actual_dst = f"{route.connect_ip}:{route.connect_port}"
        if route.kind is Kind.PASSTHROUGH:
            task = asyncio.ensure_future(
                self._pass_through(plain, peer, (route.connect_ip, route.connect_port), conn)
            )
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
            return
        assert route.expected_identity is not None
        conn.protocol, conn.dst_identity = "HBONE", str(route.expected_identity)
        key = PoolKey(
            source=self.identity,
            destination=(route.connect_ip, route.connect_port),
            destination_identities=(route.expected_identity,),
        )
        # baggage: who the source is (Istio's members) and the service it asked for
        # (ours), so the destination can label the connection (ztunnel.baggage).
        headers = connect_headers(
            client=peer, source_baggage=self.baggage.header(source, route.service)
        )

        def bound(channel: Channel | None, error: BaseException | None) -> None:
            if error is not None:
                log.warning(
                    "ztunnel: %s -> %s:%d via %s:%d: %s",
                    peer,
                    dst_ip,
                    dst_port,
                    route.connect_ip,
                    route.connect_port,
                    error,
                )
                if plain.transport is not None and not plain.transport.is_closing():
                    reset_transport(plain.transport)
                self.telemetry.refuse(conn, str(error), "upstream")
            elif channel is not None:
                stream = channel
                conn.counters = lambda: (stream.bytes_to_peer, stream.bytes_from_peer)
                self.telemetry.open(conn)
                stream.on_close(lambda _: self.telemetry.close(conn))

        self.pool.open_bound(key, route.authority, headers, plain, bound)

    async def _pass_through(
        self, plain: Outbound, peer: tuple[str, int], address: tuple[str, int], conn: Conn
    ) -> None:
        """Plain TCP to a destination outside the mesh: the accepted socket's bytes so
        far (``plain`` holds them, reading paused) go on through a splice."""
        transport = plain.transport
        assert transport is not None
        try:
            upstream = await self._dial_socket()
            upstream.setblocking(False)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await netio.connect(upstream, address)
            except BaseException:
                upstream.close()
                raise
        except Exception as e:
            self._refused(conn, peer, e)
            if not transport.is_closing():
                reset_transport(transport)
            return
        if transport.is_closing():  # the client gave up meanwhile
            upstream.close()
            return
        a = plain.hand_over()
        transport.set_protocol(a)
        a.connection_made(transport)
        _, b = await asyncio.get_running_loop().create_connection(Half, sock=upstream)
        splice(a, b)
        self._passthrough.add(a)
        conn.counters = lambda: (a.received, b.received)
        self.telemetry.open(conn)

        def passed(_: object) -> None:
            if a.closed.done() and b.closed.done():
                self._passthrough.discard(a)
                self.telemetry.close(conn)

        a.closed.add_done_callback(passed)
        b.closed.add_done_callback(passed)

    # -- inbound plaintext (15006) ---------------------------------------------------------

    async def _inbound_plaintext(
        self, sock: socket.socket, peer: tuple[str, int], conn: Conn
    ) -> None:
        if self.bpf is not None:
            # bpf_sk_assign hands the connection over as TPROXY does: the accepted
            # socket's own address is the one the client asked for.
            dst_ip, dst_port = sock.getsockname()[:2]
            if dst_port == INBOUND_PLAINTEXT_PORT:
                raise ConnectionRefusedError("a connection to 15006 itself is not served")
        else:
            dst_ip, dst_port = original_destination(sock)
        conn.original_dst = conn.actual_dst = f"{dst_ip}:{dst_port}"
        index = self.index()
        workload = self._workload(index)
        conn.dst_workload, conn.dst_identity = workload, str(self.identity)
        conn.src_workload = index.workload_by_ip(peer[0])
        if workload is None:
            raise ConnectionRefusedError("this pod is not in the xDS state yet")
        conn.dst_service = inbound_service(index, workload, dst_port, {})  # no baggage here
        facts = Connection(
            source_identity=None,
            source_ip=_ip(peer[0]),
            destination_ip=_ip(dst_ip),
            destination_port=dst_port,
        )
        decision = authorize(index, workload, facts)
        if not decision:
            raise PermissionError(why(decision))
        upstream = await self._upstream(peer[0], dst_ip, dst_port)
        loop = asyncio.get_running_loop()
        _, a = await loop.connect_accepted_socket(Half, sock)
        _, b = await loop.create_connection(Half, sock=upstream)
        splice(a, b)

        def close(reason: str) -> None:
            if a.transport is not None and not a.transport.is_closing():
                reset_transport(a.transport)  # the client gets a reset...
            if b.transport is not None and not b.transport.is_closing():
                b.transport.close()  # ...the app a close

        live = Inbound("plaintext", facts, close)
        conn.counters = lambda: (a.received, b.received)
        self.telemetry.open(conn)

        def ended(_: object) -> None:
            if a.closed.done() and b.closed.done():
                self.inbound.discard(live)
                self.telemetry.close(conn)

        self.inbound.add(live)
        a.closed.add_done_callback(ended)
        b.closed.add_done_callback(ended)
        # A snapshot may have come while the app was being connected: it decides.
        if self.index() is not index:
            self._close_denied(self.index(), [live])

    # -- inbound HBONE (15008) -------------------------------------------------------------

    async def _inbound_hbone(self, request: ConnectRequest) -> PlainProtocol:
        conn = Conn(
            self.key,
            "inbound",
            "HBONE",
            request.peer_address,
            f"{request.host}:{request.port}",
            f"{request.host}:{request.port}",
            src_identity=str(request.peer_identity or ""),
            dst_identity=str(self.identity),
        )
        try:
            return await self._inbound_hbone_conn(request, conn)
        except Refused as e:
            self.telemetry.refuse(conn, str(e), REFUSED_KIND.get(e.status, "refused"))
            raise

    async def _inbound_hbone_conn(self, request: ConnectRequest, conn: Conn) -> PlainProtocol:
        index = self.index()
        workload = self._workload(index)
        if workload is None:
            raise Refused(503, f"{self.pod.namespace}/{self.pod.name} is not in the xDS state yet")
        try:
            host_ip = _ip(request.host)
        except ValueError:
            host_ip = None
        if host_ip is None or host_ip not in workload.addresses:
            raise Refused(400, f"{request.host} is not an address of this pod")
        source = request.peer_address.rsplit(":", 1)[0].strip("[]")
        conn.dst_workload, conn.src_workload = workload, index.workload_by_ip(source)
        # The labels' service (and a source the index does not know) with the help of
        # the peer's baggage, bounded by the index: ztunnel.baggage.
        fields = parse_baggage(request.headers.get("baggage"))
        conn.dst_service = inbound_service(index, workload, request.port, fields)
        if conn.src_workload is None and fields:
            conn.src_workload = self.telemetry.derived_sources.derive(fields, request.peer_identity)
        facts = Connection(
            source_identity=request.peer_identity,
            source_ip=_ip(source),
            destination_ip=host_ip,
            destination_port=request.port,
        )
        decision = authorize(index, workload, facts)
        if not decision:
            raise Refused(401, why(decision))
        try:
            upstream = await self._upstream(source, request.host, request.port, bounded=False)
        except (OSError, TimeoutError) as e:
            raise Refused(503, f"the app at {request.host}:{request.port}: {e}") from e
        _, plain = await asyncio.get_running_loop().create_connection(
            lambda: AppSide(self.inbound, lambda: self.telemetry.close(conn)), sock=upstream
        )
        # A snapshot may have come while the app was being connected: it decides.
        # (No await from here until the server answers 200 and binds the stream.)
        denied = self._denied_now(facts, index)
        if denied is not None:
            assert plain.transport is not None
            reset_transport(plain.transport)
            raise Refused(401, why(denied))

        def close(reason: str) -> None:
            channel = plain.channel
            if channel is not None:
                channel.reset(reason)  # RST_STREAM to the peer, a reset to the app
            elif plain.transport is not None and not plain.transport.is_closing():
                reset_transport(plain.transport)

        def counters() -> tuple[int, int]:
            channel = plain.channel
            return (channel.bytes_from_peer, channel.bytes_to_peer) if channel else (0, 0)

        conn.counters = counters
        if not plain.lost:
            self.telemetry.open(conn)
            plain.live = Inbound("HBONE", facts, close)
            self.inbound.add(plain.live)
        return plain


Handler = Callable[[socket.socket, tuple[str, int], Conn], Awaitable[None]]
# Peers' and pods' addresses, parsed once each (immutable; bounded).
_ip = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)


def _tls(cert: WorkloadCertificate) -> TlsIdentity:
    return TlsIdentity(chain_pem=cert.chain_pem, key_pem=cert.key_pem, roots_pem=cert.root_pem)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
