"""The mesh model: workloads, services and policies as typed, immutable values.

Shared by meshd (which builds them from its source and sends them) and the
proxies (which receive them through :mod:`mesh.xds`). Conversion to and from
protobuf happens here, at the edge, one resource at a time: a malformed
resource raises :class:`InvalidResource` for itself alone.

May import: ``mesh.identity``, ``mesh.proto`` (generated) and ``protobuf``.
"""

from mesh.model.errors import InvalidResource
from mesh.model.policy import (
    AUTHORIZATION_TYPE_URL,
    Action,
    Clause,
    Match,
    MatchKind,
    Policy,
    Rule,
    Scope,
    StringMatch,
)
from mesh.model.workload import (
    ADDRESS_TYPE_URL,
    DEFAULT_TRUST_DOMAIN,
    GatewayAddress,
    HealthPolicy,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
    Port,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
    address_from_proto,
)

__all__ = [
    "ADDRESS_TYPE_URL",
    "AUTHORIZATION_TYPE_URL",
    "DEFAULT_TRUST_DOMAIN",
    "Action",
    "Clause",
    "GatewayAddress",
    "HealthPolicy",
    "InvalidResource",
    "LoadBalancing",
    "LoadBalancingMode",
    "LoadBalancingScope",
    "Locality",
    "Match",
    "MatchKind",
    "Policy",
    "Port",
    "Rule",
    "Scope",
    "Service",
    "StringMatch",
    "TunnelProtocol",
    "Workload",
    "WorkloadStatus",
    "address_from_proto",
]
