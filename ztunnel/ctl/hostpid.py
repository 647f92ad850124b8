"""The pod netns paths of a ztunnel that runs in a container, as the node's host sees them.

ztunnel's admin server gives each pod's netns as ``/proc/<its pid>/fd/<n>``,
with the pid it sees. In a container (its own pid namespace, as a Kubernetes
pod or ``meshlab up --image``) that pid is its container's (often 1), not the
host's. On the node's host, the ztunnel process is the one in the node's
netns holding the socket that listens on its admin port, and whose last
``NSpid`` (its pid in its own namespace) is the pid the dump gives; its host
pid is the first (``ss -p`` finds a socket's process the same way).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from ztunnel.netns import in_netns

TCP_LISTEN = "0A"
_FD_PATH = re.compile(r"^/proc/(\d+)/(fd/\d+)$")


def _listener_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on TCP ``port`` in this thread's netns."""
    found = set()
    for proto in ("tcp", "tcp6"):
        try:
            text = Path(f"/proc/thread-self/net/{proto}").read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines()[1:]:
            fields = line.split()
            listens = len(fields) > 9 and fields[3] == TCP_LISTEN
            if listens and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(fields[9])
    return found


def _nspids(pid: str) -> list[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(p) for p in line.split()[1:]]
    except OSError:
        pass
    return []


def host_pid(netns: Path, port: int, pid: int) -> int | None:
    """The host pid of the process in ``netns`` listening on ``port`` that calls itself
    ``pid``, or None when there is none."""
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        inodes = in_netns(fd, lambda: _listener_inodes(port))
    finally:
        os.close(fd)
    sockets = {f"socket:[{i}]" for i in inodes}
    ns = netns.stat().st_ino
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "ns" / "net").stat().st_ino != ns:
                continue
            holds = any(str(f.readlink()) in sockets for f in (entry / "fd").iterdir())
        except OSError:
            continue
        nspids = _nspids(entry.name)
        if holds and nspids and nspids[-1] == pid:
            return nspids[0]
    return None


def translator(netns: Path, port: int) -> Callable[[str], str]:
    """Maps the dump's ``/proc/<pid>/fd/<n>`` paths to the host's view (unchanged when
    ztunnel shares the host's pid namespace, or cannot be found)."""
    seen: dict[int, int | None] = {}

    def translate(path: str) -> str:
        m = _FD_PATH.match(path)
        if m is None:
            return path
        pid = int(m.group(1))
        if pid not in seen:
            seen[pid] = host_pid(netns, port, pid)
        host = seen[pid]
        return path if host is None else f"/proc/{host}/{m.group(2)}"

    return translate
