"""Outbound routing decisions over one snapshot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from mesh.identity import SpiffeId
from mesh.model import (
    HealthPolicy,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
    Port,
    Service,
    Workload,
)
from tests.unit.ztunnel.conftest import index, service, workload
from ztunnel.index import Endpoint, StateIndex
from ztunnel.route import Kind, Route, route_outbound

ECHO_PORTS = {"shop/echo.shop.svc.cluster.local": (Port(service_port=80, target_port=8080),)}


def test_a_service_vip_goes_to_an_endpoint_over_hbone_with_the_target_port() -> None:
    idx = index(
        (
            workload("echo-1", "10.244.0.3", sa="echo", services=ECHO_PORTS),
            workload("echo-2", "10.244.1.2", sa="echo", services=ECHO_PORTS),
        ),
        (service("echo", "10.96.0.20"),),
    )
    route = route_outbound(idx, "10.96.0.20", 80)
    assert route.kind is Kind.HBONE
    assert (route.connect_ip, route.connect_port) == ("10.244.0.3", 15008)
    assert route.authority == "10.244.0.3:8080"
    assert route.expected_identity == SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/echo")
    assert route.service is not None and route.service.name == "echo"


def test_the_chooser_spreads_and_unhealthy_endpoints_are_never_chosen() -> None:
    idx = index(
        (
            workload("echo-1", "10.244.0.3", services=ECHO_PORTS),
            workload("echo-2", "10.244.1.2", services=ECHO_PORTS, healthy=False),
            workload("echo-3", "10.244.1.3", services=ECHO_PORTS),
        ),
        (service("echo", "10.96.0.20"),),
    )
    offered: list[list[str]] = []

    def last(endpoints: Sequence[Endpoint]) -> Endpoint:
        offered.append([e.workload.name for e in endpoints])
        return endpoints[-1]

    assert route_outbound(idx, "10.96.0.20", 80, last).connect_ip == "10.244.1.3"
    assert offered == [["echo-1", "echo-3"]]


def test_a_service_without_healthy_endpoints_is_refused_with_the_reason() -> None:
    idx = index(
        (workload("echo-1", "10.244.0.3", services=ECHO_PORTS, healthy=False),),
        (service("echo", "10.96.0.20"),),
    )
    route = route_outbound(idx, "10.96.0.20", 80)
    assert route.kind is Kind.REFUSE and "no healthy endpoint" in route.reason


def test_a_workload_ip_goes_direct_and_non_mesh_pods_are_passed_through() -> None:
    idx = index(
        (workload("db", "10.244.1.9", sa="db"), workload("legacy", "10.244.1.8", hbone=False))
    )
    direct = route_outbound(idx, "10.244.1.9", 5432)
    assert direct.kind is Kind.HBONE and direct.authority == "10.244.1.9:5432"
    legacy = route_outbound(idx, "10.244.1.8", 80)
    assert legacy.kind is Kind.PASSTHROUGH
    assert (legacy.connect_ip, legacy.connect_port) == ("10.244.1.8", 80)
    outside = route_outbound(idx, "192.0.2.1", 443)
    assert outside.kind is Kind.PASSTHROUGH and "not a mesh address" in outside.reason


def test_a_non_mesh_endpoint_of_a_service_gets_plain_tcp_to_its_target_port() -> None:
    idx = index(
        (workload("echo-1", "10.244.0.3", services=ECHO_PORTS, hbone=False),),
        (service("echo", "10.96.0.20"),),
    )
    route = route_outbound(idx, "10.96.0.20", 80)
    assert route.kind is Kind.PASSTHROUGH
    assert (route.connect_ip, route.connect_port) == ("10.244.0.3", 8080)


def test_a_service_with_a_waypoint_goes_to_the_waypoint_with_the_vip_as_authority() -> None:
    waypoint_ports = {
        "shop/waypoint.shop.svc.cluster.local": (Port(service_port=15008, target_port=15008),)
    }
    idx = index(
        (
            workload("echo-1", "10.244.0.3", services=ECHO_PORTS),
            workload("waypoint-0", "10.244.1.50", sa="waypoint", services=waypoint_ports),
        ),
        (
            service("echo", "10.96.0.20", waypoint="10.96.0.99"),
            service("waypoint", "10.96.0.99", ports=(Port(service_port=15008, target_port=15008),)),
        ),
    )
    route = route_outbound(idx, "10.96.0.20", 80)
    assert route.kind is Kind.WAYPOINT
    assert (route.connect_ip, route.connect_port) == ("10.244.1.50", 15008)
    assert route.authority == "10.96.0.20:80"
    assert route.expected_identity == SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/waypoint")


def test_a_workload_waypoint_that_is_not_running_refuses() -> None:
    idx = index((workload("db", "10.244.1.9", waypoint="10.96.0.99"),))
    route = route_outbound(idx, "10.244.1.9", 5432)
    assert route.kind is Kind.REFUSE and "waypoint" in route.reason


def test_ipv6_authorities_are_bracketed() -> None:
    idx = index((workload("db", "fd00::9"),))
    assert route_outbound(idx, "fd00::9", 5432).authority == "[fd00::9]:5432"


# -- load balancing: a service's preference for endpoints close to the client -----------

NODE_LOCAL = LoadBalancing(
    routing_preference=(LoadBalancingScope.NODE,), mode=LoadBalancingMode.STRICT
)
PREFER_SAME_NODE = LoadBalancing(
    routing_preference=(
        LoadBalancingScope.NETWORK,
        LoadBalancingScope.REGION,
        LoadBalancingScope.ZONE,
        LoadBalancingScope.SUBZONE,
        LoadBalancingScope.NODE,
    ),
    mode=LoadBalancingMode.FAILOVER,
)
PREFER_SAME_ZONE = LoadBalancing(
    routing_preference=(
        LoadBalancingScope.NETWORK,
        LoadBalancingScope.REGION,
        LoadBalancingScope.ZONE,
    ),
    mode=LoadBalancingMode.FAILOVER,
)


def echo_service(lb: LoadBalancing | None) -> Service:
    return replace(service("echo", "10.96.0.20"), load_balancing=lb)


def offered_to(
    client: Workload, idx: StateIndex, vip: str = "10.96.0.20"
) -> tuple[Route, list[str]]:
    """The route, and the endpoints the chooser was offered."""
    offered: list[str] = []

    def record(endpoints: Sequence[Endpoint]) -> Endpoint:
        offered.extend(e.workload.name for e in endpoints)
        return endpoints[0]

    return route_outbound(idx, vip, 80, record, source=client), offered


CLIENT = workload("sleep", "10.244.0.9", namespace="apps", node="node1")


def test_failover_offers_the_endpoints_on_the_clients_node() -> None:
    idx = index(
        (
            workload("echo-a", "10.244.1.2", services=ECHO_PORTS, node="node2"),
            workload("echo-b", "10.244.0.3", services=ECHO_PORTS, node="node1"),
            workload("echo-c", "10.244.0.4", services=ECHO_PORTS, node="node1"),
            CLIENT,
        ),
        (echo_service(PREFER_SAME_NODE),),
    )
    route, offered = offered_to(CLIENT, idx)
    assert route.kind is Kind.HBONE and route.connect_ip == "10.244.0.3"
    assert offered == ["echo-b", "echo-c"]


def test_failover_falls_back_to_other_nodes_when_none_is_local_or_healthy() -> None:
    idx = index(
        (
            workload("echo-a", "10.244.1.2", services=ECHO_PORTS, node="node2"),
            workload("echo-b", "10.244.2.2", services=ECHO_PORTS, node="node3"),
            workload("echo-local", "10.244.0.3", services=ECHO_PORTS, healthy=False),
        ),
        (echo_service(PREFER_SAME_NODE),),
    )
    route, offered = offered_to(CLIENT, idx)
    assert route.kind is Kind.HBONE
    assert offered == ["echo-a", "echo-b"]


def test_failover_ranks_by_the_leading_scopes_shared_with_the_client() -> None:
    """Same zone beats same region beats elsewhere; a scope after a mismatch counts for
    nothing (ztunnel stops at the first), so a different zone on the same node ranks low."""
    here = Locality(region="eu", zone="eu-1a")
    client = replace(CLIENT, locality=here)
    idx = index(
        (
            replace(workload("far", "10.244.3.2", services=ECHO_PORTS), locality=Locality()),
            replace(
                workload("region", "10.244.2.2", services=ECHO_PORTS, node="node3"),
                locality=Locality(region="eu", zone="eu-1b"),
            ),
            replace(
                workload("zone", "10.244.1.2", services=ECHO_PORTS, node="node2"),
                locality=here,
            ),
            client,
        ),
        (echo_service(PREFER_SAME_NODE),),
    )
    assert offered_to(client, idx)[1] == ["zone"]
    without_zone = index(
        tuple(w for w in idx.state.workloads.values() if w.name != "zone"),
        (echo_service(PREFER_SAME_NODE),),
    )
    assert offered_to(client, without_zone)[1] == ["region"]
    # PreferClose does not look past the zone: every endpoint in it is as good, while
    # PreferSameNode goes on to the node.
    on_node2 = replace(client, node="node2")
    elsewhere = replace(
        workload("zone-elsewhere", "10.244.5.2", services=ECHO_PORTS, node="node5"),
        locality=here,
    )
    pods = (*idx.state.workloads.values(), elsewhere)
    zone_only = index(pods, (echo_service(PREFER_SAME_ZONE),))
    assert offered_to(on_node2, zone_only)[1] == ["zone", "zone-elsewhere"]
    assert offered_to(on_node2, index(pods, (echo_service(PREFER_SAME_NODE),)))[1] == ["zone"]


def test_strict_refuses_when_no_endpoint_is_on_the_clients_node() -> None:
    idx = index(
        (
            workload("echo-a", "10.244.1.2", services=ECHO_PORTS, node="node2"),
            workload("echo-local", "10.244.0.3", services=ECHO_PORTS, healthy=False),
        ),
        (echo_service(NODE_LOCAL),),
    )
    route, offered = offered_to(CLIENT, idx)
    assert route.kind is Kind.REFUSE and offered == []
    assert route.service is not None and route.service.name == "echo"
    assert "service shop/echo" in route.reason and "node 'node1'" in route.reason
    assert "internalTrafficPolicy is Local" in route.reason


def test_strict_uses_only_the_endpoints_on_the_clients_node() -> None:
    idx = index(
        (
            workload("echo-a", "10.244.1.2", services=ECHO_PORTS, node="node2"),
            workload("echo-local", "10.244.0.3", services=ECHO_PORTS, node="node1"),
        ),
        (echo_service(NODE_LOCAL),),
    )
    route, offered = offered_to(CLIENT, idx)
    assert (route.kind, route.connect_ip, route.authority) == (
        Kind.HBONE,
        "10.244.0.3",
        "10.244.0.3:8080",
    )
    assert offered == ["echo-local"]


def test_strict_without_a_known_client_refuses_and_failover_offers_all() -> None:
    pods = (
        workload("echo-a", "10.244.1.2", services=ECHO_PORTS, node="node2"),
        workload("echo-b", "10.244.0.3", services=ECHO_PORTS, node="node1"),
    )
    strict = route_outbound(index(pods, (echo_service(NODE_LOCAL),)), "10.96.0.20", 80)
    assert strict.kind is Kind.REFUSE and "client's workload is not known" in strict.reason
    failover = index(pods, (echo_service(PREFER_SAME_NODE),))
    assert route_outbound(failover, "10.96.0.20", 80).kind is Kind.HBONE


def test_other_services_and_workload_addresses_ignore_the_preference() -> None:
    db_ports = {"shop/db.shop.svc.cluster.local": (Port(service_port=80, target_port=5432),)}
    idx = index(
        (
            workload("echo-a", "10.244.1.2", services=ECHO_PORTS, node="node2"),
            workload("db-a", "10.244.1.3", services=db_ports, node="node2"),
            workload("db-b", "10.244.2.3", services=db_ports, node="node3"),
        ),
        (echo_service(NODE_LOCAL), service("db", "10.96.0.30")),
    )
    route, offered = offered_to(CLIENT, idx, "10.96.0.30")
    assert route.kind is Kind.HBONE and offered == ["db-a", "db-b"]
    # A pod addressed by its own IP is that pod, whatever its services prefer.
    direct = route_outbound(idx, "10.244.1.2", 8080, source=CLIENT)
    assert direct.kind is Kind.HBONE and direct.connect_ip == "10.244.1.2"


def test_allow_all_health_policy_offers_unhealthy_endpoints_too() -> None:
    lb = replace(PREFER_SAME_NODE, health_policy=HealthPolicy.ALLOW_ALL)
    idx = index(
        (
            workload("echo-a", "10.244.1.2", services=ECHO_PORTS, node="node2"),
            workload("echo-local", "10.244.0.3", services=ECHO_PORTS, healthy=False),
        ),
        (echo_service(lb),),
    )
    assert offered_to(CLIENT, idx)[1] == ["echo-local"]


def test_a_waypoint_services_own_preference_picks_the_close_instance() -> None:
    hbone = (Port(service_port=15008, target_port=15008),)
    waypoint_ports = {"shop/waypoint.shop.svc.cluster.local": hbone}
    waypoint_service = service("waypoint", "10.96.0.99", ports=hbone)
    idx = index(
        (
            workload("echo-1", "10.244.1.3", services=ECHO_PORTS, node="node2"),
            workload("wp-far", "10.244.1.50", sa="waypoint", services=waypoint_ports, node="n2"),
            workload("wp-near", "10.244.0.50", sa="waypoint", services=waypoint_ports),
        ),
        (
            service("echo", "10.96.0.20", waypoint="10.96.0.99"),
            replace(waypoint_service, load_balancing=PREFER_SAME_NODE),
        ),
    )
    route, offered = offered_to(CLIENT, idx)
    assert route.kind is Kind.WAYPOINT and route.connect_ip == "10.244.0.50"
    assert offered == ["wp-near"]


def test_a_waypoint_named_by_hostname_only_is_refused_not_bypassed() -> None:
    """meshd names a missing waypoint by hostname: ztunnel refuses instead of going direct."""
    import dataclasses

    from mesh.model import GatewayAddress, Port
    from tests.unit.ztunnel.conftest import index, service, workload
    from ztunnel.route import Kind, route_outbound

    reviews = dataclasses.replace(
        service("reviews", "10.96.0.20"),
        waypoint=GatewayAddress(hostname="shop/waypoint.shop.svc.cluster.local"),
    )
    pod = workload(
        "r1",
        "10.244.1.2",
        services={reviews.resource_name: (Port(service_port=80, target_port=8080),)},
    )
    route = route_outbound(index((pod,), (reviews,)), "10.96.0.20", 80)
    assert route.kind is Kind.REFUSE and "missing or not ready" in route.reason
