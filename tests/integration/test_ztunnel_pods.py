"""ztunnel carrying real pod traffic over HBONE: capture, ZDS, xDS, mTLS, policy.

Two pod namespaces joined by a veth pair, captured with the in-pod rules and
handed to a ztunnel (in this process) by the node agent over ZDS; meshd's
feed comes from a real in-process ADS server over gRPC; certificates from a
local CA (the CA's own path is tested with meshd). The apps are plain TCP
sockets inside the pods and never know.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, NetNS, netns
from scapy.layers.inet import TCP
from scapy.sendrecv import AsyncSniffer

from controlplane.authz_yaml import parse_authorization_policy
from controlplane.state import NamespaceInfo, PodInfo, SourceState, frozen_labels
from mesh.identity import CertificateAuthority, SpiffeId, generate_key_and_csr
from mesh.identity.store import WorkloadCertificate
from mesh.xds import XdsClient
from tests.integration.conftest import unique_name
from tests.unit.controlplane.test_ads import Meshd, meshd
from tests.unit.hbone.conftest import run
from ztunnel import netns as pod_netns
from ztunnel.capture import inpod
from ztunnel.runtime import Ztunnel
from ztunnel.zds import protocol
from ztunnel.zds.agent import ZdsAgent

CLIENT_IP, SERVER_IP, OUTSIDE_IP = "10.250.0.1", "10.250.0.2", "10.250.0.3"

pytestmark = pytest.mark.skipif(
    not (shutil.which("iptables-restore") and shutil.which("nsenter")),
    reason="needs iptables-restore (Debian package iptables) and nsenter (util-linux)",
)


@dataclass
class Pods:
    client: str
    server: str
    outside: str  # a pod that is not in the mesh
    bridge: str  # the wire between them


@contextlib.contextmanager
def pods() -> Iterator[Pods]:
    prefix = unique_name()
    bridge = f"{prefix}-br"
    names = Pods(f"{prefix}-client", f"{prefix}-server", f"{prefix}-outside", bridge)
    made: list[str] = []
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=bridge, kind="bridge")
            br = ipr.link_lookup(ifname=bridge)[0]
            ipr.link("set", index=br, state="up")
            for i, (name, ip) in enumerate(
                ((names.client, CLIENT_IP), (names.server, SERVER_IP), (names.outside, OUTSIDE_IP))
            ):
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
                    ns.addr("add", index=eth, address=ip, prefixlen=24)
                    ns.link("set", index=eth, state="up")
        yield names
    finally:
        for name in made:
            with contextlib.suppress(Exception):
                netns.remove(name)
        with IPRoute() as ipr, contextlib.suppress(Exception):
            ipr.link("del", ifname=bridge)


def world(policy: Mapping[str, Any] | None = None) -> SourceState:
    ambient = frozen_labels({"istio.io/dataplane-mode": "ambient"})
    return SourceState(
        namespaces=(NamespaceInfo(name="shop", labels=ambient), NamespaceInfo(name="legacy")),
        pods=(
            PodInfo(
                uid="c",
                name="client",
                namespace="shop",
                node="n1",
                ip=CLIENT_IP,
                service_account="client",
            ),
            PodInfo(
                uid="s",
                name="server",
                namespace="shop",
                node="n1",
                ip=SERVER_IP,
                service_account="server",
            ),
            PodInfo(uid="o", name="outside", namespace="legacy", node="n1", ip=OUTSIDE_IP),
        ),
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
    """An app in a pod: answers each connection with the address it came from."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 8080) -> None:
        def make() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(16)
            s.setblocking(False)
            return s

        sock = await asyncio.to_thread(pod_netns.in_netns, self.fd, make)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read(100)
            writer.write(f"{writer.get_extra_info('peername')[0]} said {data.decode()}".encode())
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(answer, sock=sock)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def ask(fd: int, ip: str, port: int = 8080) -> bytes:
    """Connect from inside the pod of ``fd``, as its app would; the answer ('' if cut)."""
    sock = await asyncio.to_thread(pod_netns.in_netns, fd, socket.socket)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(10):
            await asyncio.get_running_loop().sock_connect(sock, (ip, port))
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


@contextlib.asynccontextmanager
async def mesh(tmp: Path, names: Pods) -> AsyncIterator[tuple[Meshd, Ztunnel, dict[str, int]]]:
    ca = CertificateAuthority.create("cluster.local")

    async def fetch(identity: SpiffeId) -> WorkloadCertificate:
        key_pem, csr_pem = generate_key_and_csr(identity)
        issued = ca.sign_csr(csr_pem, identity, now=datetime.now(UTC))
        return WorkloadCertificate.from_issued(issued, key_pem)

    fds = {
        n: await asyncio.to_thread(_open, n) for n in (names.client, names.server, names.outside)
    }
    agent = ZdsAgent(tmp / "zds.sock")
    agent.start()
    async with meshd(world()) as control:
        xds = XdsClient(control.target, node_id="ztunnel~n1", backoff_initial_s=0.05)
        ztunnel = Ztunnel(xds=xds, fetch_certificate=fetch, zds_path=str(agent.path))
        task = asyncio.ensure_future(ztunnel.run())
        try:
            await xds.wait_synced(10)
            async with asyncio.timeout(10):
                await agent.proxy_ready.wait()
            for name, ns, sa, uid in (
                (names.client, "shop", "client", "c"),
                (names.server, "shop", "server", "s"),
            ):
                path = Path(f"/run/netns/{name}")
                await asyncio.to_thread(inpod.install, path)
                await agent.add(uid, protocol.PodInfo(name.split("-")[-1], ns, sa), path)
            yield control, ztunnel, fds
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await agent.close()
            for name in (names.client, names.server):
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(inpod.uninstall, Path(f"/run/netns/{name}"))
            for fd in fds.values():
                os.close(fd)


def stop(sniffer: AsyncSniffer) -> list[Any]:
    """What the sniffer saw on the wire."""
    return list(sniffer.stop() or ())


def _open(name: str) -> int:
    return os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)


def test_pod_to_pod_goes_over_hbone_keeps_the_client_address_and_obeys_policy(
    tmp_path: Path,
) -> None:
    async def body(names: Pods) -> None:
        async with mesh(tmp_path, names) as (control, ztunnel, fds):
            echo = Echo(fds[names.server])
            await echo.start()
            try:
                sniffer = AsyncSniffer(iface=names.bridge, store=True)
                sniffer.start()
                await asyncio.sleep(0.2)
                answer = await ask(fds[names.client], SERVER_IP)
                await asyncio.sleep(0.2)
                wire = stop(sniffer)
                # The app saw the client pod's own address: ztunnel kept it.
                assert answer == f"{CLIENT_IP} said hello".encode()
                # On the wire: TLS to 15008 only; the payload never in clear.
                tcp = [p for p in wire if TCP in p]
                assert tcp and {min(p[TCP].sport, p[TCP].dport) for p in tcp} == {15008}
                assert not any(b"hello" in bytes(p[TCP].payload) for p in tcp)
                assert any(bytes(p[TCP].payload)[:1] == b"\x17" for p in tcp)  # TLS records
                server = ztunnel.pods["s"]
                client = ztunnel.pods["c"]
                assert client.pool.connections_opened == 1  # it went over HBONE
                assert len(server.hbone.tunnels) == 1  # ...and was taken in on 15008

                # A DENY for the client's identity: new connections are cut.
                deny = {
                    "action": "DENY",
                    "rules": [
                        {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}
                    ],
                }
                control.publish(world(deny))
                async with asyncio.timeout(5):
                    while not ztunnel.index().state.policies:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
                assert await ask(fds[names.client], SERVER_IP) == b""
                # The same port, allowed by name: through again.
                allow = {
                    "rules": [
                        {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}
                    ]
                }
                control.publish(world(allow))
                async with asyncio.timeout(5):
                    while ztunnel.index().state.policies.get("shop/p") is None or (  # noqa: ASYNC110
                        ztunnel.index().state.policies["shop/p"].action.name != "ALLOW"
                    ):
                        await asyncio.sleep(0.02)
                assert await ask(fds[names.client], SERVER_IP) == f"{CLIENT_IP} said hello".encode()
            finally:
                echo.close()

    with pods() as names:  # pyroute2's sync API runs outside the event loop
        run(lambda: body(names), timeout_s=60)


def test_a_pod_outside_the_mesh_is_reached_in_plaintext_and_reaches_in(tmp_path: Path) -> None:
    async def body(names: Pods) -> None:
        async with mesh(tmp_path, names) as (_, ztunnel, fds):
            outside = Echo(fds[names.outside])
            await outside.start()
            inside = Echo(fds[names.server])
            await inside.start()
            try:
                # Mesh client -> non-mesh pod: passthrough (plain TCP, as Istio), the
                # source kept; the sniffer sees the payload this time.
                sniffer = AsyncSniffer(iface=names.bridge, store=True)
                sniffer.start()
                await asyncio.sleep(0.2)
                assert await ask(fds[names.client], OUTSIDE_IP) == (
                    f"{CLIENT_IP} said hello".encode()
                )
                await asyncio.sleep(0.2)
                wire = stop(sniffer)
                assert any(b"hello" in bytes(p[TCP].payload) for p in wire if TCP in p)
                assert ztunnel.pods["c"].pool.connections_opened == 0
                # Non-mesh client -> mesh pod: in through 15006, the source kept.
                assert await ask(fds[names.outside], SERVER_IP) == (
                    f"{OUTSIDE_IP} said hello".encode()
                )
            finally:
                outside.close()
                inside.close()

    with pods() as names:  # pyroute2's sync API runs outside the event loop
        run(lambda: body(names), timeout_s=60)
