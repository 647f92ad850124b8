"""The kinds the Kubernetes source follows, and how each object becomes source state.

Kinds: namespaces, pods, services, service accounts, endpoint slices; and the
custom resources AuthorizationPolicy, RequestAuthentication, EnvoyFilter, Gateway (class
``istio-waypoint``), HTTPRoute, GRPCRoute, VirtualService and
DestinationRule, each of which may not be installed (a 404 on list is said
once and counts as none). Routes, traffic policies, RequestAuthentications
and the AuthorizationPolicies bound to waypoints by ``targetRefs`` are kept
as written (:class:`~controlplane.state.L7Object`,
less the fields that change without the object changing) for
:mod:`controlplane.l7` to read.

Each conversion reads one object as raw JSON and returns one value of
:mod:`controlplane.state` (or None: left out); a malformed object raises, and
the informer refuses it alone (:mod:`controlplane.sources.kube_informer`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.authz_yaml import InvalidPolicy, fail_closed, parse_authorization_policy
from controlplane.l7.authz import has_target_refs
from controlplane.l7.gateway_api import is_waypoint, parse_gateway
from controlplane.sources.kube_informer import Kind, Obj
from controlplane.state import (
    TRAFFIC_DISTRIBUTION_ANNOTATION,
    TRAFFIC_DISTRIBUTIONS,
    AuthorizationPolicyInfo,
    EndpointSliceInfo,
    L7Object,
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePortInfo,
    WaypointInfo,
    frozen_labels,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAccountInfo:
    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=frozen_labels)


# -- conversion: one Kubernetes object (raw JSON) -> one SourceState value ------------------


def _meta(obj: Obj) -> tuple[str, str, Mapping[str, str]]:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError("metadata.labels must map strings to strings")
    return str(meta.get("namespace") or ""), str(meta["name"]), frozen_labels(labels)


def convert_namespace(obj: Obj) -> NamespaceInfo:
    _, name, labels = _meta(obj)
    return NamespaceInfo(name=name, labels=labels)


def convert_pod(obj: Obj) -> PodInfo | None:
    """None for pods the mesh does not carry: host-network (they share the node's IP,
    as Istio leaves them out of ambient) and finished ones (their IP may be reused)."""
    namespace, name, labels = _meta(obj)
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    phase = status.get("phase")
    if spec.get("hostNetwork") or phase in ("Succeeded", "Failed"):
        return None
    ip = status.get("podIP") or None
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            raise ValueError(f"status.podIP {ip!r} is not an IP address") from None
    ready = (
        phase == "Running"
        and not (obj.get("metadata") or {}).get("deletionTimestamp")  # terminating
        and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or ()
        )
    )
    return PodInfo(
        uid=str(obj["metadata"].get("uid") or ""),
        name=name,
        namespace=namespace,
        node=spec.get("nodeName") or "",
        ip=ip,
        service_account=spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
        labels=labels,
        ready=ready,
    )


def convert_service(obj: Obj) -> tuple[ServiceInfo, tuple[str, ...]]:
    """The service, and notes: a named targetPort is resolved per pod by Kubernetes,
    but ServicePortInfo holds one number, so the service port stands in for it; a
    traffic distribution Istio does not know is ignored, as istiod ignores it."""
    namespace, name, labels = _meta(obj)
    spec = obj.get("spec") or {}
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    distribution = str(spec.get("trafficDistribution") or "")
    annotated = str(annotations.get(TRAFFIC_DISTRIBUTION_ANNOTATION) or "")
    ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    cluster_ips = tuple(str(ipaddress.ip_address(ip)) for ip in ips if ip and ip != "None")
    ports, notes = [], []
    for raw in spec.get("ports") or ():
        port = int(raw["port"])
        target = raw.get("targetPort", port)
        if isinstance(target, str) and not target.isdigit():
            notes.append(
                f"service {namespace}/{name}: port {port} has the named targetPort {target!r}; "
                f"using {port} (named ports are not resolved per pod)"
            )
            target = port
        ports.append(
            ServicePortInfo(
                port=port,
                target_port=int(target),
                name=str(raw.get("name") or ""),
                protocol=str(raw.get("protocol") or "TCP"),
                app_protocol=str(raw.get("appProtocol") or ""),
            )
        )
    known = {d.lower() for d in TRAFFIC_DISTRIBUTIONS}
    if distribution and distribution not in TRAFFIC_DISTRIBUTIONS:
        notes.append(
            f"service {namespace}/{name}: spec.trafficDistribution {distribution!r} is not "
            f"one of {', '.join(TRAFFIC_DISTRIBUTIONS)}; ignored, as istiod ignores it"
        )
    if annotated and annotated.lower() not in known:
        notes.append(
            f"service {namespace}/{name}: annotation {TRAFFIC_DISTRIBUTION_ANNOTATION}="
            f"{annotated!r} is not one of {', '.join(TRAFFIC_DISTRIBUTIONS)}; ignored"
        )
    info = ServiceInfo(
        name=name,
        namespace=namespace,
        cluster_ips=cluster_ips,
        ports=tuple(ports),
        selector=frozen_labels(spec.get("selector") or {}),
        labels=labels,
        traffic_distribution=distribution,
        internal_traffic_policy=str(spec.get("internalTrafficPolicy") or ""),
        annotations=frozen_labels(
            {TRAFFIC_DISTRIBUTION_ANNOTATION: annotated} if annotated else {}
        ),
    )
    return info, tuple(notes)


def convert_endpoint_slice(obj: Obj) -> EndpointSliceInfo | None:
    """The ready addresses (a missing ``ready`` means ready, per the API); None for slices
    that belong to no service or list FQDNs."""
    namespace, name, labels = _meta(obj)
    service = labels.get(SERVICE_NAME_LABEL)
    if not service or obj.get("addressType") not in ("IPv4", "IPv6"):
        return None
    addresses = []
    for endpoint in obj.get("endpoints") or ():
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        # Only the first address has a meaning (the API says so; kube-proxy reads only it).
        first = (endpoint.get("addresses") or [None])[0]
        if first:
            addresses.append(str(ipaddress.ip_address(first)))
    return EndpointSliceInfo(
        service=service, namespace=namespace, addresses=tuple(addresses), name=name
    )


def convert_gateway(obj: Obj) -> WaypointInfo | None:
    """A Gateway of class istio-waypoint, read by :func:`controlplane.l7.gateway_api.parse_gateway`
    (labels such as istio.io/waypoint-for, listeners, status.addresses); other classes are
    another controller's. A malformed one is refused alone (InvalidObject is a ValueError)."""
    if not is_waypoint(obj):
        return None
    return parse_gateway(as_written(obj))


# Fields that change without the object changing: every write moves resourceVersion and
# managedFields, and kubectl's copy of the last applied object says nothing new.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def as_written(obj: Obj) -> dict[str, Any]:
    """The object as JSON, less resourceVersion, managedFields and kubectl's last-applied
    annotation: an object nobody changed compares equal to itself from the next list."""
    out = dict(obj)
    meta = dict(out.get("metadata") or {})
    meta.pop("resourceVersion", None)
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if isinstance(annotations, Mapping) and LAST_APPLIED in annotations:
        annotations = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
        if annotations:
            meta["annotations"] = annotations
        else:
            meta.pop("annotations")
    out["metadata"] = meta
    return out


def l7_converter(kind: str) -> Callable[[Obj], L7Object]:
    """HTTPRoute, GRPCRoute, VirtualService, DestinationRule, RequestAuthentication,
    EnvoyFilter, Telemetry: kept as
    written, read later (a selector-bound RequestAuthentication too: the waypoint's reader
    leaves it alone)."""

    def convert(obj: Obj) -> L7Object:
        namespace, name, _ = _meta(obj)
        return L7Object(kind=kind, namespace=namespace, name=name, raw=as_written(obj))

    return convert


def convert_authorization_policy(
    obj: Obj,
) -> AuthorizationPolicyInfo | L7Object | tuple[AuthorizationPolicyInfo, tuple[str, ...]]:
    """A policy with ``targetRefs`` is the waypoint's (kept as written for
    :mod:`controlplane.l7.authz`); one with a selector (or neither) is ztunnel's, and
    one of those that cannot be read stands as a DENY of what it may select (with a
    note for the log; :func:`controlplane.authz_yaml.fail_closed`)."""
    if has_target_refs(obj):
        return l7_converter("AuthorizationPolicy")(obj)
    try:
        return parse_authorization_policy(obj)
    except InvalidPolicy as e:
        denied = fail_closed(obj, e)
        if denied is None:
            raise
        return denied, (denied.invalid,)


def convert_service_account(obj: Obj) -> ServiceAccountInfo:
    namespace, name, labels = _meta(obj)
    return ServiceAccountInfo(name=name, namespace=namespace, labels=labels)


# -- the kinds ------------------------------------------------------------------------------


_CORE, _CUSTOM = "CoreV1Api", "CustomObjectsApi"
_EVERYWHERE = "_for_all_namespaces"
KINDS = (
    Kind("namespaces", "namespace", _CORE, "list_namespace", convert_namespace),
    Kind("pods", "pod", _CORE, f"list_pod{_EVERYWHERE}", convert_pod),
    Kind("services", "service", _CORE, f"list_service{_EVERYWHERE}", convert_service),
    Kind("serviceaccounts", "serviceaccount", _CORE, f"list_service_account{_EVERYWHERE}",
          convert_service_account),
    Kind("endpointslices", "endpointslice", "DiscoveryV1Api",
          f"list_endpoint_slice{_EVERYWHERE}", convert_endpoint_slice),
    Kind("authorizationpolicies", "AuthorizationPolicy", _CUSTOM, "list_cluster_custom_object",
          convert_authorization_policy, ("security.istio.io", "v1", "authorizationpolicies"),
          True),
    Kind("requestauthentications", "RequestAuthentication", _CUSTOM,
          "list_cluster_custom_object", l7_converter("RequestAuthentication"),
          ("security.istio.io", "v1", "requestauthentications"), True),
    Kind("envoyfilters", "EnvoyFilter", _CUSTOM, "list_cluster_custom_object",
          l7_converter("EnvoyFilter"), ("networking.istio.io", "v1alpha3", "envoyfilters"),
          True),
    Kind("telemetries", "Telemetry", _CUSTOM, "list_cluster_custom_object",
          l7_converter("Telemetry"), ("telemetry.istio.io", "v1", "telemetries"), True),
    Kind("gateways", "gateway", _CUSTOM, "list_cluster_custom_object", convert_gateway,
          ("gateway.networking.k8s.io", "v1", "gateways"), True),
    Kind("httproutes", "HTTPRoute", _CUSTOM, "list_cluster_custom_object",
          l7_converter("HTTPRoute"), ("gateway.networking.k8s.io", "v1", "httproutes"), True),
    Kind("grpcroutes", "GRPCRoute", _CUSTOM, "list_cluster_custom_object",
          l7_converter("GRPCRoute"), ("gateway.networking.k8s.io", "v1", "grpcroutes"), True),
    Kind("virtualservices", "VirtualService", _CUSTOM, "list_cluster_custom_object",
          l7_converter("VirtualService"), ("networking.istio.io", "v1", "virtualservices"), True),
    Kind("destinationrules", "DestinationRule", _CUSTOM, "list_cluster_custom_object",
          l7_converter("DestinationRule"), ("networking.istio.io", "v1", "destinationrules"),
          True),
)  # fmt: skip
L7_KINDS = (
    "httproutes",
    "grpcroutes",
    "virtualservices",
    "destinationrules",
    "requestauthentications",
    "envoyfilters",
    "telemetries",
)
