"""Translation: a :class:`SourceState` -> the Workload API and Authorization resources.

This module is the specification: a pure function over an immutable input,
written to be read, tested without a server. It follows Istio's ambient
rules:

* every pod with an IP is a workload; it gets tunnel protocol HBONE when its
  namespace is labelled ``istio.io/dataplane-mode=ambient`` and the pod does
  not opt out with ``istio.io/dataplane-mode=none``;
* a service maps to its VIPs and TCP ports; each workload lists the services
  it is an endpoint of, with their ports: those whose selector matches its
  labels or, for a service without a selector, whose EndpointSlices list
  its IP;
* a service asks ztunnel to prefer close endpoints as istiod says it does:
  ``internalTrafficPolicy: Local`` allows only endpoints on the client's node
  (NODE, STRICT); otherwise ``trafficDistribution`` (or, when that is unset
  or unknown, the ``networking.istio.io/traffic-distribution`` annotation)
  ``PreferClose``/``PreferSameZone`` prefers the client's network, region and
  zone, ``PreferSameNode`` those and its subzone and node (FAILOVER); an
  unknown value is no preference at all;
* ``istio.io/use-waypoint`` on the pod, the service or the namespace (in
  that order of precedence) names a waypoint Gateway, by Istio's rules
  (:mod:`controlplane.l7.binding`); its address becomes the workload's or
  service's waypoint, and a waypoint asked for that cannot be used is named
  by hostname alone, so that ztunnel refuses the traffic (fail closed);
* an AuthorizationPolicy with a selector is WORKLOAD_SELECTOR-scoped and
  named in each selected workload; without one it is NAMESPACE-scoped, or
  GLOBAL in the root namespace;
* an object that cannot be used (a bad IP, an IP or VIP already taken, a
  waypoint that does not exist) is left out and reported, alone.

meshd runs :class:`controlplane.incremental.IncrementalTranslator`, which
gives the same result while redoing only what a change touches; the tests
hold the two to each other.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controlplane.l7.binding import bind
from controlplane.state import (
    NODE_LOCAL_TRAFFIC_POLICY,
    PREFER_CLOSE,
    PREFER_SAME_NODE,
    PREFER_SAME_ZONE,
    TRAFFIC_DISTRIBUTION_ANNOTATION,
    USE_WAYPOINT,
    USE_WAYPOINT_NAMESPACE,
    AuthorizationPolicyInfo,
    EndpointSliceInfo,
    PodInfo,
    ServiceInfo,
    SourceState,
    WaypointInfo,
)
from mesh.ambient import in_ambient as labels_in_ambient
from mesh.model import (
    Action,
    GatewayAddress,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Policy,
    Port,
    Scope,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)

CLUSTER_DOMAIN = "svc.cluster.local"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# What istiod sends for each (pilot/pkg/serviceregistry/kube/controller/ambient/services.go).
_NETWORK, _REGION, _ZONE, _SUBZONE, _NODE = (
    LoadBalancingScope.NETWORK,
    LoadBalancingScope.REGION,
    LoadBalancingScope.ZONE,
    LoadBalancingScope.SUBZONE,
    LoadBalancingScope.NODE,
)
NODE_LOCAL = LoadBalancing(routing_preference=(_NODE,), mode=LoadBalancingMode.STRICT)
PREFER_SAME_ZONE_LB = LoadBalancing(
    routing_preference=(_NETWORK, _REGION, _ZONE), mode=LoadBalancingMode.FAILOVER
)
PREFER_SAME_NODE_LB = LoadBalancing(
    routing_preference=(_NETWORK, _REGION, _ZONE, _SUBZONE, _NODE),
    mode=LoadBalancingMode.FAILOVER,
)
_DISTRIBUTIONS = {
    PREFER_CLOSE: PREFER_SAME_ZONE_LB,
    PREFER_SAME_ZONE: PREFER_SAME_ZONE_LB,
    PREFER_SAME_NODE: PREFER_SAME_NODE_LB,
}
_DISTRIBUTIONS_FOLDED = {k.lower(): v for k, v in _DISTRIBUTIONS.items()}


@dataclass(frozen=True, slots=True)
class Resources:
    """The whole feed at one moment: workloads and services by name, policies by name."""

    workloads: Mapping[str, Workload] = field(default_factory=lambda: MappingProxyType({}))
    services: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}))
    policies: Mapping[str, Policy] = field(default_factory=lambda: MappingProxyType({}))
    # Objects refused during translation (for meshd's status), one line each, sorted.
    rejected: tuple[str, ...] = ()


# ------------------------------------------------------------ building blocks


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes selector semantics; an empty selector selects nothing."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def workload_uid(cluster_id: str, namespace: str, name: str) -> str:
    """Istio's uid format for pods: ``<cluster>//Pod/<namespace>/<name>``."""
    return f"{cluster_id}//Pod/{namespace}/{name}"


def service_key(info: ServiceInfo) -> str:
    """A service's xDS name: ``namespace/hostname``."""
    return service_key_of(info.namespace, info.name)


def service_key_of(namespace: str, name: str) -> str:
    return f"{namespace}/{name}.{namespace}.{CLUSTER_DOMAIN}"


def endpoint_addresses(slices: Iterable[EndpointSliceInfo]) -> dict[str, frozenset[str]]:
    """The addresses each service's EndpointSlices list, by service key."""
    found: dict[str, set[str]] = {}
    for s in slices:
        found.setdefault(service_key_of(s.namespace, s.service), set()).update(s.addresses)
    return {k: frozenset(v) for k, v in found.items()}


def backs(info: ServiceInfo, pod: PodInfo, endpoints: Mapping[str, frozenset[str]]) -> bool:
    """Whether ``pod`` is an endpoint of ``info``: by selector; without one, by EndpointSlice."""
    if info.namespace != pod.namespace:
        return False
    if info.selector:
        return selects(info.selector, pod.labels)
    return pod.ip in endpoints.get(service_key(info), frozenset())


def policy_key(info: AuthorizationPolicyInfo) -> str:
    return f"{info.namespace}/{info.name}"


@functools.lru_cache(maxsize=1 << 17)
def parse_ip(text: str) -> IPAddress | None:
    """Parsed once per address: parsing was half the cost of a 10,000-pod translation."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def service_vips(info: ServiceInfo) -> tuple[IPAddress, ...] | str:
    """The VIPs of a service, or why it has none that can be used."""
    vips = []
    for text in info.cluster_ips:
        if text == "None":
            continue  # headless
        ip = parse_ip(text)
        if ip is None:
            return f"service {info.namespace}/{info.name}: {text!r} is not an IP address"
        vips.append(ip)
    return tuple(vips)


def waypoint_labels(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k in (USE_WAYPOINT, USE_WAYPOINT_NAMESPACE)}


def resolve_waypoint(
    kind: str,
    what: str,
    namespace: str,
    object_labels: Mapping[str, str],
    namespaces: Mapping[str, Mapping[str, str]],
    waypoints: Mapping[tuple[str, str], WaypointInfo],
) -> tuple[GatewayAddress | None, str | None]:
    """The waypoint a ``service`` or ``workload`` asks for, and a refusal line when it
    cannot be used.

    A waypoint that is asked for but cannot be used (missing, not accepted,
    without an address) is still named, by hostname only: ztunnel cannot
    reach it and refuses the connection, rather than skipping the waypoint
    and its L7 policy (Istio sends such traffic straight to the destination).
    """
    binding = bind(
        kind=kind,
        what=what,
        namespace=namespace,
        object_labels=object_labels,
        namespace_labels=namespaces.get(namespace, {}),
        waypoints=waypoints,
        all_namespaces=namespaces,
    )
    if binding is None:
        return None, None
    if not binding.usable:
        return GatewayAddress(hostname=f"{binding.namespace}/{binding.hostname}"), binding.problem
    assert binding.waypoint is not None and binding.waypoint.address is not None
    ip = parse_ip(binding.waypoint.address)
    if ip is None:
        problem = (
            f"{what}: waypoint {binding.key} address {binding.waypoint.address!r} is not an IP"
        )
        return GatewayAddress(hostname=f"{binding.namespace}/{binding.hostname}"), problem
    return GatewayAddress(address=ip), None


def in_ambient(pod: PodInfo, namespace_labels: Mapping[str, str]) -> bool:
    return labels_in_ambient(pod.labels, namespace_labels)


def load_balancing(info: ServiceInfo) -> LoadBalancing | None:
    """Which endpoints the service's clients prefer; None: any (istiod's rule).

    internalTrafficPolicy Local wins; then spec.trafficDistribution when it
    holds a value Istio knows; then the annotation, in any case. Anything else
    is no preference: istiod ignores values it does not know (and the API
    server refuses unknown ones in spec, so only a newer Kubernetes has them).
    """
    if info.internal_traffic_policy == NODE_LOCAL_TRAFFIC_POLICY:
        return NODE_LOCAL
    chosen = _DISTRIBUTIONS.get(info.traffic_distribution)
    if chosen is None:
        annotation = info.annotations.get(TRAFFIC_DISTRIBUTION_ANNOTATION, "")
        chosen = _DISTRIBUTIONS_FOLDED.get(annotation.lower())
    return chosen


def build_service(
    info: ServiceInfo, vips: tuple[IPAddress, ...], waypoint: GatewayAddress | None
) -> Service:
    return Service(
        name=info.name,
        namespace=info.namespace,
        hostname=f"{info.name}.{info.namespace}.{CLUSTER_DOMAIN}",
        addresses=vips,
        ports=tuple(
            Port(service_port=p.port, target_port=p.target_port)
            for p in info.ports
            if p.protocol == "TCP"
        ),
        waypoint=waypoint,
        load_balancing=load_balancing(info),
    )


def build_policy(info: AuthorizationPolicyInfo, root_namespace: str) -> Policy:
    if info.selector:
        scope = Scope.WORKLOAD_SELECTOR
    elif info.namespace == root_namespace:
        scope = Scope.GLOBAL
    else:
        scope = Scope.NAMESPACE
    return Policy(
        name=info.name,
        namespace=info.namespace,
        scope=scope,
        action=Action[info.action],
        rules=info.rules or (),
    )


def build_workload(
    state: SourceState,
    pod: PodInfo,
    ip: IPAddress,
    ns_labels: Mapping[str, str],
    backing: Mapping[str, tuple[Port, ...]],
    policies: tuple[str, ...],
    waypoint: GatewayAddress | None,
) -> Workload:
    labels = pod.labels
    tunnel = TunnelProtocol.HBONE if in_ambient(pod, ns_labels) else TunnelProtocol.NONE
    return Workload(
        uid=workload_uid(state.cluster_id, pod.namespace, pod.name),
        name=pod.name,
        namespace=pod.namespace,
        addresses=(ip,),
        node=pod.node,
        service_account=pod.service_account,
        trust_domain=state.trust_domain,
        tunnel_protocol=tunnel,
        waypoint=waypoint,
        services=MappingProxyType(dict(backing)),
        authorization_policies=policies,
        status=WorkloadStatus.HEALTHY if pod.ready else WorkloadStatus.UNHEALTHY,
        canonical_name=labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or pod.name,
        canonical_revision=labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest",
        workload_name=pod.name,
        cluster_id=state.cluster_id,
    )


# ---------------------------------------------------------- the whole thing


def translate(state: SourceState) -> Resources:
    """The feed for ``state``: straightforward, to be read and trusted."""
    rejected: set[str] = set(state.rejected)
    namespaces = {ns.name: ns.labels for ns in state.namespaces}
    waypoints = {(w.namespace, w.name): w for w in state.waypoints}
    no_labels: Mapping[str, str] = {}

    services: dict[str, Service] = {}
    selecting: list[tuple[ServiceInfo, Service]] = []
    vip_owner: dict[IPAddress, str] = {}
    for info in state.services:
        vips = service_vips(info)
        if isinstance(vips, str):
            rejected.add(vips)
            continue
        clash = next((vip_owner[v] for v in vips if v in vip_owner), None)
        if clash is not None:
            rejected.add(f"service {info.namespace}/{info.name}: VIP already used by {clash}")
            continue
        for vip in vips:
            vip_owner[vip] = f"{info.namespace}/{info.name}"
        key = service_key(info)
        waypoint, error = resolve_waypoint(
            "service", f"service {key}", info.namespace, info.labels, namespaces, waypoints
        )
        if error:
            rejected.add(error)
        service = build_service(info, vips, waypoint)
        services[key] = service
        selecting.append((info, service))

    policies = {policy_key(p): build_policy(p, state.root_namespace) for p in state.policies}
    selector_policies = [p for p in state.policies if p.selector]
    endpoints = endpoint_addresses(state.endpoint_slices)

    workloads: dict[str, Workload] = {}
    ip_owner: dict[str, str] = {}
    for pod in state.pods:
        if not pod.ip:
            continue  # not scheduled or not wired yet: not a workload
        where = f"pod {pod.namespace}/{pod.name}"
        ip = parse_ip(pod.ip)
        if ip is None:
            rejected.add(f"{where}: {pod.ip!r} is not an IP address")
            continue
        if pod.ip in ip_owner:
            rejected.add(f"{where}: IP {pod.ip} already used by {ip_owner[pod.ip]}")
            continue
        ip_owner[pod.ip] = where
        ns_labels = namespaces.get(pod.namespace, no_labels)
        backing = {
            service.resource_name: service.ports
            for info, service in selecting
            if backs(info, pod, endpoints)
        }
        selected_by = tuple(
            sorted(
                policy_key(p)
                for p in selector_policies
                if p.namespace == pod.namespace and selects(p.selector or {}, pod.labels)
            )
        )
        waypoint, error = resolve_waypoint(
            "workload", where, pod.namespace, pod.labels, namespaces, waypoints
        )
        if error:
            rejected.add(error)
        workload = build_workload(state, pod, ip, ns_labels, backing, selected_by, waypoint)
        workloads[workload.uid] = workload
    return Resources(
        workloads=MappingProxyType(workloads),
        services=MappingProxyType(services),
        policies=MappingProxyType(policies),
        rejected=tuple(sorted(rejected)),
    )
