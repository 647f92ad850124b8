"""The ``baggage`` ztunnel sends on an HBONE CONNECT, and what the destination takes from it.

Sans-I/O: the pod proxy calls these with the snapshot it decides on.

**Source side** (:class:`SourceBaggage`). The members Istio's ztunnel sends
(its ``baggage()``), for the source workload:

* ``k8s.cluster.name``, ``k8s.namespace.name``;
* ``k8s.<type>.name``: the workload's name (``workload_name``, else the pod's)
  under its workload type. The mesh model carries no type (every workload is
  a pod: meshd's feed says ``POD``), so the key is ``k8s.pod.name``; a real
  Istio peer reads any ``k8s.<type>.name`` as the workload name alike;
* ``service.name``, ``service.version``: the canonical service and revision.

And, when the source resolved a service (a VIP, or a service hostname),
members that are **ours, not Istio's** (Istio's ztunnel ignores keys it does
not know), naming the service the connection was for:

* ``destination.service.host``: its hostname (``echo.server.svc.cluster.local``);
* ``destination.service.namespace``: its namespace;
* ``destination.service.name``: its short name.

Members with empty values are left out. Values are percent-encoded by
:func:`mesh.hbone.headers.baggage`.

**Destination side.** A peer's words never become a label value by
themselves, so a peer cannot grow the metrics' label sets without bound:

* :func:`inbound_service`: ``destination_service*`` come from a service in
  ztunnel's own index that fronts the destination workload. Named in baggage
  (by namespace and host, and name if given): that service, if it exists and
  fronts this workload, else none (``unknown``); not named: the one service
  that fronts the workload on the connection's port, if only one does (as
  Istio's ztunnel ``guess_inbound_service`` does on a port match, but never
  picking among several).
* :class:`DerivedSources`: ``source_*`` labels come from the index when it
  knows the source address. Only when it does not (a peer in another cluster)
  are they taken from baggage, and then only when the baggage namespace is the
  namespace of the peer's mTLS-verified identity, every value is a short
  Kubernetes-style name, and the node has seen fewer than
  :data:`MAX_DERIVED_SOURCES` distinct such sources (past that: ``unknown``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mesh.hbone.headers import baggage
from mesh.identity import SpiffeId
from mesh.model import Port, Service, Workload
from ztunnel.index import StateIndex

CLUSTER = "k8s.cluster.name"
NAMESPACE = "k8s.namespace.name"
POD = "k8s.pod.name"
# Every key Istio's ztunnel reads as the workload name, in the order tried here.
WORKLOAD_KEYS = (
    "k8s.deployment.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.cronjob.name",
    "k8s.job.name",
    POD,
)
SERVICE_NAME = "service.name"
SERVICE_VERSION = "service.version"
# Ours (see the module docstring).
DESTINATION_HOST = "destination.service.host"
DESTINATION_NAMESPACE = "destination.service.namespace"
DESTINATION_NAME = "destination.service.name"

MAX_DERIVED_SOURCES = 256
_CACHED = 256
# A DNS label or a dotted name of them, as Kubernetes names, versions and cluster ids are.
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")


def source_fields(source: Workload | None, service: Service | None) -> dict[str, str]:
    """The baggage members for a connection from ``source`` to ``service``."""
    fields: dict[str, str] = {}
    if source is not None:
        fields[CLUSTER] = source.cluster_id
        fields[NAMESPACE] = source.namespace
        fields[POD] = source.workload_name or source.name
        fields[SERVICE_NAME] = source.canonical_name
        fields[SERVICE_VERSION] = source.canonical_revision
    if service is not None:
        fields[DESTINATION_HOST] = service.hostname
        fields[DESTINATION_NAMESPACE] = service.namespace
        fields[DESTINATION_NAME] = service.name
    return {k: v for k, v in fields.items() if v}


class SourceBaggage:
    """The encoded ``baggage`` header of one pod's outbound connections, built once per
    (source workload, service) pair of objects: snapshots keep unchanged objects, so
    this is a dictionary lookup per connection."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[Workload | None, Service | None, str]] = {}

    def header(self, source: Workload | None, service: Service | None) -> str:
        """The header value ("" when there is nothing to say)."""
        key = (id(source), id(service))
        found = self._cache.get(key)
        if found is not None and found[0] is source and found[1] is service:
            return found[2]
        value = baggage(source_fields(source, service))
        if len(self._cache) >= _CACHED:
            self._cache.clear()
        # The objects are kept with the key so that a reused id() is not taken for them.
        self._cache[key] = (source, service, value)
        return value


def _fronts(ports: tuple[Port, ...], port: int) -> bool:
    """Whether a service's ports on a workload lead to the workload's ``port`` (a
    target port of 0 means the service port is used as is)."""
    return any(
        p.target_port == port or (p.target_port == 0 and p.service_port == port) for p in ports
    )


def inbound_service(
    index: StateIndex, workload: Workload, port: int, fields: Mapping[str, str]
) -> Service | None:
    """The service an inbound connection to ``workload``'s ``port`` was for, as the
    destination labels it: only ever a service of ``index`` fronting ``workload``."""
    if DESTINATION_HOST in fields or DESTINATION_NAMESPACE in fields:
        # Named: that one, or none. No guessing past what the peer said.
        host, namespace = fields.get(DESTINATION_HOST, ""), fields.get(DESTINATION_NAMESPACE, "")
        resource = f"{namespace}/{host}"
        if not host or not namespace or resource not in workload.services:
            return None
        service = index.state.services.get(resource)
        name = fields.get(DESTINATION_NAME)
        if service is None or (name is not None and name != service.name):
            return None
        return service
    # Not named (a peer that sends no baggage, or Istio's, which does not say): the
    # one service that fronts this workload on this port, if there is exactly one.
    found: Service | None = None
    for resource, ports in workload.services.items():
        service = index.state.services.get(resource)
        if service is None or not _fronts(ports, port):
            continue
        if found is not None:
            return None  # several: which one the client asked for is not known
        found = service
    return found


class DerivedSources:
    """Source workloads described by peers' baggage, for the labels of connections
    from addresses the index does not know; at most ``limit`` distinct ones per node,
    each one object (so the metrics' series cache keeps working)."""

    def __init__(self, limit: int = MAX_DERIVED_SOURCES) -> None:
        self.limit = limit
        self._known: dict[tuple[str, ...], Workload] = {}

    def __len__(self) -> int:
        return len(self._known)

    def derive(self, fields: Mapping[str, str], peer: SpiffeId | None) -> Workload | None:
        """The source ``fields`` describe, or None when they are not to be used."""
        if peer is None or fields.get(NAMESPACE) != peer.namespace:
            return None
        name = next((fields[k] for k in WORKLOAD_KEYS if k in fields), "")
        canonical = fields.get(SERVICE_NAME, "")
        revision = fields.get(SERVICE_VERSION, "")
        cluster = fields.get(CLUSTER, "")
        if not _NAME.fullmatch(name):
            return None
        if any(v and not _NAME.fullmatch(v) for v in (canonical, revision, cluster)):
            return None
        key: tuple[str, ...] = (peer.trust_domain, peer.namespace, peer.service_account)
        key += (name, canonical, revision, cluster)
        found = self._known.get(key)
        if found is None:
            if len(self._known) >= self.limit:
                return None
            found = self._known[key] = Workload(
                uid=f"baggage/{cluster}/{peer.namespace}/{name}",
                name=name,
                namespace=peer.namespace,
                addresses=(),
                service_account=peer.service_account,
                trust_domain=peer.trust_domain,
                canonical_name=canonical,
                canonical_revision=revision,
                workload_name=name,
                cluster_id=cluster,
            )
        return found
