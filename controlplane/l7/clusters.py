"""The clusters a waypoint's routes send to, with the pods behind them as endpoints.

One cluster per backend service port, protocol and subset, with the
service's DestinationRule policy (Istio's defaults otherwise); its endpoints
the pods the service selects (or its EndpointSlices list), healthy or not,
reached over HBONE when they are in the mesh.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from controlplane.l7.ir import DEFAULT_POLICY, BackendRef, PortRoutes, Protocol, ServicePolicy
from controlplane.l7.protocol import declared_protocol
from controlplane.l7.share import ClusterSpec, EndpointSpec, cluster_name, service_key
from controlplane.l7.status import Out
from controlplane.state import PodInfo, ServiceInfo, SourceState
from mesh.ambient import in_ambient


def clusters_for(
    port_routes: Iterable[PortRoutes],
    services: Mapping[str, ServiceInfo],
    ported: Mapping[str, list[PortRoutes]],
    policies: Mapping[str, ServicePolicy],
    endpoints: Endpoints,
    out: Out,
) -> dict[str, ClusterSpec]:
    """The clusters ``port_routes`` send to, by name; a subset no DestinationRule
    defines is said in ``out`` and not built."""
    wanted: dict[str, tuple[str, int, str, Protocol]] = {}
    for pr in port_routes:
        for backend, http in _backends(pr):
            if backend.problem:
                continue
            target = services[backend.service]
            protocol = _port_protocol(target, backend.port, ported)
            if http and not protocol.is_http:
                # An HTTP route's backend is spoken to in HTTP, whatever the port
                # says of itself (an unnamed port with no route of its own is TCP).
                protocol = Protocol.HTTP
            elif not http:
                protocol = Protocol.TCP
            name = cluster_name(
                backend.service.split("/", 1)[1], backend.port, protocol, backend.subset
            )
            wanted[name] = (backend.service, backend.port, backend.subset, protocol)
    clusters = {}
    for name, (skey, port, subset, protocol) in sorted(wanted.items()):
        target = services[skey]
        policy = policies.get(skey)
        labels = {}
        if subset:
            chosen = policy.subset(subset) if policy is not None else None
            if chosen is None:
                # Not built: the routes' share for it is answered by Envoy (503, NC).
                out.reject(
                    f"service {skey}: no DestinationRule subset {subset!r}; "
                    "requests routed to it fail"
                )
                continue
            labels = dict(chosen.labels)
        clusters[name] = ClusterSpec(
            name=name,
            service=skey,
            hostname=skey.split("/", 1)[1],
            port=port,
            subset=subset,
            protocol=protocol,
            policy=policy.for_port(port, subset) if policy is not None else DEFAULT_POLICY,
            endpoints=endpoints.of(target, port, labels),
        )
    return clusters


def _backends(pr: PortRoutes) -> Iterable[tuple[BackendRef, bool]]:
    """Every backend the port sends to, and whether it is sent HTTP (False: TCP)."""
    for b in pr.tcp_backends:
        yield b, False
    for rule in pr.rules:
        for b in rule.backends:
            yield b, True
        for m in rule.mirrors:
            yield m.backend, True


def _port_protocol(
    info: ServiceInfo, port: int, ported: Mapping[str, list[PortRoutes]]
) -> Protocol:
    for pr in ported.get(service_key(info.namespace, info.name), ()):
        if pr.port == port:
            return pr.protocol
    for p in info.ports:
        if p.port == port:
            return declared_protocol(p) or Protocol.TCP
    return Protocol.HTTP


class Endpoints:
    """The pods behind a service's ports: those its selector picks (without one, those
    its EndpointSlices list)."""

    def __init__(self, state: SourceState, namespaces: Mapping[str, Mapping[str, str]]) -> None:
        self.state = state
        self.namespaces = namespaces
        self.slices: dict[str, set[str]] = {}
        for s in state.endpoint_slices:
            self.slices.setdefault(service_key(s.namespace, s.service), set()).update(s.addresses)
        self.pods_by_ns: dict[str, list[PodInfo]] = {}
        for pod in state.pods:
            if pod.ip:
                self.pods_by_ns.setdefault(pod.namespace, []).append(pod)

    def of(
        self, info: ServiceInfo, port: int, subset_labels: Mapping[str, str]
    ) -> tuple[EndpointSpec, ...]:
        target = next((p.target_port for p in info.ports if p.port == port), port)
        key = service_key(info.namespace, info.name)
        found = []
        for pod in self.pods_by_ns.get(info.namespace, ()):
            if info.selector:
                if not all(pod.labels.get(k) == v for k, v in info.selector.items()):
                    continue
            elif pod.ip not in self.slices.get(key, ()):
                continue
            if not all(pod.labels.get(k) == v for k, v in subset_labels.items()):
                continue
            labels = pod.labels
            found.append(
                EndpointSpec(
                    ip=str(pod.ip),
                    port=target,
                    healthy=pod.ready,
                    hbone=in_ambient(labels, self.namespaces.get(pod.namespace, {})),
                    identity=(
                        f"spiffe://{self.state.trust_domain}/ns/{pod.namespace}"
                        f"/sa/{pod.service_account}"
                    ),
                    pod=pod.name,
                    namespace=pod.namespace,
                    canonical_name=labels.get("service.istio.io/canonical-name")
                    or labels.get("app")
                    or pod.name,
                    canonical_revision=labels.get("service.istio.io/canonical-revision")
                    or labels.get("version")
                    or "latest",
                    node=pod.node,
                    cluster_id=self.state.cluster_id,
                )
            )
        return tuple(sorted(found, key=lambda e: tuple(int(x) for x in re.findall(r"\d+", e.ip))))
