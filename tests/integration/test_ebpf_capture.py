"""The eBPF capture in real namespaces and a real cgroup, with real traffic.

As :mod:`tests.integration.test_inpod_capture` does for iptables: a "pod"
namespace joined by a veth pair to a "peer" namespace, the pod's processes in
a cgroup v2 directory of their own. The app's sockets are made by a process
in that cgroup (a forked child hands them over, as the programs follow the
cgroup a socket was created in); ztunnel's are made by this process, which is
not in it. With capture installed, connections must land on the listeners
ztunnel opens in the pod, the destinations asked for readable as ztunnel reads
them, and not one iptables rule of ours in the pod.
"""

from __future__ import annotations

import array
import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS

from ebpf import capture as bpf
from ebpf import libbpf
from tests.integration.conftest import unique_name
from tests.integration.test_inpod_capture import (
    PEER_IP,
    POD_IP,
    lands_on,
    listener,
    namespaces,
    sock_in,
)
from ztunnel.capture import inpod
from ztunnel.capture.ebpf import EbpfCapture
from ztunnel.netns import INPOD_DELIVER_MARK, enter

LACKING = bpf.requirements()
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or bool(LACKING) or not shutil.which("nsenter"),
    reason="needs root, nsenter and " + ("; ".join(LACKING) or "what the eBPF backend needs"),
)


@contextlib.contextmanager
def pod_cgroup() -> Iterator[tuple[Path, str]]:
    """(a cgroup root of our own, the pod's uid); its ``pod<uid>`` directory inside."""
    mount = bpf.cgroup2_mount()
    assert mount is not None
    root = mount / unique_name()
    uid = str(uuid.uuid4())
    (root / f"pod{uid}").mkdir(parents=True)
    try:
        yield root, uid
    finally:
        for path in (root / f"pod{uid}", root):
            with contextlib.suppress(OSError):
                path.rmdir()


def app_socket(cgroup: Path, ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket made by a process of the pod (in its cgroup and netns)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            enter(fd)
            s = socket.socket(socket.AF_INET, kind)
            child.sendmsg(
                [b"s"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))]
            )
            code = 0
        finally:
            os._exit(code)
    child.close()
    parent.settimeout(10)
    try:
        _, ancdata, _, _ = parent.recvmsg(1, socket.CMSG_SPACE(4))
    finally:
        parent.close()
        os.waitpid(pid, 0)
    assert ancdata, "the pod's process made no socket"
    fds = array.array("i")
    fds.frombytes(ancdata[0][2][:4])
    s = socket.socket(fileno=fds[0])
    s.settimeout(3)
    return s


@contextlib.contextmanager
def ebpf_pod() -> Iterator[tuple[str, str, Path, EbpfCapture, str]]:
    pin = Path("/sys/fs/bpf") / unique_name()
    with namespaces() as (pod, peer), pod_cgroup() as (root, uid):
        backend = EbpfCapture(pin, root)
        try:
            yield pod, peer, root / f"pod{uid}", backend, uid
        finally:
            backend.programs.remove()
            assert not pin.exists()


def test_ebpf_sends_each_kind_of_traffic_to_its_listener_and_removal_is_exact() -> None:
    with ebpf_pod() as (pod, peer, cgroup, backend, uid):
        path = Path(f"/run/netns/{pod}")
        backend.install(path, uid)
        maps = bpf.NodeMaps(backend.programs.pin_dir)
        try:
            assert backend.missing(path, uid) == []
            listeners = {
                "outbound": listener(pod, "0.0.0.0", 15001),
                "inbound-plaintext": listener(pod, "0.0.0.0", 15006),
                "hbone": listener(pod, "0.0.0.0", 15008),
                "peer": listener(peer, PEER_IP, 80),
            }
            dns = sock_in(pod, socket.SOCK_DGRAM)
            dns.bind(("127.0.0.1", 15053))
            try:
                # The app's outbound TCP goes to podIP:15001; ztunnel reads the
                # destination back by the accepted socket's 4-tuple.
                with app_socket(cgroup, pod) as app:
                    app.connect((PEER_IP, 80))
                    conn, peer_addr = listeners["outbound"].accept()
                    with conn:
                        assert conn.getsockname() == (POD_IP, 15001)
                        assert maps.original_destination(peer_addr, conn.getsockname()) == (
                            PEER_IP,
                            80,
                        )
                        # Read once: the entry is gone, so nothing can reuse it.
                        assert maps.original_destination(peer_addr, conn.getsockname()) is None
                # The pod's own addresses stay local, as `-o lo -j ACCEPT` does.
                with listener(pod, POD_IP, 9000) as own_port, app_socket(cgroup, pod) as app:
                    assert lands_on({"own": own_port}, app, (POD_IP, 9000))[0] == "own"
                # ztunnel's sockets (not made in the pod's cgroup) go where they are sent.
                with sock_in(pod) as ztunnel:
                    assert lands_on(listeners, ztunnel, (PEER_IP, 80))[0] == "peer"
                # Inbound plaintext to any port goes to 15006, which sees the address
                # asked for as its own; HBONE to 15008 is left alone.
                with sock_in(peer) as outsider:
                    outsider.connect((POD_IP, 8080))
                    conn, _ = listeners["inbound-plaintext"].accept()
                    with conn:
                        assert conn.getsockname() == (POD_IP, 8080)
                        outsider.sendall(b"ping")
                        assert conn.recv(4) == b"ping"
                with sock_in(peer) as tunnel:
                    assert lands_on(listeners, tunnel, (POD_IP, 15008))[0] == "hbone"
                # DNS over UDP goes to the DNS proxy; its answer seems to come from
                # the server asked.
                with app_socket(cgroup, pod, socket.SOCK_DGRAM) as resolver:
                    resolver.sendto(b"query", (PEER_IP, 53))
                    dns.settimeout(3)
                    data, client = dns.recvfrom(64)
                    assert data == b"query"
                    dns.sendto(b"answer", client)
                    assert resolver.recvfrom(64) == (b"answer", (PEER_IP, 53))
            finally:
                dns.close()
                for s in listeners.values():
                    s.close()
            # Not one iptables rule of ours.
            assert inpod.installed_tables(path) == []
        finally:
            maps.close()
            backend.uninstall(path, uid)

        assert backend.programs.pod_count() == 0
        assert len(backend.missing(path, uid)) >= 5  # nothing of it is left
        with NetNS(pod) as ns:
            eth = ns.link_lookup(ifname="eth0")[0]
            assert not [q for q in ns.get_qdiscs(eth) if q.get_attr("TCA_KIND") == "clsact"]
            assert not [
                r
                for r in ns.get_rules(family=socket.AF_INET)
                if r.get_attr("FRA_TABLE") == inpod.ROUTE_TABLE
            ]
        fwmark = subprocess.run(
            ["nsenter", f"--net={path}", "sysctl", "-n", "net.ipv4.tcp_fwmark_accept"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert fwmark == "0"
        # Without capture, the app reaches the peer directly.
        with listener(peer, PEER_IP, 80) as direct, app_socket(cgroup, pod) as app:
            assert lands_on({"peer": direct}, app, (PEER_IP, 80))[0] == "peer"


def test_ztunnel_delivers_from_the_clients_address_and_the_app_answers_it() -> None:
    """ztunnel connects to the app from the client's own address, with the deliver
    mark: the app's answers must come back to ztunnel, not leave the pod."""
    with ebpf_pod() as (pod, _peer, _cgroup, backend, uid):
        path = Path(f"/run/netns/{pod}")
        backend.install(path, uid)
        try:
            with listener(pod, "0.0.0.0", 8080) as app, sock_in(pod) as ztunnel:
                ztunnel.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, INPOD_DELIVER_MARK)
                ztunnel.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
                ztunnel.bind(("10.9.8.7", 0))
                ztunnel.connect((POD_IP, 8080))
                conn, client = app.accept()
                with conn:
                    assert client[0] == "10.9.8.7"
                    conn.sendall(b"hello")
                    assert ztunnel.recv(5) == b"hello"
        finally:
            backend.uninstall(path, uid)


def test_with_ztunnel_away_nothing_bypasses_it() -> None:
    """No listeners (ztunnel down): the app's connects fail and inbound connections
    are dropped; nothing reaches its destination around ztunnel."""
    with ebpf_pod() as (pod, peer, cgroup, backend, uid):
        path = Path(f"/run/netns/{pod}")
        backend.install(path, uid)
        try:
            with listener(peer, PEER_IP, 80) as far, listener(pod, "0.0.0.0", 8080) as app:
                with app_socket(cgroup, pod) as client, pytest.raises(ConnectionRefusedError):
                    client.connect((PEER_IP, 80))
                with sock_in(peer) as outsider:
                    outsider.settimeout(1)
                    with pytest.raises(TimeoutError):
                        outsider.connect((POD_IP, 8080))
                for s in (far, app):
                    s.settimeout(0.2)
                    with pytest.raises(TimeoutError):
                        s.accept()
        finally:
            backend.uninstall(path, uid)


def test_install_twice_leaves_one_copy_and_replaces_iptables() -> None:
    with ebpf_pod() as (pod, _, cgroup, backend, uid):
        path = Path(f"/run/netns/{pod}")
        inpod.install(path)
        backend.install(path, uid)
        backend.install(path, uid)
        try:
            assert inpod.installed_tables(path) == []
            assert backend.programs.pod_count() == 1
            with NetNS(pod) as ns:
                eth = ns.link_lookup(ifname="eth0")[0]
                assert len(bpf._our_filters(ns, eth)) == 1
            assert backend.programs.cgroup_missing(cgroup) == []
        finally:
            backend.uninstall(path, uid)


def test_an_agent_of_another_build_replaces_the_programs_and_keeps_the_pods(
    tmp_path: Path,
) -> None:
    """An upgrade: the new build's programs are pinned beside the maps (which stay),
    the older build's pins go, and enrolling the pod again swaps its cgroup programs
    and tc filter for the new ones, while the pod stays captured."""
    with ebpf_pod() as (pod, _peer, cgroup, backend, uid):
        path = Path(f"/run/netns/{pod}")
        backend.install(path, uid)
        old_dir, old_ids = backend.programs.programs_dir(), backend.programs.ids()
        newer = tmp_path / "capture.bpf.o"
        newer.write_bytes(bpf.OBJECT.read_bytes() + b"another build")
        upgraded = EbpfCapture(backend.programs.pin_dir, backend.cgroup_root)
        upgraded.programs = bpf.NodePrograms(backend.programs.pin_dir, obj=newer)
        backend.programs.close()
        try:
            new_ids = upgraded.programs.ids()
            assert not set(new_ids.values()) & set(old_ids.values())
            assert not old_dir.exists() and upgraded.programs.programs_dir().exists()
            stale = upgraded.missing(path, uid)
            assert any("instead of an older one" in m for m in stale), stale
            assert upgraded.programs.pod_count() == 1  # the maps were kept
            upgraded.install(path, uid)
            assert upgraded.missing(path, uid) == []
            # What ztunnel-ctl verify sees: the pinned build, the cgroup by its id.
            seen = EbpfCapture(backend.programs.pin_dir, backend.cgroup_root, load=False)
            assert seen.missing(path, None) == []
            assert seen.programs.ids() == new_ids
            seen.programs.close()
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for name, kind in bpf.CGROUP_PROGRAMS.items():
                    assert libbpf.attached(fd, kind, str(cgroup)) == [new_ids[name]]
            finally:
                os.close(fd)
            with NetNS(pod) as ns:
                eth = ns.link_lookup(ifname="eth0")[0]
                assert len(bpf._our_filters(ns, eth)) == 1
            with listener(pod, "0.0.0.0", 15001) as outbound, app_socket(cgroup, pod) as app:
                assert lands_on({"outbound": outbound}, app, (PEER_IP, 80))[0] == "outbound"
        finally:
            upgraded.uninstall(path, uid)
            upgraded.programs.close()
