"""In-pod capture with real iptables, in real network namespaces, with real traffic.

A "pod" namespace is joined by a veth pair to a "peer" namespace. With
capture installed in the pod, connections must land on the listeners the
proxy would open inside the pod (15001, 15006, 15053), with the original
destination readable, while ztunnel's own marked sockets, HBONE (15008) and
traffic after removal go where they were sent.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute, NetNS, netns

from tests.integration.conftest import unique_name
from ztunnel.capture import inpod

SO_ORIGINAL_DST = 80
POD_IP, PEER_IP = "10.250.0.2", "10.250.0.1"

pytestmark = pytest.mark.skipif(
    not (shutil.which("iptables-restore") and shutil.which("nsenter")),
    reason="needs iptables-restore (Debian package iptables) and nsenter (util-linux)",
)


@contextlib.contextmanager
def namespaces() -> Iterator[tuple[str, str]]:
    prefix = unique_name()
    pod, peer = f"{prefix}-pod", f"{prefix}-peer"
    try:
        netns.create(pod)
        netns.create(peer)
        with IPRoute() as ipr:
            ipr.link("add", ifname=f"{prefix}-a", kind="veth", peer={"ifname": f"{prefix}-b"})
            a = ipr.link_lookup(ifname=f"{prefix}-a")[0]
            b = ipr.link_lookup(ifname=f"{prefix}-b")[0]
            ipr.link("set", index=a, net_ns_fd=pod, ifname="eth0")
            ipr.link("set", index=b, net_ns_fd=peer, ifname="eth0")
        for name, ip in ((pod, POD_IP), (peer, PEER_IP)):
            with NetNS(name) as ns:
                lo = ns.link_lookup(ifname="lo")[0]
                eth = ns.link_lookup(ifname="eth0")[0]
                ns.link("set", index=lo, state="up")
                ns.addr("add", index=eth, address=ip, prefixlen=24)
                ns.link("set", index=eth, state="up")
        with NetNS(pod) as ns:
            ns.route("add", dst="0.0.0.0/0", gateway=PEER_IP)
        yield pod, peer
    finally:
        for name in (pod, peer):
            with contextlib.suppress(Exception):
                netns.remove(name)


def sock_in(ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket of namespace ``ns`` (a socket stays in the namespace it was made in)."""
    netns.pushns(ns)
    try:
        s = socket.socket(socket.AF_INET, kind)
    finally:
        netns.popns()
    s.settimeout(3)
    return s


def listener(ns: str, ip: str, port: int) -> socket.socket:
    s = sock_in(ns)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(8)
    return s


def original_destination(conn: socket.socket) -> tuple[str, int] | None:
    """Where the connection was sent before a REDIRECT; None when it was not redirected."""
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except FileNotFoundError:
        return None
    port, packed = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(packed), port


def lands_on(
    listeners: dict[str, socket.socket], client: socket.socket, where: tuple[str, int]
) -> tuple[str, tuple[str, int] | None]:
    """Connect ``client`` to ``where``; which listener took it, and the original destination."""
    client.connect(where)
    for name, lsock in listeners.items():
        lsock.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            conn, _ = lsock.accept()
            with conn:
                return name, original_destination(conn)
    raise AssertionError(f"no listener took the connection to {where}")


def test_capture_sends_each_kind_of_traffic_to_its_listener_and_removal_is_exact() -> None:
    with namespaces() as (pod, peer):
        path = Path(f"/run/netns/{pod}")
        before = subprocess.run(
            ["nsenter", f"--net={path}", "iptables-save"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        inpod.install(path)
        try:
            listeners = {
                "outbound": listener(pod, "0.0.0.0", 15001),
                "inbound-plaintext": listener(pod, "0.0.0.0", 15006),
                "hbone": listener(pod, "0.0.0.0", 15008),
                "peer": listener(peer, PEER_IP, 80),
            }
            dns = sock_in(pod, socket.SOCK_DGRAM)
            dns.bind(("0.0.0.0", 15053))
            try:
                # The app's outbound TCP goes to 15001, the destination kept.
                with sock_in(pod) as app:
                    assert lands_on(listeners, app, (PEER_IP, 80)) == ("outbound", (PEER_IP, 80))
                # ztunnel's own (marked) sockets go where they are sent.
                with sock_in(pod) as own:
                    own.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, inpod.INPOD_MARK)
                    assert lands_on(listeners, own, (PEER_IP, 80)) == ("peer", None)
                # Inbound plaintext to any port goes to 15006; HBONE to 15008 is left alone.
                with sock_in(peer) as outsider:
                    assert lands_on(listeners, outsider, (POD_IP, 8080)) == (
                        "inbound-plaintext",
                        (POD_IP, 8080),
                    )
                with sock_in(peer) as tunnel:
                    assert lands_on(listeners, tunnel, (POD_IP, 15008))[0] == "hbone"
                # DNS over UDP goes to the DNS proxy.
                with sock_in(pod, socket.SOCK_DGRAM) as resolver:
                    resolver.sendto(b"query", (PEER_IP, 53))
                    dns.settimeout(3)
                    assert dns.recvfrom(64)[0] == b"query"
            finally:
                dns.close()
                for s in listeners.values():
                    s.close()
        finally:
            inpod.uninstall(path)

        after = subprocess.run(
            ["nsenter", f"--net={path}", "iptables-save"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rules = [line for line in after.splitlines() if line.startswith(("-A", ":ISTIO"))]
        assert rules == [line for line in before.splitlines() if line.startswith(("-A", ":"))]
        with NetNS(pod) as ns:
            assert not [
                r
                for r in ns.get_rules(family=socket.AF_INET)
                if r.get_attr("FRA_TABLE") == inpod.ROUTE_TABLE
            ]
        # Without capture, the app reaches the peer directly.
        with listener(peer, PEER_IP, 80) as direct, sock_in(pod) as app:
            assert lands_on({"peer": direct}, app, (PEER_IP, 80))[0] == "peer"


def test_install_twice_leaves_one_copy() -> None:
    with namespaces() as (pod, _):
        path = Path(f"/run/netns/{pod}")
        inpod.install(path)
        inpod.install(path)
        try:
            dump = subprocess.run(
                ["nsenter", f"--net={path}", "iptables-save", "-t", "nat"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert dump.count("-A OUTPUT -j ISTIO_OUTPUT") == 1
            assert dump.count("--to-ports 15001") == 1
        finally:
            inpod.uninstall(path)
