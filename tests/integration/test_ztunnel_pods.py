"""ztunnel carrying real pod traffic over HBONE: capture, ZDS, xDS, mTLS, policy.

Pod namespaces on one bridge, each joined by a veth pair; the mesh's pods
are captured with the in-pod rules and handed to a ztunnel (in this
process) by the node agent over ZDS; meshd's feed comes from a real
in-process ADS server over gRPC; certificates from a local CA (the CA's own
path is tested with meshd). The apps are plain TCP sockets inside the pods
and never know.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest
from pyroute2 import IPRoute, NetNS, netns
from scapy.layers.inet import TCP
from scapy.sendrecv import AsyncSniffer

from controlplane.authz_yaml import parse_authorization_policy
from controlplane.state import (
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePortInfo,
    SourceState,
    frozen_labels,
)
from mesh.hbone import (
    CLIENT_HTTP2,
    ConnectionLost,
    Forwarder,
    HboneClientPool,
    HboneConfig,
    PoolKey,
    TlsIdentity,
)
from mesh.hbone.connection import TunnelConnection
from mesh.identity import CertificateAuthority, SpiffeId, generate_key_and_csr
from mesh.identity.store import WorkloadCertificate
from mesh.xds import XdsClient
from tests.integration.conftest import unique_name
from tests.unit.controlplane.test_ads import Meshd, meshd
from tests.unit.hbone.conftest import issue, run
from ztunnel import netns as pod_netns
from ztunnel.capture import inpod
from ztunnel.runtime import Ztunnel
from ztunnel.zds import protocol
from ztunnel.zds.agent import ZdsAgent

CLIENT_IP, SERVER_IP, OUTSIDE_IP = "10.250.0.1", "10.250.0.2", "10.250.0.3"
# A service VIP. In the pods' subnet, so the client pod has a route to it; the
# capture rules take the connection before any packet leaves.
BACKEND_VIP = "10.250.0.100"
SERVER_ID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/server")

pytestmark = pytest.mark.skipif(
    not (shutil.which("iptables-restore") and shutil.which("nsenter")),
    reason="needs iptables-restore (Debian package iptables) and nsenter (util-linux)",
)


@dataclass(frozen=True)
class PodSpec:
    name: str  # also its uid, for meshd and for ZDS
    ip: str
    namespace: str = "shop"
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    enrolled: bool = True  # in an ambient namespace: captured and handed to ztunnel


CLIENT = PodSpec("client", CLIENT_IP, service_account="client")
SERVER = PodSpec("server", SERVER_IP, service_account="server")
OUTSIDE = PodSpec("outside", OUTSIDE_IP, namespace="legacy", enrolled=False)
BASIC = (CLIENT, SERVER, OUTSIDE)
BACKENDS = tuple(
    PodSpec(
        f"backend{i}", f"10.250.0.{11 + i}", service_account="backend", labels={"app": "backend"}
    )
    for i in range(3)
)
BACKEND_SERVICE = ServiceInfo(
    name="backend",
    namespace="shop",
    cluster_ips=(BACKEND_VIP,),
    ports=(ServicePortInfo(port=80, target_port=8080),),
    selector=frozen_labels({"app": "backend"}),
)


@dataclass
class Pods:
    specs: tuple[PodSpec, ...]
    netns: dict[str, str]  # pod name -> the name of its network namespace
    bridge: str  # the wire between them

    @property
    def client(self) -> str:
        return self.netns["client"]

    @property
    def server(self) -> str:
        return self.netns["server"]

    @property
    def outside(self) -> str:
        return self.netns["outside"]


@contextlib.contextmanager
def pods(specs: tuple[PodSpec, ...] = BASIC) -> Iterator[Pods]:
    prefix = unique_name()
    bridge = f"{prefix}-br"
    names = Pods(specs, {spec.name: f"{prefix}-{spec.name}" for spec in specs}, bridge)
    made: list[str] = []
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=bridge, kind="bridge")
            br = ipr.link_lookup(ifname=bridge)[0]
            ipr.link("set", index=br, state="up")
            for i, spec in enumerate(specs):
                name = names.netns[spec.name]
                netns.create(name)
                made.append(name)
                host_end, pod_end = f"{prefix}-h{i}", f"{prefix}-p{i}"
                ipr.link("add", ifname=host_end, kind="veth", peer={"ifname": pod_end})
                h = ipr.link_lookup(ifname=host_end)[0]
                ipr.link("set", index=h, master=br, state="up")
                p = ipr.link_lookup(ifname=pod_end)[0]
                ipr.link("set", index=p, net_ns_fd=name, ifname="eth0")
                with NetNS(name) as ns:
                    ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                    eth = ns.link_lookup(ifname="eth0")[0]
                    ns.addr("add", index=eth, address=spec.ip, prefixlen=24)
                    ns.link("set", index=eth, state="up")
        yield names
    finally:
        for name in made:
            with contextlib.suppress(Exception):
                netns.remove(name)
        with IPRoute() as ipr, contextlib.suppress(Exception):
            ipr.link("del", ifname=bridge)


def world(
    policy: Mapping[str, Any] | None = None,
    *,
    specs: tuple[PodSpec, ...] = BASIC,
    services: tuple[ServiceInfo, ...] = (),
) -> SourceState:
    ambient = frozen_labels({"istio.io/dataplane-mode": "ambient"})
    return SourceState(
        namespaces=(NamespaceInfo(name="shop", labels=ambient), NamespaceInfo(name="legacy")),
        pods=tuple(
            PodInfo(
                uid=spec.name,
                name=spec.name,
                namespace=spec.namespace,
                node="n1",
                ip=spec.ip,
                service_account=spec.service_account,
                labels=frozen_labels(spec.labels),
            )
            for spec in specs
        ),
        services=services,
        policies=(
            (
                parse_authorization_policy(
                    {"metadata": {"name": "p", "namespace": "shop"}, "spec": policy}
                ),
            )
            if policy is not None
            else ()
        ),
    )


class Echo:
    """An app in a pod: answers with the address each message came from.

    With a ``name`` it says who answers; with ``keep_open`` it answers every
    message until the client ends, otherwise the first and hangs up. It
    notes the address of every connection it accepts.
    """

    def __init__(self, fd: int, *, name: str = "", keep_open: bool = False) -> None:
        self.fd = fd
        self.name = name
        self.keep_open = keep_open
        self.accepted: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 8080) -> None:
        def make() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(64)
            s.setblocking(False)
            return s

        sock = await asyncio.to_thread(pod_netns.in_netns, self.fd, make)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")[0]
            self.accepted.append(peer)
            who = f"{self.name}: " if self.name else ""
            try:
                while True:
                    data = await reader.read(100)
                    if self.keep_open and not data:
                        break
                    writer.write(f"{who}{peer} said {data.decode()}".encode())
                    await writer.drain()
                    if not self.keep_open:
                        break
            except ConnectionError:
                pass  # cut by ztunnel: what some tests are about
            finally:
                writer.close()

        self.server = await asyncio.start_server(answer, sock=sock)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def connect_from(fd: int, ip: str, port: int) -> socket.socket:
    """A socket connected from inside the pod of ``fd``, as its app would open it."""
    sock = await asyncio.to_thread(pod_netns.in_netns, fd, socket.socket)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(10):
            await asyncio.get_running_loop().sock_connect(sock, (ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def ask(fd: int, ip: str, port: int = 8080) -> bytes:
    """Connect from inside the pod of ``fd``, as its app would; the answer ('' if cut)."""
    try:
        sock = await connect_from(fd, ip, port)
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"hello")
            try:
                return await reader.read(200)
            except ConnectionResetError:
                return b""
            finally:
                writer.close()
    except ConnectionResetError:
        return b""


class Talk:
    """A connection an app in a pod keeps open, saying something now and then."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, fd: int, ip: str, port: int) -> Talk:
        sock = await connect_from(fd, ip, port)
        return cls(*await asyncio.open_connection(sock=sock))

    async def say(self, text: str) -> str:
        self.writer.write(text.encode())
        async with asyncio.timeout(5):
            return (await self.reader.read(200)).decode()

    async def ended(self, within_s: float) -> str:
        """How the connection ended ('reset' or 'eof'), waiting for it up to ``within_s``.

        Nothing is sent: the other side has to end it by itself.
        """
        async with asyncio.timeout(within_s):
            try:
                data = await self.reader.read(200)
            except ConnectionResetError:
                return "reset"
        assert data == b"", f"still open: it said {data!r}"
        return "eof"

    def close(self) -> None:
        self.writer.close()


@dataclass
class Mesh:
    control: Meshd
    ztunnel: Ztunnel
    fds: dict[str, int]  # network namespace name -> an open descriptor of it
    ca_dir: Path  # the mesh root (root-cert.pem, root-key.pem)
    specs: tuple[PodSpec, ...]
    services: tuple[ServiceInfo, ...]

    def publish(self, policy: Mapping[str, Any] | None) -> None:
        """meshd's world with ``policy`` as ``shop/p`` (or none)."""
        self.control.publish(world(policy, specs=self.specs, services=self.services))

    async def published(self, policy: Mapping[str, Any] | None) -> None:
        """Publish, and wait until ztunnel holds it."""
        self.publish(policy)
        action = None if policy is None else policy.get("action", "ALLOW")

        def held() -> bool:
            p = self.ztunnel.index().state.policies.get("shop/p")
            return (p.action.name if p is not None else None) == action

        async with asyncio.timeout(5):
            while not held():  # noqa: ASYNC110
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def mesh(
    tmp: Path, names: Pods, services: tuple[ServiceInfo, ...] = ()
) -> AsyncIterator[Mesh]:
    ca_dir = tmp / "ca"
    ca = CertificateAuthority.load_or_create(ca_dir, "cluster.local")

    async def fetch(identity: SpiffeId) -> WorkloadCertificate:
        key_pem, csr_pem = generate_key_and_csr(identity)
        issued = ca.sign_csr(csr_pem, identity, now=datetime.now(UTC))
        return WorkloadCertificate.from_issued(issued, key_pem)

    fds = {n: await asyncio.to_thread(_open, n) for n in names.netns.values()}
    enrolled = [spec for spec in names.specs if spec.enrolled]
    agent = ZdsAgent(tmp / "zds.sock")
    agent.start()
    async with meshd(world(specs=names.specs, services=services)) as control:
        xds = XdsClient(control.target, node_id="ztunnel~n1", backoff_initial_s=0.05)
        ztunnel = Ztunnel(xds=xds, fetch_certificate=fetch, zds_path=str(agent.path))
        task = asyncio.ensure_future(ztunnel.run())
        try:
            await xds.wait_synced(10)
            async with asyncio.timeout(10):
                await agent.proxy_ready.wait()
            for spec in enrolled:
                path = Path(f"/run/netns/{names.netns[spec.name]}")
                await asyncio.to_thread(inpod.install, path)
                info = protocol.PodInfo(spec.name, spec.namespace, spec.service_account)
                await agent.add(spec.name, info, path)
            yield Mesh(control, ztunnel, fds, ca_dir, names.specs, services)
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await agent.close()
            for spec in enrolled:
                with contextlib.suppress(Exception):
                    path = Path(f"/run/netns/{names.netns[spec.name]}")
                    await asyncio.to_thread(inpod.uninstall, path)
            for fd in fds.values():
                os.close(fd)


class Wire:
    """What crosses an interface, as it crosses (scapy sniffing on its own thread)."""

    def __init__(self, iface: str) -> None:
        self.packets: list[Any] = []
        self._started = threading.Event()
        self._sniffer = AsyncSniffer(
            iface=iface, store=False, prn=self.packets.append, started_callback=self._started.set
        )

    async def __aenter__(self) -> Wire:
        self._sniffer.start()
        # Only once its socket is open does it see everything: wait for that.
        assert await asyncio.to_thread(self._started.wait, 10), "the sniffer did not start"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._sniffer.stop()

    def tcp(self) -> list[Any]:
        return [p for p in list(self.packets) if TCP in p]

    async def until(
        self, seen: Callable[[list[Any]], bool], *, quiet_s: float = 0.3, timeout_s: float = 5
    ) -> list[Any]:
        """The TCP packets, once ``seen`` holds of them and the sniffer has caught up
        (nothing new for ``quiet_s``); a timeout otherwise."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            count, since = -1, loop.time()
            while True:
                tcp = self.tcp()
                if len(tcp) != count:
                    count, since = len(tcp), loop.time()
                elif loop.time() - since >= quiet_s and seen(tcp):
                    return tcp
                await asyncio.sleep(0.02)


def _open(name: str) -> int:
    return os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)


def test_pod_to_pod_goes_over_hbone_keeps_the_client_address_and_obeys_policy(
    tmp_path: Path,
) -> None:
    async def body(names: Pods) -> None:
        async with mesh(tmp_path, names) as m:
            ztunnel, fds = m.ztunnel, m.fds
            echo = Echo(fds[names.server])
            await echo.start()
            try:
                async with Wire(names.bridge) as wire:
                    answer = await ask(fds[names.client], SERVER_IP)
                    # Both ways, the answer included: TLS application data records.
                    tcp = await wire.until(
                        lambda tcp: sum(bytes(p[TCP].payload)[:1] == b"\x17" for p in tcp) >= 2
                    )
                # The app saw the client pod's own address: ztunnel kept it.
                assert answer == f"{CLIENT_IP} said hello".encode()
                # On the wire: TLS to 15008 only; the payload never in clear.
                assert {min(p[TCP].sport, p[TCP].dport) for p in tcp} == {15008}
                assert not any(b"hello" in bytes(p[TCP].payload) for p in tcp)
                server = ztunnel.pods["server"]
                client = ztunnel.pods["client"]
                assert client.pool.connections_opened == 1  # it went over HBONE
                assert len(server.hbone.tunnels) == 1  # ...and was taken in on 15008

                # A DENY for the client's identity: new connections are cut.
                deny = {
                    "action": "DENY",
                    "rules": [
                        {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}
                    ],
                }
                await m.published(deny)
                assert await ask(fds[names.client], SERVER_IP) == b""
                # The same port, allowed by name: through again.
                allow = {
                    "rules": [
                        {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}
                    ]
                }
                await m.published(allow)
                assert await ask(fds[names.client], SERVER_IP) == f"{CLIENT_IP} said hello".encode()
            finally:
                echo.close()

    with pods() as names:  # pyroute2's sync API runs outside the event loop
        run(lambda: body(names), timeout_s=60)


def test_a_pod_outside_the_mesh_is_reached_in_plaintext_and_reaches_in(tmp_path: Path) -> None:
    async def body(names: Pods) -> None:
        async with mesh(tmp_path, names) as m:
            outside = Echo(m.fds[names.outside])
            await outside.start()
            inside = Echo(m.fds[names.server])
            await inside.start()
            try:
                # Mesh client -> non-mesh pod: passthrough (plain TCP, as Istio), the
                # source kept; the sniffer sees the payload this time.
                async with Wire(names.bridge) as wire:
                    assert await ask(m.fds[names.client], OUTSIDE_IP) == (
                        f"{CLIENT_IP} said hello".encode()
                    )
                    await wire.until(
                        lambda tcp: any(b"hello" in bytes(p[TCP].payload) for p in tcp)
                    )
                assert m.ztunnel.pods["client"].pool.connections_opened == 0
                # Non-mesh client -> mesh pod: in through 15006, the source kept.
                assert await ask(m.fds[names.outside], SERVER_IP) == (
                    f"{OUTSIDE_IP} said hello".encode()
                )
            finally:
                outside.close()
                inside.close()

    with pods() as names:  # pyroute2's sync API runs outside the event loop
        run(lambda: body(names), timeout_s=60)


def test_a_new_deny_closes_the_live_connections_it_matches_and_no_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Istio's ztunnel re-checks live connections on a policy change: a DENY
    published while connections are open cuts those it matches (HBONE from a
    mesh pod, plaintext from outside), and leaves the others running."""

    async def body(names: Pods) -> None:
        async with mesh(tmp_path, names) as m:
            apps = [Echo(m.fds[names.server], keep_open=True) for _ in range(2)]
            await apps[0].start(8080)
            await apps[1].start(9090)
            talks: list[Talk] = []
            try:
                client, outside = m.fds[names.client], m.fds[names.outside]
                hbone = {p: await Talk.open(client, SERVER_IP, p) for p in (8080, 9090)}
                plain = {p: await Talk.open(outside, SERVER_IP, p) for p in (8080, 9090)}
                talks = [*hbone.values(), *plain.values()]
                for port in (8080, 9090):
                    assert await hbone[port].say("hi") == f"{CLIENT_IP} said hi"
                    assert await plain[port].say("hi") == f"{OUTSIDE_IP} said hi"
                server = m.ztunnel.pods["server"]
                assert len(server.inbound) == 4
                assert {c.kind for c in server.inbound} == {"HBONE", "plaintext"}

                # Port 8080 is closed to the client's identity and the outside pod's IP.
                deny = {
                    "action": "DENY",
                    "rules": [
                        {
                            "from": [
                                {"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}
                            ],
                            "to": [{"operation": {"ports": ["8080"]}}],
                        },
                        {
                            "from": [{"source": {"ipBlocks": [f"{OUTSIDE_IP}/32"]}}],
                            "to": [{"operation": {"ports": ["8080"]}}],
                        },
                    ],
                }
                m.publish(deny)
                assert await hbone[8080].ended(within_s=5) in ("reset", "eof")
                assert await plain[8080].ended(within_s=5) == "reset"
                # The others were not touched, and still talk, over the same HBONE
                # connection between the two ztunnels.
                assert await hbone[9090].say("still there?") == f"{CLIENT_IP} said still there?"
                assert await plain[9090].say("still there?") == f"{OUTSIDE_IP} said still there?"
                assert m.ztunnel.pods["client"].pool.connections_opened == 1
                assert len(server.hbone.tunnels) == 1
                assert server.revoked == 2
                assert sorted(c.facts.destination_port for c in server.inbound) == [9090, 9090]
                # A change that concerns none of them (the DENY gone) closes nothing.
                await m.published(None)
                assert await hbone[9090].say("and now?") == f"{CLIENT_IP} said and now?"
                assert server.revoked == 2
            finally:
                for talk in talks:
                    talk.close()
                for app in apps:
                    app.close()

    with caplog.at_level(logging.INFO, logger="ztunnel"), pods() as names:
        run(lambda: body(names), timeout_s=60)
    closing = [r.getMessage() for r in caplog.records if "closing live" in r.getMessage()]
    assert len(closing) == 2, closing  # one line per closed connection...
    assert all("denied by a DENY policy (shop/p)" in line for line in closing)  # ...naming it
    assert any(
        f"HBONE {CLIENT_IP} (spiffe://cluster.local/ns/shop/sa/client)" in c for c in closing
    )
    assert any(f"plaintext {OUTSIDE_IP} -> {SERVER_IP}:8080" in c for c in closing)


def test_peers_from_another_trust_domain_or_without_a_certificate_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Straight to the server pod's 15008 from the outside pod: a certificate of
    the mesh's own root gets through; the same root with a SPIFFE ID of another
    trust domain, or no certificate at all, never reaches the app."""

    async def body(names: Pods) -> None:
        async with mesh(tmp_path, names) as m:
            app = Echo(m.fds[names.server])
            await app.start()
            outside = m.fds[names.outside]
            server = m.ztunnel.pods["server"]
            config = HboneConfig(handshake_timeout_s=5, connect_timeout_s=5)

            async def dial() -> socket.socket:
                return await asyncio.to_thread(pod_netns.in_netns, outside, socket.socket)

            def pool(identity: TlsIdentity) -> tuple[HboneClientPool, PoolKey]:
                key = PoolKey(
                    source=identity.identity,
                    destination=(SERVER_IP, 15008),
                    # The client accepts the server: any refusal is the server's.
                    destination_identities=(SERVER_ID,),
                )
                return HboneClientPool(identities=identity, config=config, socket_factory=dial), key

            try:
                # The control: the mesh's root and trust domain, the same path in.
                ours = issue(
                    CertificateAuthority.load_or_create(m.ca_dir, "cluster.local"),
                    "spiffe://cluster.local/ns/legacy/sa/default",
                )
                good, key = pool(ours)
                forwarder = Forwarder(good, key, f"{SERVER_IP}:8080")
                _, port = await forwarder.listen()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"hello")
                async with asyncio.timeout(10):
                    assert await reader.read(200) == f"{OUTSIDE_IP} said hello".encode()
                writer.close()
                await forwarder.close(close_pool=True)
                assert app.accepted == [OUTSIDE_IP]

                # The same root, another trust domain.
                foreign = issue(
                    CertificateAuthority.load_or_create(m.ca_dir, "other.domain"),
                    "spiffe://other.domain/ns/x/sa/y",
                )
                assert foreign.roots_pem == ours.roots_pem
                bad, key = pool(foreign)
                try:
                    with pytest.raises(ConnectionLost):
                        await bad.connect(key, f"{SERVER_IP}:8080")
                finally:
                    await bad.close()

                # No certificate: the TLS handshake fails on the server's side. A
                # CONNECT is sent anyway; no byte of HTTP/2 comes back.
                failed = server.hbone.handshakes_failed
                sock = await connect_from(outside, SERVER_IP, 15008)
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.load_verify_locations(cadata=ours.roots_pem.decode())
                ctx.set_alpn_protocols(["h2"])
                h2 = TunnelConnection(client_side=True, settings=CLIENT_HTTP2)
                h2.initiate()
                h2.open_stream(f"{SERVER_IP}:8080")
                answer = b""
                tls: asyncio.StreamWriter | None = None
                try:
                    async with asyncio.timeout(10):
                        reader, tls = await asyncio.open_connection(
                            sock=sock, ssl=ctx, server_hostname=""
                        )
                        tls.write(b"".join(h2.take_output()))
                        answer = await reader.read()
                except (ConnectionError, ssl.SSLError):
                    pass  # how the refusal may show on this side: the server's alert
                finally:
                    if tls is not None:
                        tls.close()
                    sock.close()  # the transport's, or never handed over
                assert answer == b""
                assert server.hbone.handshakes_failed == failed + 1

                assert app.accepted == [OUTSIDE_IP]  # the app saw the control, no more
                assert server.inbound == set()
            finally:
                app.close()

    with caplog.at_level(logging.WARNING, logger="mesh.hbone"), pods() as names:
        run(lambda: body(names), timeout_s=60)
    lines = [r.getMessage() for r in caplog.records]
    assert any(OUTSIDE_IP in line and "trust domain 'other.domain'" in line for line in lines), (
        lines
    )
    assert any(
        f"TLS handshake with {OUTSIDE_IP}" in line and "certificate" in line for line in lines
    ), lines


def test_a_service_vip_spreads_connections_over_all_its_endpoints(tmp_path: Path) -> None:
    """A Service with three pods behind its VIP: every connection to VIP:80 gets
    through, over HBONE to an endpoint's 8080, and each endpoint gets some."""

    async def body(names: Pods) -> None:
        async with mesh(tmp_path, names, services=(BACKEND_SERVICE,)) as m:
            apps = [Echo(m.fds[names.netns[b.name]], name=b.name) for b in BACKENDS]
            for app in apps:
                await app.start(8080)
            try:
                client = m.fds[names.client]
                answers: list[bytes] = []
                for _ in range(6):  # 60 connections, 10 at a time
                    answers += await asyncio.gather(
                        *(ask(client, BACKEND_VIP, 80) for _ in range(10))
                    )
                said = [a.decode().split(": ", 1) for a in answers]
                assert all(rest == f"{CLIENT_IP} said hello" for _, rest in said), answers
                seen = {who for who, _ in said}
                assert seen == {b.name for b in BACKENDS}
                # Over HBONE: one pooled connection to each endpoint's ztunnel.
                assert m.ztunnel.pods["client"].pool.connections_opened == len(BACKENDS)
                for b in BACKENDS:
                    assert len(m.ztunnel.pods[b.name].hbone.tunnels) == 1
                assert sum(len(app.accepted) for app in apps) == len(answers) == 60
            finally:
                for app in apps:
                    app.close()

    with pods((CLIENT, *BACKENDS)) as names:
        run(lambda: body(names), timeout_s=90)


def test_draining_stops_new_connections_and_lets_live_ones_finish(tmp_path: Path) -> None:
    """SIGTERM's path: ztunnel stops accepting at once, live connections go on
    until they end or the deadline comes, and then the pods are let go."""

    async def body(names: Pods) -> None:
        async with mesh(tmp_path, names) as m:
            app = Echo(m.fds[names.server], keep_open=True)
            await app.start(8080)
            talk: Talk | None = None
            try:
                client = m.fds[names.client]
                talk = await Talk.open(client, SERVER_IP, 8080)
                assert await talk.say("hi") == f"{CLIENT_IP} said hi"
                drain = asyncio.ensure_future(m.ztunnel.drain(3.0))
                await asyncio.sleep(0.3)
                # A new connection finds nothing listening: refused, not let through.
                with pytest.raises(ConnectionRefusedError):
                    await ask(client, SERVER_IP)
                assert not drain.done()
                # The live one still works while draining...
                assert await talk.say("still?") == f"{CLIENT_IP} said still?"
                # ...and once its deadline has passed, ztunnel has let go of every pod.
                async with asyncio.timeout(8):
                    await drain
                assert m.ztunnel.pods == {}
                assert await talk.ended(within_s=3) in ("reset", "eof")
            finally:
                if talk is not None:
                    talk.close()
                app.close()

    with pods() as names:
        run(lambda: body(names), timeout_s=60)


def test_the_pods_dns_is_answered_by_ztunnel_for_service_names(tmp_path: Path) -> None:
    """Port 53 from a captured pod lands on ztunnel's 15053 in the pod: service
    names from the feed are answered there, whatever server the pod asked."""

    async def body(names: Pods) -> None:
        async with mesh(tmp_path, names, services=(BACKEND_SERVICE,)) as m:
            client = m.fds[names.client]
            name = f"{BACKEND_SERVICE.name}.{BACKEND_SERVICE.namespace}.svc.cluster.local."

            def resolve(transport: str) -> list[str]:
                def query() -> list[str]:
                    q = dns.message.make_query(name, "A")
                    send = dns.query.udp if transport == "udp" else dns.query.tcp
                    answer = send(q, "10.250.0.53", timeout=3)  # nobody there: captured
                    return [r.address for rrset in answer.answer for r in rrset]

                return pod_netns.in_netns(client, query)

            assert await asyncio.to_thread(resolve, "udp") == [BACKEND_VIP]
            assert await asyncio.to_thread(resolve, "tcp") == [BACKEND_VIP]
            assert m.ztunnel.pods["client"].dns.answered == 2

    with pods() as names:
        run(lambda: body(names), timeout_s=60)
