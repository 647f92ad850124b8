"""Outbound routing decisions over one snapshot."""

from __future__ import annotations

from collections.abc import Sequence

from mesh.identity import SpiffeId
from mesh.model import Port
from tests.unit.ztunnel.conftest import index, service, workload
from ztunnel.index import Endpoint
from ztunnel.route import Kind, route_outbound

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
