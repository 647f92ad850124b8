"""A service's load balancing and a workload's locality, through the wire and back."""

from __future__ import annotations

import ipaddress

import pytest

from mesh.model import (
    HealthPolicy,
    InvalidResource,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
    Service,
    Workload,
    address_from_proto,
)
from mesh.proto.istio.workload import workload_pb2 as pb


def echo(lb: LoadBalancing | None) -> Service:
    return Service(
        name="echo",
        namespace="shop",
        hostname="echo.shop.svc.cluster.local",
        addresses=(ipaddress.ip_address("10.96.0.20"),),
        load_balancing=lb,
    )


@pytest.mark.parametrize(
    "lb",
    [
        None,
        LoadBalancing(routing_preference=(LoadBalancingScope.NODE,), mode=LoadBalancingMode.STRICT),
        LoadBalancing(
            routing_preference=(
                LoadBalancingScope.NETWORK,
                LoadBalancingScope.REGION,
                LoadBalancingScope.ZONE,
                LoadBalancingScope.SUBZONE,
                LoadBalancingScope.NODE,
                LoadBalancingScope.CLUSTER,
            ),
            mode=LoadBalancingMode.FAILOVER,
            health_policy=HealthPolicy.ALLOW_ALL,
        ),
        LoadBalancing(health_policy=HealthPolicy.ALLOW_ALL),  # publishNotReadyAddresses alone
    ],
)
def test_a_services_load_balancing_round_trips(lb: LoadBalancing | None) -> None:
    service = echo(lb)
    wire = pb.Address.FromString(service.to_proto().SerializeToString())
    assert wire.service.HasField("load_balancing") is (lb is not None)
    assert address_from_proto(wire) == service


def test_the_wire_form_is_istios() -> None:
    lb = LoadBalancing(
        routing_preference=(LoadBalancingScope.NETWORK, LoadBalancingScope.ZONE),
        mode=LoadBalancingMode.FAILOVER,
    )
    message = echo(lb).to_proto().service.load_balancing
    assert list(message.routing_preference) == [pb.LoadBalancing.NETWORK, pb.LoadBalancing.ZONE]
    assert message.mode == pb.LoadBalancing.FAILOVER
    assert message.health_policy == pb.LoadBalancing.ONLY_HEALTHY


@pytest.mark.parametrize(
    ("routing_preference", "mode"),
    [
        ([pb.LoadBalancing.UNSPECIFIED_SCOPE], pb.LoadBalancing.FAILOVER),
        ([pb.LoadBalancing.NODE, 42], pb.LoadBalancing.STRICT),
        ([pb.LoadBalancing.NODE], 9),
    ],
)
def test_an_unknown_scope_or_mode_refuses_that_service_alone(
    routing_preference: list[int], mode: int
) -> None:
    """As ztunnel does: a preference it cannot read is not guessed at."""
    message = echo(None).to_proto()
    # Raw numbers: what a newer (or broken) control plane may send.
    message.service.load_balancing.routing_preference.extend(routing_preference)  # type: ignore[arg-type]
    message.service.load_balancing.mode = mode  # type: ignore[assignment]
    with pytest.raises(InvalidResource) as refused:
        address_from_proto(pb.Address.FromString(message.SerializeToString()))
    assert "shop/echo.shop.svc.cluster.local" in str(refused.value)
    assert "load balancing" in str(refused.value)


def test_a_workloads_locality_round_trips_and_is_left_out_when_unknown() -> None:
    placed = Workload(
        uid="Kubernetes//Pod/shop/echo-1",
        name="echo-1",
        namespace="shop",
        addresses=(ipaddress.ip_address("10.244.0.3"),),
        node="node1",
        locality=Locality(region="eu-west", zone="eu-west-1a", subzone="rack7"),
    )
    wire = placed.to_proto()
    assert (wire.workload.locality.region, wire.workload.locality.subzone) == ("eu-west", "rack7")
    assert address_from_proto(pb.Address.FromString(wire.SerializeToString())) == placed
    assert str(placed.locality) == "eu-west/eu-west-1a/rack7"
    unplaced = Workload(
        uid="u", name="n", namespace="ns", addresses=(ipaddress.ip_address("10.0.0.1"),)
    )
    assert not unplaced.to_proto().workload.HasField("locality")
    assert address_from_proto(unplaced.to_proto()) == unplaced
