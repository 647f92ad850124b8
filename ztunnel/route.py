"""Outbound routing: where a captured connection goes, decided over one snapshot. Pure.

Given the original destination of a connection a pod opened:

* a service VIP:port picks one healthy endpoint (``choose`` decides which;
  the proxy passes a load balancer, tests a fixed pick) and maps the service
  port to the endpoint's target port;
* a workload IP is that workload;
* a destination with a waypoint (the service's, else the workload's) goes
  over HBONE to the waypoint, ``:authority`` being the original
  destination (the VIP:port for a service), expecting the waypoint's identity;
* an HBONE-capable destination gets HBONE to its IP:15008, ``:authority``
  its IP:target port, expecting its identity;
* anything else (a pod outside the mesh, an address the mesh does not know)
  is passed through as plain TCP.

A VIP with no healthy endpoint is refused with the reason, never sent
elsewhere.

A service (or waypoint service) with load balancing narrows the endpoints
offered to ``choose`` relative to the ``source`` workload, as ztunnel does:
each endpoint ranks by how many scopes of the routing preference, from the
first, it shares with the source (its node, network, cluster, region, zone,
subzone); FAILOVER offers the best-ranked ones, STRICT only those matching
every scope and refuses the connection when there are none.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.identity import SpiffeId
from mesh.model import (
    GatewayAddress,
    HealthPolicy,
    LoadBalancingMode,
    LoadBalancingScope,
    Port,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from mesh.model.workload import HBONE_PORT
from ztunnel.index import Endpoint, StateIndex

Chooser = Callable[[Sequence[Endpoint]], Endpoint]


class Kind(enum.Enum):
    HBONE = "hbone"  # to the destination's proxy
    WAYPOINT = "waypoint"  # to the destination's waypoint, over HBONE
    PASSTHROUGH = "passthrough"  # plain TCP, the destination is outside the mesh
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    reason: str
    # Where the TCP (or HBONE) connection is opened.
    connect_ip: str = ""
    connect_port: int = 0
    # HBONE only: the CONNECT authority and the identity the peer must prove.
    authority: str = ""
    expected_identity: SpiffeId | None = None
    destination: Workload | None = None  # the final workload, when known
    service: Service | None = None


def first(endpoints: Sequence[Endpoint]) -> Endpoint:
    return endpoints[0]


def route_outbound(
    index: StateIndex,
    dst_ip: str,
    dst_port: int,
    choose: Chooser = first,
    source: Workload | None = None,
) -> Route:
    """Where a connection ``source`` opened to ``dst_ip:dst_port`` goes.

    ``source`` is the workload of the pod that opened it; without it, a
    service's routing preference cannot be honoured: FAILOVER offers every
    healthy endpoint, STRICT refuses.
    """
    service = index.service_by_vip(dst_ip)
    if service is not None:
        return _to_service(index, service, dst_ip, dst_port, choose, source)
    workload = index.workload_by_ip(dst_ip)
    if workload is None:
        return Route(
            Kind.PASSTHROUGH,
            f"{dst_ip} is not a mesh address",
            connect_ip=dst_ip,
            connect_port=dst_port,
        )
    if workload.waypoint is not None:
        authority = _authority(dst_ip, dst_port)
        return _via_waypoint(index, workload.waypoint, authority, workload, None, choose, source)
    return _to_workload(workload, dst_ip, dst_port, None, f"workload {workload.resource_name}")


def _to_service(
    index: StateIndex,
    service: Service,
    vip: str,
    port: int,
    choose: Chooser,
    source: Workload | None,
) -> Route:
    what = f"service {service.namespace}/{service.name}"
    if service.waypoint is not None:
        authority = _authority(vip, port)
        return _via_waypoint(index, service.waypoint, authority, None, service, choose, source)
    candidates = _preferred(_endpoints(index, service), service, source, what)
    if isinstance(candidates, str):
        return Route(Kind.REFUSE, candidates, service=service)
    if not candidates:
        return Route(Kind.REFUSE, f"{what} has no healthy endpoint", service=service)
    endpoint = choose(candidates)
    target = _target_port(port, endpoint.ports) or _target_port(port, service.ports) or port
    ip = str(endpoint.workload.addresses[0])
    return _to_workload(endpoint.workload, ip, target, service, f"{what} -> endpoint")


def _endpoints(index: StateIndex, service: Service) -> list[Endpoint]:
    """The endpoints that may be chosen: the healthy ones, or all with ALLOW_ALL."""
    lb = service.load_balancing
    allow_all = lb is not None and lb.health_policy is HealthPolicy.ALLOW_ALL
    return [
        e
        for e in index.endpoints.get(service.resource_name, ())
        if e.workload.addresses and (allow_all or e.workload.status is WorkloadStatus.HEALTHY)
    ]


def _preferred(
    endpoints: list[Endpoint], service: Service, source: Workload | None, what: str
) -> list[Endpoint] | str:
    """The endpoints the service's load balancing offers to ``source``, or why none is."""
    lb = service.load_balancing
    if not endpoints or lb is None:
        return endpoints
    if lb.mode not in (LoadBalancingMode.STRICT, LoadBalancingMode.FAILOVER):
        return endpoints
    scopes = lb.routing_preference
    if source is None:
        if lb.mode is LoadBalancingMode.STRICT:
            return (
                f"{what} only allows endpoints sharing the client's {_names(scopes)}, "
                "and the client's workload is not known"
            )
        return endpoints
    ranked = [(_rank(source, e.workload, scopes), e) for e in endpoints]
    if lb.mode is LoadBalancingMode.STRICT:
        ranked = [(r, e) for r, e in ranked if r == len(scopes)]
        if not ranked:
            where = ", ".join(f"{s.name.lower()} {_value(s, source)!r}" for s in scopes)
            why = (
                "its internalTrafficPolicy is Local"
                if scopes == (LoadBalancingScope.NODE,)
                else "its load balancing is STRICT"
            )
            return (
                f"{what} has no healthy endpoint sharing {source.namespace}/{source.name}'s "
                f"{where}; {why}, so no other endpoint may be used"
            )
    best = max(r for r, _ in ranked)
    return [e for r, e in ranked if r == best]


def _rank(source: Workload, target: Workload, scopes: Sequence[LoadBalancingScope]) -> int:
    """How many of ``scopes``, from the first, ``target`` shares with ``source``."""
    rank = 0
    for scope in scopes:
        if _value(scope, source) != _value(scope, target):
            break
        rank += 1
    return rank


_SCOPE_VALUES: dict[LoadBalancingScope, Callable[[Workload], str]] = {
    LoadBalancingScope.NODE: lambda w: w.node,
    LoadBalancingScope.NETWORK: lambda w: w.network,
    LoadBalancingScope.CLUSTER: lambda w: w.cluster_id,
    LoadBalancingScope.REGION: lambda w: w.locality.region,
    LoadBalancingScope.ZONE: lambda w: w.locality.zone,
    LoadBalancingScope.SUBZONE: lambda w: w.locality.subzone,
}


def _value(scope: LoadBalancingScope, workload: Workload) -> str:
    return _SCOPE_VALUES[scope](workload)


def _names(scopes: Sequence[LoadBalancingScope]) -> str:
    return "/".join(s.name.lower() for s in scopes)


def _target_port(port: int, ports: Sequence[Port]) -> int:
    """The target port ``port`` maps to in ``ports``; 0 when not listed (or left to the
    service, as Istio's workload ports may)."""
    for p in ports:
        if p.service_port == port:
            return p.target_port
    return 0


def _to_workload(
    workload: Workload, ip: str, port: int, service: Service | None, what: str
) -> Route:
    if workload.tunnel_protocol is TunnelProtocol.HBONE:
        return Route(
            Kind.HBONE,
            f"{what} {workload.namespace}/{workload.name} speaks HBONE",
            connect_ip=ip,
            connect_port=HBONE_PORT,
            authority=_authority(ip, port),
            expected_identity=workload.identity,
            destination=workload,
            service=service,
        )
    return Route(
        Kind.PASSTHROUGH,
        f"{what} {workload.namespace}/{workload.name} is not in the mesh",
        connect_ip=ip,
        connect_port=port,
        destination=workload,
        service=service,
    )


def _via_waypoint(
    index: StateIndex,
    gateway: GatewayAddress,
    authority: str,
    workload: Workload | None,
    service: Service | None,
    choose: Chooser,
    source: Workload | None,
) -> Route:
    wanted = f"waypoint {gateway}"
    if gateway.address is None:
        # meshd names a waypoint by hostname alone when it is missing or not ready:
        # refuse, rather than send the traffic past its L7 policy as Istio would.
        return Route(
            Kind.REFUSE,
            f"{wanted} is missing or not ready (no address): refused rather than sent "
            "past the waypoint's policy",
            service=service,
        )
    address = str(gateway.address)
    # The waypoint's address is its service VIP, or a waypoint pod's own IP.
    waypoint_service = index.service_by_vip(address)
    candidates: list[Endpoint] | str = []
    if waypoint_service is not None:
        # The waypoint's own service may prefer close instances too, as in ztunnel.
        candidates = _preferred(
            _endpoints(index, waypoint_service), waypoint_service, source, wanted
        )
    elif (pod := index.workload_by_ip(address)) is not None:
        candidates = [Endpoint(pod, ())]
    if isinstance(candidates, str):
        return Route(Kind.REFUSE, candidates, service=service)
    if not candidates:
        return Route(Kind.REFUSE, f"{wanted} has no healthy instance", service=service)
    waypoint = choose(candidates).workload
    return Route(
        Kind.WAYPOINT,
        f"the destination uses {wanted} ({waypoint.namespace}/{waypoint.name})",
        connect_ip=str(waypoint.addresses[0]),
        connect_port=gateway.port or HBONE_PORT,
        authority=authority,
        expected_identity=waypoint.identity,
        destination=workload,
        service=service,
    )


def _authority(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
