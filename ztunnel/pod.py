"""Everything ztunnel runs for one enrolled pod, inside the pod's network namespace.

Per pod: a worker thread that lives in the pod's namespace and makes its
sockets; the listeners on 15001 (outbound), 15006 (inbound plaintext) and
15008 (inbound HBONE); an HBONE client pool whose connections start in the
pod (so peers see the pod's own address) with ztunnel's mark; and the
pod's certificate. Connections are decided against the node's current
snapshot (:class:`~ztunnel.index.StateIndex`), never a stale one.

Fail closed: before the first xDS snapshot every connection is refused; a
destination the snapshot does not know is passed through only once the
snapshot exists; no certificate means the pod is not enrolled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import socket
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from mesh.hbone.channel import Channel, PlainProtocol, reset_transport
from mesh.hbone.errors import Refused
from mesh.hbone.headers import connect_headers
from mesh.hbone.pool import HboneClientPool, PoolKey
from mesh.hbone.server import ConnectRequest, HboneServer
from mesh.hbone.tls import TlsIdentity
from mesh.identity import SpiffeId
from mesh.identity.store import WorkloadCertificate
from mesh.model import Workload
from ztunnel import netns
from ztunnel.authz import Connection, authorize
from ztunnel.index import StateIndex
from ztunnel.route import Kind, route_outbound
from ztunnel.splice import Half, splice
from ztunnel.zds.protocol import PodInfo

log = logging.getLogger("ztunnel")
T = TypeVar("T")

OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT = 15001, 15006, 15008
SO_ORIGINAL_DST = 80
CONNECT_TIMEOUT_S = 10.0


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(packed), port


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
    ) -> None:
        self.uid = uid
        self.pod = pod
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
        self.connections = 0
        self.refused = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        specs = [
            netns.ListenSpec(OUTBOUND_PORT),
            netns.ListenSpec(INBOUND_PLAINTEXT_PORT),
            netns.ListenSpec(HBONE_PORT),
        ]
        outbound, plaintext, hbone = await self._in_pod(lambda: netns.listen_sockets(specs))
        self._listeners = [outbound, plaintext, hbone]
        await self.hbone.listen(sock=hbone)
        self._tasks = [
            asyncio.ensure_future(self._accept_loop(outbound, self._outbound)),
            asyncio.ensure_future(self._accept_loop(plaintext, self._inbound_plaintext)),
            asyncio.ensure_future(self._follow_certificate()),
        ]
        log.info("ztunnel: %s/%s enrolled as %s", self.pod.namespace, self.pod.name, self.identity)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.hbone.close(drain_timeout_s=1.0)
        await self.pool.close()
        for sock in self._listeners:
            sock.close()
        self._executor.shutdown(wait=False)
        os.close(self._fd)

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
                for sock in self._listeners:
                    sock.close()
                return
            if cert is not self._cert:
                self._cert, self.tls = cert, _tls(cert)
                self.hbone.identity = self.tls
                self.hbone.ssl_context = self.tls.server_context()

    # -- sockets made inside the pod -------------------------------------------------------

    async def _in_pod(self, make: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, make)

    async def _dial_socket(self) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, netns.INPOD_MARK)
            return s

        return await self._in_pod(make)

    async def _upstream(self, source_ip: str, host: str, port: int) -> socket.socket:
        """A connection to the app, from the client's own address (IP_TRANSPARENT)."""

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, netns.INPOD_MARK)
                s.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
                s.bind((source_ip, 0))
                s.setblocking(False)
            except BaseException:
                s.close()
                raise
            return s

        sock = await self._in_pod(make)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    # -- accepting -------------------------------------------------------------------------

    async def _accept_loop(
        self,
        listener: socket.socket,
        handle: Callable[[socket.socket, tuple[str, int]], object],
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as e:
                log.warning("ztunnel: accept on %s failed: %s", listener.getsockname(), e)
                await asyncio.sleep(0.1)
                continue
            self.connections += 1
            task = asyncio.ensure_future(self._guard(handle, sock, peer))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _guard(
        self,
        handle: Callable[[socket.socket, tuple[str, int]], object],
        sock: socket.socket,
        peer: tuple[str, int],
    ) -> None:
        try:
            result = handle(sock, peer)
            if asyncio.iscoroutine(result):
                await result
        except Exception as e:
            self.refused += 1
            log.warning(
                "ztunnel: %s/%s: connection from %s refused: %s",
                self.pod.namespace,
                self.pod.name,
                peer,
                e,
            )
            _reset(sock)

    def _workload(self, index: StateIndex) -> Workload | None:
        return index.workload_by_name(self.pod.namespace, self.pod.name)

    # -- outbound (15001) ------------------------------------------------------------------

    async def _outbound(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        dst_ip, dst_port = original_destination(sock)
        index = self.index()
        if not index.state.synced:
            raise ConnectionRefusedError("no xDS state yet: refusing rather than guessing")
        route = route_outbound(index, dst_ip, dst_port, random.choice)
        loop = asyncio.get_running_loop()
        if route.kind is Kind.REFUSE:
            raise ConnectionRefusedError(route.reason)
        if route.kind is Kind.PASSTHROUGH:
            upstream = await self._dial_socket()
            upstream.setblocking(False)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await loop.sock_connect(upstream, (route.connect_ip, route.connect_port))
            except BaseException:
                upstream.close()
                raise
            _, a = await loop.connect_accepted_socket(Half, sock)
            _, b = await loop.create_connection(Half, sock=upstream)
            splice(a, b)
            return
        assert route.expected_identity is not None
        key = PoolKey(
            source=self.identity,
            destination=(route.connect_ip, route.connect_port),
            destination_identities=(route.expected_identity,),
        )
        _, plain = await loop.connect_accepted_socket(PlainProtocol, sock)
        headers = connect_headers(client=peer)
        done: asyncio.Future[None] = loop.create_future()

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
            if not done.done():
                done.set_result(None)

        self.pool.open_bound(key, route.authority, headers, plain, bound)
        await done

    # -- inbound plaintext (15006) ---------------------------------------------------------

    async def _inbound_plaintext(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        dst_ip, dst_port = original_destination(sock)
        index = self.index()
        workload = self._workload(index)
        if workload is None:
            raise ConnectionRefusedError("this pod is not in the xDS state yet")
        decision = authorize(
            index,
            workload,
            Connection(
                source_identity=None,
                source_ip=ipaddress.ip_address(peer[0]),
                destination_ip=ipaddress.ip_address(dst_ip),
                destination_port=dst_port,
            ),
        )
        if not decision:
            raise PermissionError(f"{decision.reason} ({decision.policy or 'no policy'})")
        upstream = await self._upstream(peer[0], dst_ip, dst_port)
        loop = asyncio.get_running_loop()
        _, a = await loop.connect_accepted_socket(Half, sock)
        _, b = await loop.create_connection(Half, sock=upstream)
        splice(a, b)

    # -- inbound HBONE (15008) -------------------------------------------------------------

    async def _inbound_hbone(self, request: ConnectRequest) -> PlainProtocol:
        index = self.index()
        workload = self._workload(index)
        if workload is None:
            raise Refused(503, f"{self.pod.namespace}/{self.pod.name} is not in the xDS state yet")
        if all(str(a) != request.host for a in workload.addresses):
            raise Refused(400, f"{request.host} is not an address of this pod")
        source = request.peer_address.rsplit(":", 1)[0].strip("[]")
        decision = authorize(
            index,
            workload,
            Connection(
                source_identity=request.peer_identity,
                source_ip=ipaddress.ip_address(source),
                destination_ip=ipaddress.ip_address(request.host),
                destination_port=request.port,
            ),
        )
        if not decision:
            raise Refused(401, f"{decision.reason} ({decision.policy or 'no policy'})")
        try:
            upstream = await self._upstream(source, request.host, request.port)
        except (OSError, TimeoutError) as e:
            raise Refused(503, f"the app at {request.host}:{request.port}: {e}") from e
        _, plain = await asyncio.get_running_loop().create_connection(PlainProtocol, sock=upstream)
        return plain


def _tls(cert: WorkloadCertificate) -> TlsIdentity:
    return TlsIdentity(chain_pem=cert.chain_pem, key_pem=cert.key_pem, roots_pem=cert.root_pem)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
