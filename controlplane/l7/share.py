"""A waypoint's share of the world as values: its services, their ports, the clusters.

What :func:`controlplane.l7.build.build` makes of the sources for each
waypoint, and :mod:`controlplane.l7.envoy` turns into Envoy resources; with
the names they go by: a service's key (``namespace/fqdn``) and Istio's
waypoint cluster names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controlplane.l7.authz import WaypointPolicy
from controlplane.l7.binding import CLUSTER_DOMAIN
from controlplane.l7.envoy_filter import WaypointRateLimit
from controlplane.l7.ir import PortRoutes, Protocol, TrafficPolicy
from controlplane.l7.request_authn import WaypointAuthentication
from controlplane.l7.telemetry_api import NONE as NO_TELEMETRY
from controlplane.l7.telemetry_api import TelemetrySpec
from controlplane.l7.workloads import WorkloadSpec
from controlplane.state import WaypointInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSpec:
    ip: str
    port: int  # the pod's port (the service port's targetPort)
    healthy: bool
    hbone: bool  # the pod is in the mesh: reached over HBONE to ip:15008
    identity: str  # its SPIFFE ID
    pod: str
    namespace: str
    canonical_name: str = ""
    canonical_revision: str = ""
    node: str = ""
    cluster_id: str = "Kubernetes"  # the mesh's cluster id (its metrics' *_cluster)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSpec:
    name: str
    service: str  # namespace/hostname
    hostname: str
    port: int
    subset: str
    protocol: Protocol
    policy: TrafficPolicy
    endpoints: tuple[EndpointSpec, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    key: str  # namespace/hostname
    name: str
    namespace: str
    hostname: str
    vips: tuple[str, ...]
    ports: tuple[PortRoutes, ...]
    policies: tuple[WaypointPolicy, ...] = ()  # the AuthorizationPolicies of its chains
    # the RequestAuthentications of its chains, in Istio's order (see build)
    authentications: tuple[WaypointAuthentication, ...] = ()
    # the EnvoyFilters (local rate limit) of its chains: at most one inserts the filter
    ratelimits: tuple[WaypointRateLimit, ...] = ()
    telemetry: TelemetrySpec = NO_TELEMETRY  # its Telemetry: tracer, access logs


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointShare:
    waypoint: WaypointInfo
    trust_domain: str
    services: tuple[ServiceSpec, ...]
    clusters: Mapping[str, ClusterSpec]
    workloads: tuple[WorkloadSpec, ...] = ()
    workload_policies: tuple[WaypointPolicy, ...] = ()  # those of the workload chains
    # the tracing providers' collectors, as gRPC targets (provider name -> target)
    collectors: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> str:
        return self.waypoint.key


def service_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}.{namespace}.{CLUSTER_DOMAIN}"


def cluster_name(hostname: str, port: int, protocol: Protocol, subset: str = "") -> str:
    """Istio's waypoint cluster names: ``inbound-vip|<port>|http[/<subset>]|<host>``."""
    kind = "tcp" if protocol is Protocol.TCP else "http"
    return f"inbound-vip|{port}|{kind}{'/' + subset if subset else ''}|{hostname}"
