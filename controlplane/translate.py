"""Translation: a :class:`SourceState` -> the Workload API and Authorization resources.

A pure function over an immutable input, tested without a server. It follows
Istio's ambient rules:

* every pod with an IP is a workload; it gets tunnel protocol HBONE when its
  namespace is labelled ``istio.io/dataplane-mode=ambient`` and the pod does
  not opt out with ``istio.io/dataplane-mode=none``;
* a service maps to its VIPs and ports; each workload lists the services
  that select it, with their ports;
* ``istio.io/use-waypoint`` on the pod, the service or the namespace (in
  that order of precedence) names a waypoint Gateway; its address becomes
  the workload's or service's waypoint;
* an AuthorizationPolicy with a selector is WORKLOAD_SELECTOR-scoped and
  named in each selected workload; without one it is NAMESPACE-scoped, or
  GLOBAL in the root namespace.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controlplane.state import (
    DATAPLANE_MODE,
    USE_WAYPOINT,
    USE_WAYPOINT_NAMESPACE,
    AuthorizationPolicyInfo,
    PodInfo,
    ServiceInfo,
    SourceState,
)
from mesh.model import (
    Action,
    GatewayAddress,
    Policy,
    Port,
    Scope,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)

CLUSTER_DOMAIN = "svc.cluster.local"


@dataclass(frozen=True, slots=True)
class Resources:
    """The whole feed at one moment: workloads and services by name, policies by name."""

    workloads: Mapping[str, Workload] = field(default_factory=lambda: MappingProxyType({}))
    services: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}))
    policies: Mapping[str, Policy] = field(default_factory=lambda: MappingProxyType({}))
    # Objects refused during translation (for meshd's status), one line each.
    rejected: tuple[str, ...] = ()


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes selector semantics; an empty selector selects nothing."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def workload_uid(cluster_id: str, namespace: str, name: str) -> str:
    """Istio's uid format for pods: ``<cluster>//Pod/<namespace>/<name>``."""
    return f"{cluster_id}//Pod/{namespace}/{name}"


def translate(state: SourceState) -> Resources:
    rejected = list(state.rejected)
    namespaces = {ns.name: ns.labels for ns in state.namespaces}
    waypoints = {(w.namespace, w.name): w for w in state.waypoints}

    def waypoint_for(labels: Mapping[str, str], namespace: str, what: str) -> GatewayAddress | None:
        name = labels.get(USE_WAYPOINT)
        if not name or name == "none":
            return None
        ns = labels.get(USE_WAYPOINT_NAMESPACE, namespace)
        gateway = waypoints.get((ns, name))
        if gateway is None or gateway.address is None:
            rejected.append(f"{what}: waypoint {ns}/{name} not found or without an address")
            return None
        try:
            return GatewayAddress(address=ipaddress.ip_address(gateway.address))
        except ValueError:
            rejected.append(
                f"{what}: waypoint {ns}/{name} address {gateway.address!r} is not an IP"
            )
            return None

    services: dict[str, Service] = {}
    service_infos: list[tuple[ServiceInfo, Service]] = []
    seen_vips: dict[str, str] = {}
    for info in state.services:
        hostname = f"{info.name}.{info.namespace}.{CLUSTER_DOMAIN}"
        key = f"{info.namespace}/{hostname}"
        try:
            vips = tuple(ipaddress.ip_address(ip) for ip in info.cluster_ips if ip != "None")
        except ValueError as e:
            rejected.append(f"service {info.namespace}/{info.name}: {e}")
            continue
        clash = next((seen_vips[str(v)] for v in vips if str(v) in seen_vips), None)
        if clash is not None:
            rejected.append(f"service {info.namespace}/{info.name}: VIP already used by {clash}")
            continue
        for vip in vips:
            seen_vips[str(vip)] = f"{info.namespace}/{info.name}"
        # A service's own label beats its namespace's.
        labels = {**namespaces.get(info.namespace, {}), **_waypoint_labels(info.labels)}
        service = Service(
            name=info.name,
            namespace=info.namespace,
            hostname=hostname,
            addresses=vips,
            ports=tuple(
                Port(service_port=p.port, target_port=p.target_port)
                for p in info.ports
                if p.protocol == "TCP"
            ),
            waypoint=waypoint_for(labels, info.namespace, f"service {key}"),
        )
        services[key] = service
        service_infos.append((info, service))

    policies: dict[str, Policy] = {}
    selector_policies: list[AuthorizationPolicyInfo] = []
    for policy_info in state.policies:
        if policy_info.selector:
            scope = Scope.WORKLOAD_SELECTOR
            selector_policies.append(policy_info)
        elif policy_info.namespace == state.root_namespace:
            scope = Scope.GLOBAL
        else:
            scope = Scope.NAMESPACE
        policy = Policy(
            name=policy_info.name,
            namespace=policy_info.namespace,
            scope=scope,
            action=Action[policy_info.action],
            rules=policy_info.rules or (),
        )
        policies[policy.resource_name] = policy

    workloads: dict[str, Workload] = {}
    seen_ips: dict[str, str] = {}
    for pod in state.pods:
        if not pod.ip:
            continue  # not scheduled or not wired yet: not a workload
        where = f"pod {pod.namespace}/{pod.name}"
        try:
            ip = ipaddress.ip_address(pod.ip)
        except ValueError:
            rejected.append(f"{where}: {pod.ip!r} is not an IP address")
            continue
        if pod.ip in seen_ips:
            rejected.append(f"{where}: IP {pod.ip} already used by {seen_ips[pod.ip]}")
            continue
        seen_ips[pod.ip] = where
        ns_labels = namespaces.get(pod.namespace, {})
        workload = _workload(
            state,
            pod,
            ip,
            ns_labels,
            service_infos,
            selector_policies,
            waypoint_for({**ns_labels, **_waypoint_labels(pod.labels)}, pod.namespace, where),
        )
        workloads[workload.uid] = workload
    return Resources(
        workloads=MappingProxyType(workloads),
        services=MappingProxyType(services),
        policies=MappingProxyType(policies),
        rejected=tuple(rejected),
    )


def _waypoint_labels(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k in (USE_WAYPOINT, USE_WAYPOINT_NAMESPACE)}


def in_ambient(pod: PodInfo, namespace_labels: Mapping[str, str]) -> bool:
    if pod.labels.get(DATAPLANE_MODE) == "none":
        return False
    return namespace_labels.get(DATAPLANE_MODE) == "ambient" or (
        pod.labels.get(DATAPLANE_MODE) == "ambient"
    )


def _workload(
    state: SourceState,
    pod: PodInfo,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    ns_labels: Mapping[str, str],
    service_infos: list[tuple[ServiceInfo, Service]],
    selector_policies: list[AuthorizationPolicyInfo],
    waypoint: GatewayAddress | None,
) -> Workload:
    backing = {
        service.resource_name: service.ports
        for info, service in service_infos
        if info.namespace == pod.namespace and selects(info.selector, pod.labels)
    }
    policies = tuple(
        f"{p.namespace}/{p.name}"
        for p in selector_policies
        if p.namespace == pod.namespace and p.selector and selects(p.selector, pod.labels)
    )
    return Workload(
        uid=workload_uid(state.cluster_id, pod.namespace, pod.name),
        name=pod.name,
        namespace=pod.namespace,
        addresses=(ip,),
        node=pod.node,
        service_account=pod.service_account,
        trust_domain=state.trust_domain,
        tunnel_protocol=TunnelProtocol.HBONE if in_ambient(pod, ns_labels) else TunnelProtocol.NONE,
        waypoint=waypoint,
        services=MappingProxyType(backing),
        authorization_policies=policies,
        status=WorkloadStatus.HEALTHY if pod.ready else WorkloadStatus.UNHEALTHY,
        canonical_name=pod.labels.get("service.istio.io/canonical-name")
        or pod.labels.get("app.kubernetes.io/name")
        or pod.labels.get("app")
        or pod.name,
        canonical_revision=pod.labels.get("service.istio.io/canonical-revision")
        or pod.labels.get("app.kubernetes.io/version")
        or pod.labels.get("version")
        or "latest",
        workload_name=pod.name,
        cluster_id=state.cluster_id,
    )
