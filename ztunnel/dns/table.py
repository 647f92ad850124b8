"""The names table: service hostnames of one xDS snapshot, with their addresses."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from mesh.model import Workload
from mesh.xds import XdsState
from ztunnel.index import StateIndex

log = logging.getLogger("ztunnel.dns")


DNS_PORT = 15053
TTL_S = 30
UDP_PAYLOAD = 512  # the most a UDP answer may hold without EDNS (RFC 1035)
EDNS_PAYLOAD = 1232  # what we advertise (DNS flag day 2020)
HEADER_LEN = 12
ID_FLAGS = struct.Struct("!HH")  # the start of the header: id, flags
U16 = struct.Struct("!H")  # a query id, or a TCP length prefix (RFC 1035 4.2.2)
OPCODE_BITS = 0x7800

Labels = tuple[bytes, ...]  # a name's labels, lower-case, without the root
SocketFactory = Callable[[int, int], Awaitable[socket.socket]]
Snapshot = Callable[[], StateIndex | XdsState]


# -- the names table -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Host:
    """The addresses one service gives its hostname."""

    namespace: str
    v4: tuple[str, ...] = ()
    v6: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Table:
    """Hostname (as lower-case labels) -> the services that claim it, by namespace."""

    hosts: Mapping[Labels, tuple[Host, ...]] = field(default_factory=lambda: MappingProxyType({}))
    has_wildcards: bool = False  # a ``*.`` hostname exists: try wildcard matches too

    def get(self, hostname: str) -> tuple[Host, ...]:
        """The services for ``hostname`` (text, any case), for readers and tests."""
        labels = labels_of(hostname)
        return self.hosts.get(labels, ()) if labels is not None else ()


def build_table(state: XdsState | StateIndex, cluster_domain: str = "cluster.local") -> Table:
    """Every service hostname of the snapshot and the addresses to answer for it.

    A service with VIPs answers with them. One without VIPs is a Kubernetes
    headless service when its hostname is under ``svc.<cluster_domain>``: it
    answers with the first address of each family of each of its endpoints.
    Any other service without VIPs is left out, so its name goes upstream.
    """
    if isinstance(state, StateIndex):
        state = state.state
    headless_domain = labels_of(f"svc.{cluster_domain}") or ()
    members: dict[str, list[Workload]] = {}
    for workload in sorted(state.workloads.values(), key=lambda w: w.uid):
        for service_name in workload.services:
            members.setdefault(service_name, []).append(workload)
    hosts: dict[Labels, list[Host]] = {}
    for service in state.services.values():
        key = labels_of(service.hostname)
        if not key:
            continue  # not a DNS name: nothing can ask for it
        if service.addresses:
            v4 = tuple(str(a) for a in service.addresses if a.version == 4)
            v6 = tuple(str(a) for a in service.addresses if a.version == 6)
        elif has_domain(key, headless_domain):
            endpoints = members.get(service.resource_name, [])
            v4 = tuple(_first(w, 4) for w in endpoints if _first(w, 4))
            v6 = tuple(_first(w, 6) for w in endpoints if _first(w, 6))
        else:
            continue
        hosts.setdefault(key, []).append(Host(namespace=service.namespace, v4=v4, v6=v6))
    return Table(
        hosts=MappingProxyType(
            {k: tuple(sorted(v, key=lambda h: (h.namespace, h.v4, h.v6))) for k, v in hosts.items()}
        ),
        has_wildcards=any(k[0] == b"*" for k in hosts),
    )


class TableCache:
    """The table of the latest snapshot, rebuilt only when the snapshot object changes.

    Every pod's proxy sees the same snapshots: give them one cache and each
    snapshot's table is built once for the node.
    """

    def __init__(self, cluster_domain: str = "cluster.local") -> None:
        self.cluster_domain = cluster_domain
        self._state: XdsState | None = None
        self._table = Table()
        self.builds = 0

    def get(self, state: XdsState | StateIndex) -> Table:
        if isinstance(state, StateIndex):
            state = state.state
        if state is not self._state:
            self._table = build_table(state, self.cluster_domain)
            self._state = state
            self.builds += 1
        return self._table


def _first(workload: Workload, version: int) -> str:
    return next((str(a) for a in workload.addresses if a.version == version), "")


def labels_of(text: str) -> Labels | None:
    try:
        return dns.name.from_text(text).canonicalize().labels[:-1]
    except dns.exception.DNSException:
        return None


def has_domain(name: Labels, domain: Labels) -> bool:
    """``name`` is strictly under ``domain`` (something is left once it is taken off)."""
    return 0 < len(domain) < len(name) and name[-len(domain) :] == domain


@lru_cache(maxsize=8)
def domain_labels(cluster_domain: str) -> Labels:
    labels = labels_of(cluster_domain)
    if not labels:
        raise ValueError(f"cluster domain {cluster_domain!r} is not a DNS name")
    return labels
