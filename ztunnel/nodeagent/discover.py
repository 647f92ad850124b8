"""Pods of the node that ztunnel-cni never saw, and where their network namespaces are.

A pod can start on the node without passing through ``ztunnel-cni``: it was
running before the agent first installed the plugin, or the primary CNI
rewrote its configuration (dropping our entry) just before the pod's ADD.
The view still shows it, so the agent finds its network namespace itself and
records it as the plugin would have, after which it is enrolled like any
other; Istio's node agent does the same (its ``PodNetnsProcFinder``).

* Where the source knows the namespace (meshlab's state file names each pod's
  sandbox and netns), that is used as is.
* On Kubernetes, :class:`ProcFinder` reads the node's ``/proc`` (mounted at
  ``--host-proc``): each process's ``cgroup`` names its pod's UID (kubelet's
  ``kubepods…pod<uid>`` directories, ``-`` or ``_`` separated under the
  systemd driver) and its container; ``ns/net`` is its network namespace. The
  path kept is the runtime's pinned ``/var/run/netns/...`` file of the same
  inode when there is one (it lives as long as the sandbox), else the
  process's own ``ns/net``. The sandbox's id is the ``pause`` process's
  container, the id CNI is given, so a later CNI DEL finds the record.

Only pods that the view says have an address are looked for: the address is
known once the runtime's CNI ADD finished, so a pod whose ADD is still
running (and about to reach ``ztunnel-cni``) is never raced. Host-network
pods (the node's own namespace) are never recorded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ztunnel.nodeagent.records import PodRecord, RecordError, check_uid
from ztunnel.nodeagent.view import ClusterView, PodFacts

log = logging.getLogger("ztunnel.nodeagent.discover")

_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_CONTAINER = re.compile(r"(?:^|[-/:])([0-9a-f]{64})(?:\.scope)?$")


@dataclass(frozen=True, slots=True)
class Found:
    """A pod's network namespace as found among the node's processes."""

    netns: str
    sandbox: str | None  # the pause container's id, when it was seen


def cgroup_ids(text: str) -> tuple[str, str | None] | None:
    """(pod UID, container id or None) named by a ``/proc/PID/cgroup``, or None."""
    for line in text.splitlines():
        path = line.rsplit(":", 1)[-1]
        m = _POD_UID.search(path)
        if m is None:
            continue
        uid = m.group(1).replace("_", "-")
        c = _CONTAINER.search(path)
        return uid, (c.group(1) if c else None)
    return None


class ProcFinder:
    """Finds pods' network namespaces through the node's ``/proc``."""

    def __init__(self, proc: Path, netns_dir: Path = Path("/var/run/netns")) -> None:
        self.proc = proc
        self.netns_dir = netns_dir

    def _pinned(self) -> dict[tuple[int, int], str]:
        pinned: dict[tuple[int, int], str] = {}
        try:
            entries = list(self.netns_dir.iterdir())
        except OSError:
            return pinned
        for path in entries:
            try:
                st = path.stat()
            except OSError:
                continue
            pinned[(st.st_dev, st.st_ino)] = str(path)
        return pinned

    def find(self, uids: Iterable[str]) -> dict[str, Found]:
        """The network namespace of each of ``uids`` (pod UIDs) that has a process."""
        wanted = set(uids)
        if not wanted:
            return {}
        try:
            host = (self.proc / "1" / "ns" / "net").stat()
            host_ns = (host.st_dev, host.st_ino)
        except OSError:
            host_ns = None
        pinned: dict[tuple[int, int], str] | None = None
        found: dict[str, Found] = {}
        try:
            pids = [p.name for p in self.proc.iterdir() if p.name.isdigit()]
        except OSError as e:
            log.warning("cannot list %s to find pods: %s", self.proc, e)
            return {}
        for pid in pids:
            base = self.proc / pid
            try:
                ids = cgroup_ids((base / "cgroup").read_text())
            except (OSError, UnicodeDecodeError):
                continue  # gone meanwhile, or not readable
            if ids is None or ids[0] not in wanted:
                continue
            uid, container = ids
            net = base / "ns" / "net"
            try:
                st = net.stat()
                pause = (base / "comm").read_text().strip() == "pause"
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == host_ns:
                continue  # a host-network pod
            if uid in found and not pause:
                continue  # the pause process, when there is one, names the sandbox
            if pinned is None:
                pinned = self._pinned()
            path = pinned.get((st.st_dev, st.st_ino), str(net))
            found[uid] = Found(path, container if pause else None)
        return found


def unrecorded(
    view: ClusterView, records: Mapping[str, PodRecord], wanted: Iterable[tuple[str, str]]
) -> list[PodFacts]:
    """The pods of ``wanted`` (namespace, name) that have an address and no record."""
    recorded = {(r.namespace, r.name) for r in records.values()}
    out = []
    for key in wanted:
        facts = view.pods.get(key)
        if facts is None or key in recorded or not facts.ips:
            continue
        out.append(facts)
    return out


def record_for(facts: PodFacts, found: Found | None) -> PodRecord | None:
    """What ztunnel-cni would have recorded for the pod, from what the agent found."""
    if facts.netns and facts.sandbox:  # the source knows (meshlab)
        uid, netns = facts.sandbox, facts.netns
    elif found is not None and facts.uid:
        uid, netns = found.sandbox or f"pod-{facts.uid}", found.netns
    else:
        return None
    try:
        check_uid(uid)
    except RecordError:
        return None
    return PodRecord(uid, facts.namespace, facts.name, netns, tuple(facts.ips), facts.uid or "")
