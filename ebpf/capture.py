"""The BPF half of the eBPF capture: the node's programs and maps, pinned, and
what of them one pod gets (its cgroup's attachments, its interfaces' tc filter,
its entry in ``zt_pods``).

* :class:`NodePrograms` loads ``capture.bpf.o`` once per node and pins its
  programs and maps under the node's folder of bpffs, so they outlive the
  agent; a restarted agent finds the pins and loads nothing.
* A pod is keyed by its network namespace's cookie (``SO_NETNS_COOKIE``):
  the value holds its IPv4 address, flags and the id of the cgroup the
  programs are attached to.
* :func:`requirements` names what this node lacks for the backend, so the
  caller can refuse it with a reason instead of half-capturing a pod.

The netns-side calls (:func:`attach_tc`, ...) take a pyroute2 ``IPRoute``
already inside the pod's namespace: the caller owns entering it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebpf import libbpf

OBJECT = Path(__file__).with_name("capture.bpf.o")
SOURCE = Path(__file__).with_name("capture.bpf.c")
CGROUP_PROGRAMS = {
    "zt_connect4": libbpf.CGROUP_INET4_CONNECT,
    "zt_sockops": libbpf.CGROUP_SOCK_OPS,
    "zt_sendmsg4": libbpf.CGROUP_UDP4_SENDMSG,
    "zt_recvmsg4": libbpf.CGROUP_UDP4_RECVMSG,
}
TC_PROGRAM = "zt_ingress"
MAPS = ("zt_pods", "zt_cookie_dst", "zt_orig_dst")
TC_PRIO = 0x539  # our filter's preference on each interface: ours to find and remove
TC_INGRESS = "ffff:fff2"
SO_NETNS_COOKIE = 71

# zt_pods flags: the first is the programs'; the others record what the agent
# changed in the pod, so that release undoes exactly that.
POD_DNS_CAPTURE = 1
POD_MADE_CLSACT = 2
_POD = struct.Struct("=4sIQ")  # struct pod_info
_ORIG = struct.Struct("=4sHH")  # struct orig_dst: ip, port (network order), pad
_TUPLE = struct.Struct("=4s4sHH")  # struct tuple4: ports in host order


class CaptureError(Exception):
    """Installing, checking or removing the BPF capture failed; the message says why."""


@dataclass(frozen=True, slots=True)
class PodEntry:
    ip: str
    flags: int
    cgroup_id: int


def requirements(pin_parent: Path = Path("/sys/fs/bpf")) -> list[str]:
    """What this node lacks for the eBPF backend (empty: nothing)."""
    lacking = []
    if cgroup2_mount() is None:
        lacking.append("a cgroup v2 hierarchy (no cgroup2 mount in /proc/self/mountinfo)")
    if not _is_bpffs(pin_parent):
        lacking.append(f"bpffs at {pin_parent} (mount -t bpf bpf {pin_parent})")
    try:
        libbpf.library()
    except libbpf.BpfError as e:
        lacking.append(str(e))
    if not OBJECT.exists():
        lacking.append(f"the compiled programs {OBJECT} (make ebpf; needs clang and libbpf-dev)")
    return lacking


def ensure_bpffs(path: Path = Path("/sys/fs/bpf")) -> None:
    """Mount bpffs at ``path`` when nothing is (as Cilium's agent does); a failure is
    left for :func:`requirements` to report."""
    if _is_bpffs(path) or not path.is_dir():
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mount(b"bpf", str(path).encode(), b"bpf", 0, None)


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of this process's mounts."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and right:
                found.append((fields[4].replace("\\040", " "), right.split()[0]))
    return found


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or
    ``/sys/fs/cgroup/unified`` on a hybrid host), or None."""
    for point, kind in _mounts():
        if kind == "cgroup2":
            return Path(point)
    return None


def _is_bpffs(path: Path) -> bool:
    return any(kind == "bpf" and Path(point) == path for point, kind in _mounts())


def netns_cookie() -> int:
    """The cookie of the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int(struct.unpack("=Q", raw)[0])


class NodePrograms:
    """The node's programs and maps, pinned under ``pin_dir`` (one folder per node)."""

    def __init__(self, pin_dir: Path, *, obj: Path | None = OBJECT) -> None:
        """``obj`` None: only what is pinned is opened, never loaded (for diagnostics,
        which must not replace the agent's build with their own)."""
        self.pin_dir = pin_dir
        self.obj = obj
        self.fds: dict[str, int] = {}
        self.pods: libbpf.Map | None = None

    def programs_dir(self) -> Path:
        """Where this build's programs are pinned: ``progs-<hash of the object>``, so an
        agent of another build loads and pins its own (the maps are shared). Without
        an object: the newest build pinned."""
        if self.obj is None:
            pinned = sorted(self.pin_dir.glob("progs-*"), key=lambda p: p.stat().st_mtime)
            if not pinned:
                raise CaptureError(f"no programs are pinned in {self.pin_dir}")
            return pinned[-1]
        try:
            digest = hashlib.sha256(self.obj.read_bytes()).hexdigest()[:12]
        except OSError as e:
            raise CaptureError(f"the compiled programs {self.obj}: {e.strerror}") from e
        return self.pin_dir / f"progs-{digest}"

    def load(self) -> None:
        """Open the pinned programs, or load and pin them when any is missing."""
        if self.fds:
            return
        progs = self.programs_dir()
        pins = [progs / n for n in (*CGROUP_PROGRAMS, TC_PROGRAM)]
        pins += [self.pin_dir / n for n in MAPS]
        if not all(p.exists() for p in pins):
            if self.obj is None:
                raise CaptureError(f"the node's programs are not all pinned in {progs}")
            self._load_and_pin(progs)
        try:
            for name in (*CGROUP_PROGRAMS, TC_PROGRAM):
                self.fds[name] = libbpf.get_pinned(progs / name)
            self.pods = libbpf.Map.pinned(self.pin_dir / "zt_pods", 8, _POD.size)
        except libbpf.BpfError as e:
            self.close()
            raise CaptureError(f"opening the pinned programs in {progs}: {e}") from e

    def _load_and_pin(self, progs: Path) -> None:
        assert self.obj is not None
        try:
            progs.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CaptureError(f"cannot make {progs}: {e}") from e
        try:
            loaded = libbpf.BpfObject(self.obj, self.pin_dir)  # maps: kept and reused
        except libbpf.BpfError as e:
            raise CaptureError(f"loading {self.obj}: {e}") from e
        try:
            for name in (*CGROUP_PROGRAMS, TC_PROGRAM):
                with contextlib.suppress(FileNotFoundError):
                    (progs / name).unlink()  # half a pinning, interrupted
                libbpf.pin(loaded.program_fd(name), progs / name)
        except libbpf.BpfError as e:
            raise CaptureError(f"pinning the programs under {progs}: {e}") from e
        finally:
            loaded.close()
        # Other builds' pins: their programs live on where still attached (the pods
        # enrolled by that build, until they are enrolled again or leave).
        for old in self.pin_dir.glob("progs-*"):
            if old != progs:
                _unpin_tree(old)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self.pods is not None:
            self.pods.close()
            self.pods = None

    def remove(self) -> None:
        """Unpin everything of the node (the last pod has gone; or the cluster is torn down)."""
        self.close()
        _unpin_tree(self.pin_dir)

    def ids(self) -> dict[str, int]:
        self.load()
        return {name: libbpf.prog_id(fd) for name, fd in self.fds.items()}

    # -- a pod's entry --------------------------------------------------------------------

    def _pods(self) -> libbpf.Map:
        self.load()
        assert self.pods is not None
        return self.pods

    def put_pod(self, cookie: int, entry: PodEntry) -> None:
        value = _POD.pack(socket.inet_aton(entry.ip), entry.flags, entry.cgroup_id)
        try:
            self._pods().put(struct.pack("=Q", cookie), value)
        except libbpf.BpfError as e:
            raise CaptureError(f"recording the pod in zt_pods: {e}") from e

    def pod(self, cookie: int) -> PodEntry | None:
        raw = self._pods().get(struct.pack("=Q", cookie))
        if raw is None:
            return None
        ip, flags, cgroup_id = _POD.unpack(raw)
        return PodEntry(socket.inet_ntoa(ip), flags, cgroup_id)

    def drop_pod(self, cookie: int) -> None:
        self._pods().delete(struct.pack("=Q", cookie))

    def pod_count(self) -> int:
        return len(self._pods().keys())

    # -- a pod's cgroup -------------------------------------------------------------------

    def attach_cgroup(self, cgroup: Path) -> None:
        """Attach the cgroup programs to ``cgroup`` (those already there are left)."""
        self._each_program(cgroup, attach=True)

    def detach_cgroup(self, cgroup: Path) -> None:
        """Detach ours from ``cgroup`` (those not there are skipped)."""
        try:
            self._each_program(cgroup, attach=False)
        except CaptureError:
            if cgroup.exists():
                raise
            # the cgroup is gone, and its attachments with it

    def _each_program(self, cgroup: Path, *, attach: bool) -> None:
        """Attach (or detach) ours; an older build's of the same name is detached either
        way (an upgraded agent replaces them as it enrolls the pods again)."""
        self.load()
        fd = _open_dir(cgroup)
        try:
            for name, kind in CGROUP_PROGRAMS.items():
                mine, older = self._attached(fd, name, kind, cgroup)
                try:
                    for prog in older:
                        old = libbpf.prog_by_id(prog)
                        try:
                            libbpf.detach(old, fd, kind, f"an older {name} from {cgroup}")
                        finally:
                            os.close(old)
                    if attach and not mine:
                        libbpf.attach(self.fds[name], fd, kind, f"{name} to {cgroup}")
                    elif not attach and mine:
                        libbpf.detach(self.fds[name], fd, kind, f"{name} from {cgroup}")
                except libbpf.BpfError as e:
                    raise CaptureError(str(e)) from e
        finally:
            os.close(fd)

    def cgroup_missing(self, cgroup: Path) -> list[str]:
        """Which of our programs are not attached to ``cgroup``."""
        self.load()
        fd = _open_dir(cgroup)
        absent = []
        try:
            for name, kind in CGROUP_PROGRAMS.items():
                mine, older = self._attached(fd, name, kind, cgroup)
                if not mine:
                    absent.append(f"{name} attached to {cgroup}")
                absent += [
                    f"this build's {name} instead of an older one (program {prog}) on {cgroup}"
                    for prog in older
                ]
        finally:
            os.close(fd)
        return absent

    def _attached(
        self, cgroup_fd: int, name: str, kind: int, cgroup: Path
    ) -> tuple[bool, list[int]]:
        """Whether ours is attached, and the ids of other builds' programs of that name."""
        try:
            ids = libbpf.attached(cgroup_fd, kind, str(cgroup))
            mine = libbpf.prog_id(self.fds[name])
            older = []
            for prog in ids:
                if prog == mine:
                    continue
                fd = libbpf.prog_by_id(prog)
                try:
                    if libbpf.prog_name(fd) == name:
                        older.append(prog)
                finally:
                    os.close(fd)
        except libbpf.BpfError as e:
            raise CaptureError(str(e)) from e
        return mine in ids, older

    # -- a pod's interfaces (call inside the pod's netns) ----------------------------------

    def attach_tc(self, ns: Any, ifindex: int) -> bool:
        """Our filter on ``ifindex``'s ingress; True when we added its clsact qdisc."""
        self.load()
        made = False
        if not _has_clsact(ns, ifindex):
            ns.tc("add", "clsact", ifindex)
            made = True
        # Replaced when there (atomically: an older build's program gives way at once).
        ns.tc(
            "replace-filter" if _our_filters(ns, ifindex) else "add-filter",
            "bpf",
            ifindex,
            ":1",
            fd=self.fds[TC_PROGRAM],
            name=TC_PROGRAM,
            parent=TC_INGRESS,
            classid=1,
            direct_action=True,
            prio=TC_PRIO,
        )
        return made


def tc_attached(ns: Any, ifindex: int) -> bool:
    return bool(_our_filters(ns, ifindex))


def detach_tc(ns: Any, ifindex: int, *, made_clsact: bool) -> None:
    """Take our filter off ``ifindex`` and, when we added it and nothing else uses it,
    the clsact qdisc."""
    if _our_filters(ns, ifindex):
        ns.tc("del-filter", "bpf", ifindex, ":1", parent=TC_INGRESS, prio=TC_PRIO)
    if made_clsact and _has_clsact(ns, ifindex):
        others = _filters(ns, ifindex, TC_INGRESS) + _filters(ns, ifindex, "ffff:fff3")
        if not others:
            ns.tc("del", "clsact", ifindex)


def _has_clsact(ns: Any, ifindex: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ns.get_qdiscs(ifindex))


def _filters(ns: Any, ifindex: int, parent: str) -> list[Any]:
    # A dump gives each preference's chain head too (handle 0): not a filter.
    return [f for f in ns.get_filters(ifindex, parent=parent) if f.get("handle")]


def _our_filters(ns: Any, ifindex: int) -> list[Any]:
    if not _has_clsact(ns, ifindex):
        return []
    return [
        f
        for f in _filters(ns, ifindex, TC_INGRESS)
        if f.get("info", 0) >> 16 == TC_PRIO and f.get_attr("TCA_KIND") == "bpf"
    ]


def _unpin_tree(root: Path) -> None:
    """Unpin everything under ``root`` in bpffs, and its folders."""
    if not root.exists():
        return
    for here, dirs, files in os.walk(root, topdown=False):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                (Path(here) / name).unlink()
        for name in dirs:
            with contextlib.suppress(OSError):
                (Path(here) / name).rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def _open_dir(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise CaptureError(f"cannot open the cgroup {path}: {e.strerror}") from e


class NodeMaps:
    """ztunnel's side: which pods the node's programs capture (``zt_pods``), and the
    destination a redirected connection asked for (``zt_orig_dst``, by the accepted
    socket's (peer, local) 4-tuple: ztunnel's SO_ORIGINAL_DST)."""

    def __init__(self, pin_dir: Path) -> None:
        self.pods = libbpf.Map.pinned(pin_dir / "zt_pods", 8, _POD.size)
        try:
            self.orig = libbpf.Map.pinned(pin_dir / "zt_orig_dst", _TUPLE.size, _ORIG.size)
        except BaseException:
            self.pods.close()
            raise

    def captures(self, cookie: int) -> bool:
        return self.pods.get(struct.pack("=Q", cookie)) is not None

    def original_destination(
        self, peer: tuple[str, int], local: tuple[str, int]
    ) -> tuple[str, int] | None:
        key = _TUPLE.pack(socket.inet_aton(peer[0]), socket.inet_aton(local[0]), peer[1], local[1])
        # Taken, so that a later connection of the same 4-tuple made straight to 15001
        # (not redirected: the pod's own address is not captured) finds nothing.
        raw = self.orig.take(key)
        if raw is None:
            return None
        ip, port, _ = _ORIG.unpack(raw)
        return socket.inet_ntoa(ip), socket.ntohs(port)

    def close(self) -> None:
        self.pods.close()
        self.orig.close()
