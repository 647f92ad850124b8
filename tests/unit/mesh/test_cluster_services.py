"""cluster.yaml services: the traffic preferences Kubernetes services carry."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.sources.local import source_state
from controlplane.translate import translate
from mesh.cluster import ClusterSpecError, parse_spec
from mesh.model import LoadBalancingMode, LoadBalancingScope


def doc(**service: Any) -> dict[str, Any]:
    return {
        "nodes": [{"name": "node1"}],
        "services": [
            {"name": "echo", "ports": [{"port": 80}], "selector": {"app": "e"}, **service}
        ],
    }


def test_preferences_are_read_and_written_back_and_reach_translation() -> None:
    cluster = parse_spec(doc(trafficDistribution="PreferSameNode", internalTrafficPolicy="Cluster"))
    (service,) = cluster.services
    assert (service.traffic_distribution, service.internal_traffic_policy) == (
        "PreferSameNode",
        "Cluster",
    )
    written = cluster.to_dict()["services"][0]
    assert (written["trafficDistribution"], written["internalTrafficPolicy"]) == (
        "PreferSameNode",
        "Cluster",
    )
    assert parse_spec(cluster.to_dict()) == cluster
    (translated,) = translate(source_state(cluster)).services.values()
    assert translated.load_balancing is not None
    assert translated.load_balancing.mode is LoadBalancingMode.FAILOVER
    assert translated.load_balancing.routing_preference[-1] is LoadBalancingScope.NODE


def test_local_traffic_policy_reaches_translation_as_node_strict() -> None:
    cluster = parse_spec(doc(internalTrafficPolicy="Local"))
    (translated,) = translate(source_state(cluster)).services.values()
    assert translated.load_balancing is not None
    assert translated.load_balancing.routing_preference == (LoadBalancingScope.NODE,)
    assert translated.load_balancing.mode is LoadBalancingMode.STRICT


def test_unset_preferences_stay_out_of_the_document() -> None:
    cluster = parse_spec(doc())
    (service,) = cluster.services
    assert (service.traffic_distribution, service.internal_traffic_policy) == (None, None)
    written = cluster.to_dict()["services"][0]
    assert "trafficDistribution" not in written and "internalTrafficPolicy" not in written
    (translated,) = translate(source_state(cluster)).services.values()
    assert translated.load_balancing is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("trafficDistribution", "preferclose", "'preferclose' is not supported"),
        ("trafficDistribution", "Nearby", "PreferClose, PreferSameZone, PreferSameNode"),
        ("internalTrafficPolicy", "Node", "supported values: Cluster, Local"),
        ("internalTrafficPolicy", 1, "must be a string"),
    ],
)
def test_bad_values_are_refused_naming_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(ClusterSpecError) as refused:
        parse_spec(doc(**{field: value}))
    assert refused.value.path == f"services[0].{field}"
    assert message in str(refused.value)
