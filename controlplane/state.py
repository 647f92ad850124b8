"""What meshd knows of the world, whatever the source: the input of translation.

Every source (a running meshlab cluster, a file, the Kubernetes API) turns
its objects into one :class:`SourceState`, replaced whole on each change.
The shapes are the few Kubernetes facts the mesh needs, nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mesh.model import Rule

Labels = Mapping[str, str]
ROOT_NAMESPACE = "istio-system"
DEFAULT_CLUSTER_ID = "Kubernetes"

# Labels Istio's ambient mode reads (istio.io/dataplane-mode: mesh.ambient).
USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
# On a waypoint Gateway: what traffic it handles (service is the default).
WAYPOINT_FOR = "istio.io/waypoint-for"
WAYPOINT_FOR_VALUES = ("service", "workload", "all", "none")
WAYPOINT_CLASS = "istio-waypoint"
# On what the waypoint controller makes for a Gateway (pods, Service, ...). A
# waypoint instance is never bound to a waypoint, whatever its namespace says.
MANAGED = "gateway.istio.io/managed"
MANAGED_VALUE = "istio.io-mesh-controller"

# Istio's annotation for a service's traffic distribution, from before (and
# beside) spec.trafficDistribution; its value is compared case-insensitively.
TRAFFIC_DISTRIBUTION_ANNOTATION = "networking.istio.io/traffic-distribution"
# The values of spec.trafficDistribution (PreferClose is PreferSameZone's old name),
# and the spec.internalTrafficPolicy that keeps traffic on the client's node.
PREFER_CLOSE = "PreferClose"
PREFER_SAME_ZONE = "PreferSameZone"
PREFER_SAME_NODE = "PreferSameNode"
TRAFFIC_DISTRIBUTIONS = (PREFER_CLOSE, PREFER_SAME_ZONE, PREFER_SAME_NODE)
NODE_LOCAL_TRAFFIC_POLICY = "Local"


def frozen_labels(labels: Mapping[str, str] | None = None) -> Labels:
    return MappingProxyType(dict(labels or {}))


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespaceInfo:
    name: str
    labels: Labels = field(default_factory=frozen_labels)


@dataclass(frozen=True, slots=True, kw_only=True)
class PodInfo:
    uid: str
    name: str
    namespace: str
    node: str
    ip: str | None
    service_account: str = "default"
    labels: Labels = field(default_factory=frozen_labels)
    ready: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePortInfo:
    port: int
    target_port: int
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""  # spec.ports[].appProtocol ("": unset)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceInfo:
    name: str
    namespace: str
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePortInfo, ...]
    selector: Labels = field(default_factory=frozen_labels)
    labels: Labels = field(default_factory=frozen_labels)
    # spec.trafficDistribution and spec.internalTrafficPolicy as written ("": unset).
    traffic_distribution: str = ""
    internal_traffic_policy: str = ""
    # The annotations the mesh reads (TRAFFIC_DISTRIBUTION_ANNOTATION), no others:
    # every `kubectl apply` rewrites one, which must not count as a change.
    annotations: Labels = field(default_factory=frozen_labels)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicyInfo:
    """An Istio AuthorizationPolicy, parsed (see :mod:`controlplane.authz_yaml`)."""

    name: str
    namespace: str
    action: str  # "ALLOW" or "DENY"
    selector: Labels | None  # None: the whole namespace (or mesh, in the root namespace)
    rules: tuple[Rule, ...] | None  # None: no rules at all (ALLOW: nothing; DENY: nothing)
    # Istio's ZtunnelAccepted warning when the policy names HTTP attributes ztunnel
    # cannot see (those rules are omitted from an ALLOW, their HTTP parts from a DENY).
    warning: str = ""
    generation: int = 0
    # Set when the object could not be read: it then stands as a DENY of everything it
    # may select (fail closed), and this says why in its status.
    invalid: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointListener:
    name: str
    port: int
    protocol: str
    allowed_from: str = "Same"  # allowedRoutes.namespaces.from: Same, All or Selector
    allowed_selector: Labels = field(default_factory=frozen_labels)


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointInfo:
    """A Gateway of class istio-waypoint, and where it listens.

    ``address`` is its instance's address (the Gateway's status address);
    ``problem`` says why the Gateway cannot be accepted (then whatever binds
    to it fails closed).
    """

    name: str
    namespace: str
    address: str | None
    waypoint_for: str = "service"
    listeners: tuple[WaypointListener, ...] = ()
    problem: str = ""
    labels: Labels = field(default_factory=frozen_labels)
    generation: int = 0
    created: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def accepts_namespace(self, namespace: str, labels: Mapping[str, str]) -> bool:
        """Whether bindings from ``namespace`` are allowed by the mesh listener."""
        if namespace == self.namespace:
            return True
        for listener in self.listeners:
            if listener.protocol != "HBONE":
                continue
            if listener.allowed_from == "All":
                return True
            if listener.allowed_from == "Selector" and all(
                labels.get(k) == v for k, v in listener.allowed_selector.items()
            ):
                return True
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class L7Object:
    """A route or traffic policy as written (HTTPRoute, GRPCRoute, VirtualService,
    DestinationRule): ``raw`` is the whole object; :mod:`controlplane.l7` reads it."""

    kind: str
    namespace: str
    name: str
    raw: Mapping[str, Any]

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSliceInfo:
    """The addresses an EndpointSlice lists for a service (used when it has no selector)."""

    service: str
    namespace: str
    addresses: tuple[str, ...]
    name: str = ""  # the slice's own name: a service may have several


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchedJwks:
    """A RequestAuthentication's ``jwksUri`` as meshd fetched it (:mod:`controlplane.jwks`)."""

    keys: str  # the JWKS (JSON) as served
    fetched: str  # when these keys were first received (RFC 3339, UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceState:
    namespaces: tuple[NamespaceInfo, ...] = ()
    pods: tuple[PodInfo, ...] = ()
    services: tuple[ServiceInfo, ...] = ()
    policies: tuple[AuthorizationPolicyInfo, ...] = ()
    waypoints: tuple[WaypointInfo, ...] = ()
    endpoint_slices: tuple[EndpointSliceInfo, ...] = ()
    # HTTPRoutes, GRPCRoutes, VirtualServices, DestinationRules, as written.
    l7: tuple[L7Object, ...] = ()
    trust_domain: str = "cluster.local"
    cluster_id: str = DEFAULT_CLUSTER_ID
    root_namespace: str = ROOT_NAMESPACE
    # Objects the source refused, one line each, for meshd's status.
    rejected: tuple[str, ...] = ()
    # The key sets meshd fetched for RequestAuthentications' jwksUri (uri -> keys): not
    # from the source, meshd adds them before building (a jwksUri absent: not fetched yet).
    jwks: Mapping[str, FetchedJwks] = field(default_factory=lambda: MappingProxyType({}))
    # MeshConfig's text from the file meshd was given (--mesh-config, istiod's
    # --meshConfig); None: the ``mesh`` key of the ``istio`` ConfigMap among ``l7``, if any.
    mesh_config: str | None = None
