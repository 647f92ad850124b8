"""The eBPF capture of one pod: the programs of :mod:`ebpf.capture` on its cgroup
and its interfaces, and the little routing it needs, all inside the pod.

Installed, in this order (removal is the reverse, and takes away exactly what
was added):

1. ``net.ipv4.tcp_fwmark_accept=1`` in the pod's netns (when it was 0), and
   ``ip rule fwmark 0x100539/0x100fff lookup 100`` with ``local default dev lo``
   in table 100: ztunnel connects to the app from the client's address with
   the deliver mark, the app's accepted socket takes that mark, and its
   answers are routed back to ztunnel instead of out of the pod (what the
   connmark rules do for iptables);
2. the tc ingress filter on each of the pod's interfaces (not ``lo``);
3. the pod's entry in ``zt_pods`` (its address, DNS capture, cgroup id);
4. the cgroup programs on the pod's cgroup, last: from then on its connects
   go to ztunnel.

A pod captured by iptables (this node switched backends) has those rules taken
out first: never both.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import NetlinkError

from ebpf import capture as bpf
from ztunnel.capture import inpod
from ztunnel.capture.cgroups import CgroupNotFound, cgroup_id, find_by_id, find_pod_cgroup
from ztunnel.netns import INPOD_DELIVER_MARK, INPOD_DELIVER_MASK, in_netns

log = logging.getLogger("ztunnel.capture")
FWMARK_ACCEPT = "/proc/sys/net/ipv4/tcp_fwmark_accept"
POD_SET_FWMARK_ACCEPT = 4  # zt_pods flag: we turned tcp_fwmark_accept on
T = TypeVar("T")


class CaptureError(inpod.CaptureError):
    """Installing or removing the eBPF capture failed; the message says where and why."""


def _in(netns: Path, fn: Callable[[], T]) -> T:
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return in_netns(fd, fn)
    finally:
        os.close(fd)


_own_proc: Path | None = None


def _writable_proc() -> Path:
    """A procfs whose /proc/sys can be written. A container's /proc/sys is mounted
    read-only (the runtime's readonlyPaths); a procfs of our own, mounted once in
    this process's mount namespace (the agent has CAP_SYS_ADMIN), is not."""
    global _own_proc
    if _own_proc is None:
        path = Path(f"/run/ztunnel-node-agent-proc-{os.getpid()}")
        path.mkdir(mode=0o700, exist_ok=True)
        if not os.path.ismount(path):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.mount(b"proc", str(path).encode(), b"proc", 0, None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mounting a procfs at {path}: {os.strerror(err)}")
        _own_proc = path
    return _own_proc


def _fwmark_accept(value: str | None = None) -> str:
    """Read (and with ``value``, set) tcp_fwmark_accept of the calling thread's netns."""
    # /proc/sys/net shows the namespace of the thread that opens it.
    path = Path(FWMARK_ACCEPT)
    before = path.read_text().strip()
    if value is not None:
        try:
            path.write_text(value)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            (_writable_proc() / "sys/net/ipv4/tcp_fwmark_accept").write_text(value)
    return before


class EbpfCapture:
    """The backend: programs and maps pinned under ``pin_dir`` (one folder per node),
    pods' cgroups looked for under ``cgroup_root``."""

    name = "ebpf"

    def __init__(
        self, pin_dir: Path, cgroup_root: Path, *, dns: bool = True, load: bool = True
    ) -> None:
        # Without ``load``, only what the node agent pinned is used (ztunnel-ctl verify).
        self.programs = bpf.NodePrograms(pin_dir, obj=bpf.OBJECT if load else None)
        self.cgroup_root = cgroup_root
        self.dns = dns

    def prepare(self) -> None:
        """Load (or find pinned) the node's programs; :class:`CaptureError` if it cannot."""
        try:
            self.programs.load()
        except bpf.CaptureError as e:
            raise CaptureError(str(e)) from e

    def cgroup(self, netns: Path, pod_uid: str) -> Path:
        try:
            return find_pod_cgroup(self.cgroup_root, pod_uid, netns=netns)
        except CgroupNotFound as e:
            raise CaptureError(str(e)) from e

    # -- install / uninstall -------------------------------------------------------------

    def install(self, netns: Path, pod_uid: str) -> None:
        """Capture ``netns``'s pod; idempotent. On failure nothing of it is left."""
        self.prepare()
        cgroup = self.cgroup(netns, pod_uid)
        if inpod.installed_tables(netns):
            log.info("capture: %s had iptables capture: replacing it with eBPF", netns)
            inpod.uninstall(netns)
        try:
            cookie, ip, flags = _in(netns, lambda: self._netns_part(netns))
            entry = bpf.PodEntry(ip=ip, flags=flags, cgroup_id=cgroup_id(cgroup))
            self.programs.put_pod(cookie, entry)
            self.programs.attach_cgroup(cgroup)
        except (bpf.CaptureError, NetlinkError, OSError) as e:
            with contextlib.suppress(Exception):
                self.uninstall(netns, pod_uid)
            raise CaptureError(f"eBPF capture of {netns}: {e}") from e

    def _netns_part(self, netns: Path) -> tuple[int, str, int]:
        cookie = bpf.netns_cookie()
        previous = self.programs.pod(cookie)
        flags = (previous.flags & ~bpf.POD_DNS_CAPTURE) if previous else 0
        if _fwmark_accept() == "0":
            _fwmark_accept("1")
            flags |= POD_SET_FWMARK_ACCEPT
        with inpod.netlink_in(netns) as ns:
            ip = _pod_ip(ns)
            if ip is None:
                raise CaptureError(f"{netns} has no IPv4 address to capture for")
            _add_reply_routing(ns)
            for index in _interfaces(ns):
                if self.programs.attach_tc(ns, index):
                    flags |= bpf.POD_MADE_CLSACT
        if self.dns:
            flags |= bpf.POD_DNS_CAPTURE
        return cookie, ip, flags

    def uninstall(self, netns: Path, pod_uid: str) -> None:
        """Remove exactly what :meth:`install` added (whatever part of it is there)."""
        self.prepare()
        try:
            cgroup: Path | None = self.cgroup(netns, pod_uid)
        except CaptureError:
            cgroup = None  # gone with the pod, or never found: nothing of ours is on it
        if cgroup is not None:
            try:
                self.programs.detach_cgroup(cgroup)
            except bpf.CaptureError as e:
                raise CaptureError(f"removing the eBPF capture of {netns}: {e}") from e

        def netns_part() -> None:
            cookie = bpf.netns_cookie()
            entry = self.programs.pod(cookie)
            flags = entry.flags if entry is not None else 0
            with inpod.netlink_in(netns) as ns:
                for index in _interfaces(ns):
                    bpf.detach_tc(ns, index, made_clsact=bool(flags & bpf.POD_MADE_CLSACT))
                _remove_reply_routing(ns)
            if flags & POD_SET_FWMARK_ACCEPT:
                _fwmark_accept("0")
            if entry is not None:
                self.programs.drop_pod(cookie)

        try:
            _in(netns, netns_part)
        except (bpf.CaptureError, NetlinkError, OSError) as e:
            raise CaptureError(f"removing the eBPF capture of {netns}: {e}") from e

    def holds(self, netns: Path) -> bool:
        """Whether ``netns``'s pod has an entry in ``zt_pods`` (some of it is captured)."""
        self.prepare()
        return _in(netns, lambda: self.programs.pod(bpf.netns_cookie()) is not None)

    def installed(self, netns: Path, pod_uid: str) -> bool:
        try:
            return not self.missing(netns, pod_uid)
        except CaptureError:
            return False

    def missing(self, netns: Path, pod_uid: str | None) -> list[str]:
        """What of the capture is not in place for the pod (empty: all of it is). With
        ``pod_uid`` None (``ztunnel-ctl verify``, which knows only the netns), the
        cgroup is the one the pod's ``zt_pods`` entry names."""
        self.prepare()
        absent: list[str] = []
        entries: list[bpf.PodEntry] = []

        def netns_part() -> None:
            cookie = bpf.netns_cookie()
            entry = self.programs.pod(cookie)
            if entry is not None:
                entries.append(entry)
            if entry is None:
                absent.append("its entry in zt_pods (the pod's address and flags)")
            elif self.dns and not entry.flags & bpf.POD_DNS_CAPTURE:
                absent.append("DNS capture in its zt_pods entry")
            if _fwmark_accept() != "1":
                absent.append("net.ipv4.tcp_fwmark_accept=1")
            with inpod.netlink_in(netns) as ns:
                absent.extend(_reply_routing_missing(ns))
                for index in _interfaces(ns):
                    if not bpf.tc_attached(ns, index):
                        name = ns.get_links(index)[0].get_attr("IFLA_IFNAME")
                        absent.append(f"tc ingress filter {bpf.TC_PROGRAM} on {name}")

        try:
            _in(netns, netns_part)
            if pod_uid is not None:
                cgroup: Path | None = self.cgroup(netns, pod_uid)
            elif entries:
                cgroup = find_by_id(self.cgroup_root, entries[0].cgroup_id)
                if cgroup is None:
                    absent.append(
                        f"the pod's cgroup (id {entries[0].cgroup_id}) under {self.cgroup_root}"
                    )
            else:
                cgroup = None
            if cgroup is not None:
                absent.extend(self.programs.cgroup_missing(cgroup))
        except (bpf.CaptureError, NetlinkError, OSError) as e:
            raise CaptureError(f"reading the eBPF capture of {netns}: {e}") from e
        return absent


def _interfaces(ns: Any) -> list[int]:
    return [link["index"] for link in ns.get_links() if link.get_attr("IFLA_IFNAME") != "lo"]


def _pod_ip(ns: Any) -> str | None:
    for addr in ns.get_addr(family=socket.AF_INET):
        ip = addr.get_attr("IFA_ADDRESS")
        if ip and not ip.startswith("127."):
            return str(ip)
    return None


def _our_rules(ns: Any) -> list[Any]:
    return [
        r
        for r in ns.get_rules(family=socket.AF_INET, priority=inpod.RULE_PRIORITY)
        if r.get_attr("FRA_TABLE") == inpod.ROUTE_TABLE
        and r.get_attr("FRA_FWMARK") == INPOD_DELIVER_MARK
    ]


def _rule(ns: Any, op: str) -> None:
    ns.rule(
        op,
        family=socket.AF_INET,
        fwmark=INPOD_DELIVER_MARK,
        fwmask=INPOD_DELIVER_MASK,
        table=inpod.ROUTE_TABLE,
        priority=inpod.RULE_PRIORITY,
    )


def _add_reply_routing(ns: Any) -> None:
    if not _our_rules(ns):
        _rule(ns, "add")
    routes = ns.get_routes(family=socket.AF_INET, table=inpod.ROUTE_TABLE)
    if not any(r.get_attr("RTA_TABLE") == inpod.ROUTE_TABLE for r in routes):
        lo = ns.link_lookup(ifname="lo")
        if not lo:
            raise CaptureError("the pod has no loopback interface")
        ns.route(
            "add", dst="0.0.0.0/0", type="local", scope=254, table=inpod.ROUTE_TABLE, oif=lo[0]
        )


def _remove_reply_routing(ns: Any) -> None:
    for _ in _our_rules(ns):
        _rule(ns, "del")
    for route in ns.get_routes(family=socket.AF_INET, table=inpod.ROUTE_TABLE):
        if route.get_attr("RTA_TABLE") == inpod.ROUTE_TABLE:
            ns.route(
                "del",
                dst="0.0.0.0/0",
                type="local",
                scope=254,
                table=inpod.ROUTE_TABLE,
                oif=route.get_attr("RTA_OIF"),
            )


def _reply_routing_missing(ns: Any) -> list[str]:
    absent = []
    if not _our_rules(ns):
        absent.append(
            f"ip rule fwmark 0x{INPOD_DELIVER_MARK:x}/0x{INPOD_DELIVER_MASK:x} "
            f"lookup {inpod.ROUTE_TABLE}"
        )
    routes = ns.get_routes(family=socket.AF_INET, table=inpod.ROUTE_TABLE)
    if not any(r.get_attr("RTA_TABLE") == inpod.ROUTE_TABLE for r in routes):
        absent.append(f"ip route local default dev lo table {inpod.ROUTE_TABLE}")
    return absent
