"""Finding a pod's cgroup v2 directory, where the eBPF backend attaches.

kubelet makes one cgroup per pod before its sandbox (so before CNI ADD), named
after the pod's UID: ``kubepods/burstable/pod<uid>`` with the cgroupfs driver,
``kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice``
with systemd's. The UID is in CNI_ARGS (``K8S_POD_UID``, which containerd and
CRI-O pass, and meshlab too). Without it, the cgroup of a process that lives in
the pod's network namespace is taken.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

MAX_DEPTH = 5


class CgroupNotFound(LookupError):
    """No cgroup for the pod; the message says where it was looked for."""


def find_pod_cgroup(root: Path, pod_uid: str, *, netns: Path | None = None) -> Path:
    """The pod's cgroup directory under ``root`` (a cgroup v2 tree)."""
    if pod_uid:
        names = {f"pod{pod_uid}", f"pod{pod_uid.replace('-', '_')}"}
        found = _search(root, names)
        if found is not None:
            return found
    if netns is not None:
        found = cgroup_of_netns(netns, root)
        if found is not None:
            return found
    raise CgroupNotFound(
        f"no cgroup for the pod under {root}"
        + (f" (looked for a directory naming pod{pod_uid})" if pod_uid else " (no K8S_POD_UID)")
        + (f" and no process in {netns}" if netns is not None else "")
    )


def _search(root: Path, names: set[str]) -> Path | None:
    level = [root]
    for _ in range(MAX_DEPTH):
        below: list[Path] = []
        for directory in level:
            try:
                with os.scandir(directory) as found:
                    entries = list(found)
            except OSError:
                continue
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                name = entry.name.removesuffix(".slice")
                if any(name == n or name.endswith("-" + n) for n in names):
                    return Path(entry.path)
                below.append(Path(entry.path))
        level = below
    return None


def cgroup_of_netns(netns: Path, root: Path) -> Path | None:
    """The cgroup (under ``root``) of a process whose network namespace is ``netns``."""
    try:
        want = netns.stat()
    except OSError:
        return None
    mount = _mount_of(root)
    if mount is None:
        return None
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    for pid in pids:
        try:
            ns = Path(f"/proc/{pid}/ns/net").stat()
            if (ns.st_dev, ns.st_ino) != (want.st_dev, want.st_ino):
                continue
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("0::"):
                path = mount / line[3:].lstrip("/")
                if path == root or root in path.parents:
                    return path
    return None


def _mount_of(root: Path) -> Path | None:
    """The cgroup2 mount point ``root`` lies in."""
    best: Path | None = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) > 4 and right.split()[:1] == ["cgroup2"]:
            point = Path(fields[4])
            inside = point == root or point in root.parents
            if inside and (best is None or len(point.parts) > len(best.parts)):
                best = point
    return best


def find_by_id(root: Path, wanted: int) -> Path | None:
    """The cgroup directory under ``root`` whose id is ``wanted`` (a walk: for
    diagnostics, not for every connection)."""
    for here, _dirs, _ in os.walk(root):
        path = Path(here)
        with contextlib.suppress(OSError):
            if path.stat().st_ino == wanted:
                return path
    return None


def cgroup_id(path: Path) -> int:
    """The kernel's id of a cgroup v2 directory (its inode number)."""
    return path.stat().st_ino
