"""Parsing cluster.yaml: defaults a user relies on, and errors that name the field."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import yaml

from mesh.cluster import ClusterSpecError, parse_spec


def doc(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "nodes": [{"name": "node1"}, {"name": "node2"}],
        "namespaces": [{"name": "server", "labels": {"team": "backend"}}],
        "serviceAccounts": [{"namespace": "server", "name": "echo"}],
        "pods": [
            {"name": "a", "namespace": "server", "serviceAccount": "echo", "labels": {"app": "e"}},
            {"name": "b", "namespace": "server", "labels": {"app": "e"}},
            {"name": "c"},
        ],
        "services": [
            {
                "name": "echo",
                "namespace": "server",
                "ports": [{"port": 80, "targetPort": 8080}],
                "selector": {"app": "e"},
            },
        ],
    }
    base.update(overrides)
    return base


def test_defaults_follow_kubernetes() -> None:
    cluster = parse_spec(doc())
    assert [ns.name for ns in cluster.namespaces] == ["default", "server"]
    accounts = {(sa.namespace, sa.name) for sa in cluster.service_accounts}
    assert accounts == {("server", "echo"), ("server", "default"), ("default", "default")}
    # Pods without a node are spread over the nodes in file order.
    assert [p.node for p in cluster.pods] == ["node1", "node2", "node1"]
    assert cluster.pods[1].service_account == "default"
    assert cluster.pods[2].namespace == "default"
    # Each node gets its own /24 of the pod CIDR.
    assert [n.pod_cidr for n in cluster.nodes] == [
        IPv4Network("10.244.0.0/24"),
        IPv4Network("10.244.1.0/24"),
    ]
    svc = cluster.services[0]
    assert svc.vip in cluster.network.service_cidr
    assert [p.name for p in cluster.endpoints(svc)] == ["a", "b"]
    assert svc.hostname == "echo.server.svc.cluster.local"


def test_auto_vips_skip_the_ones_taken_explicitly() -> None:
    services = [
        {"name": "x", "ports": [{"port": 1}], "vip": "10.96.0.16"},
        {"name": "y", "ports": [{"port": 1}]},
        {"name": "z", "ports": [{"port": 1}]},
    ]
    vips = [s.vip for s in parse_spec(doc(services=services)).services]
    assert vips[0] == IPv4Address("10.96.0.16")
    assert len(set(vips)) == 3


def test_round_trip_through_the_document_form() -> None:
    cluster = parse_spec(doc())
    again = parse_spec(yaml.safe_load(yaml.safe_dump(cluster.to_dict())))
    assert again == cluster


def test_runtime_fields_survive_a_round_trip() -> None:
    d = doc()
    d["pods"][0].update(ip="10.244.0.5", netns="x-pod-server-a", containerID="ab" * 32, pid=42)
    d["nodes"][0].update(ip="172.30.0.2", netns="x-node-node1")
    cluster = parse_spec(d)
    assert parse_spec(cluster.to_dict()) == cluster
    assert cluster.pods[0].ip == IPv4Address("10.244.0.5")
    assert cluster.pods[0].pid == 42


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        (lambda d: d.update(nodez=[]), "nodez", "unknown field"),
        (lambda d: d.update(nodes=[]), "nodes", "at least one node"),
        (lambda d: d["pods"][0].update(node="node3"), "pods[0].node", "node1, node2"),
        (lambda d: d["pods"][0].update(namespace="nope"), "pods[0].namespace", "not declared"),
        (
            lambda d: d["pods"][1].update(serviceAccount="ghost"),
            "pods[1].serviceAccount",
            "not declared",
        ),
        (lambda d: d["pods"][0].update(name="Bad_Name"), "pods[0].name", "not a valid name"),
        (lambda d: d["pods"][0].update(colour="red"), "pods[0].colour", "unknown field"),
        (
            lambda d: d["pods"].append({"name": "a", "namespace": "server"}),
            "pods",
            "more than once",
        ),
        (
            lambda d: d["pods"][0].update(labels={"app": "has space"}),
            "pods[0].labels",
            "value 'has space'",
        ),
        (lambda d: d["pods"][0].update(labels={"-x": "y"}), "pods[0].labels", "name part"),
        (lambda d: d["pods"][0].update(command=7), "pods[0].command", "command line"),
        (
            lambda d: d["services"][0].update(vip="10.0.0.1"),
            "services[0].vip",
            "outside the service CIDR",
        ),
        (lambda d: d["services"][0].update(ports=[]), "services[0].ports", "at least one port"),
        (
            lambda d: d["services"][0]["ports"][0].update(port=70000),
            "services[0].ports[0].port",
            "not a port number",
        ),
        (
            lambda d: d["services"][0]["ports"][0].update(protocol="SCTP"),
            "services[0].ports[0].protocol",
            "TCP or UDP",
        ),
        (
            lambda d: (
                d["services"].append({"name": "two", "ports": [{"port": 1}], "vip": "10.96.0.99"})
                or d["services"].append(
                    {"name": "three", "ports": [{"port": 1}], "vip": "10.96.0.99"}
                )
            ),
            "services[2].vip",
            "already used",
        ),
        (lambda d: d.update(network={"podCIDR": "10.244.0.0/20"}), "network.podCIDR", "too small"),
        (
            lambda d: d.update(network={"serviceCIDR": "10.244.0.0/16"}),
            "network.podCIDR",
            "overlaps",
        ),
        (lambda d: d.update(network={"podCIDR": "10.244.0.1/16"}), "network.podCIDR", "CIDR form"),
        (lambda d: d.update(apiVersion="v2"), "apiVersion", "meshlab/v1"),
        (lambda d: d["namespaces"].append({"name": "a.b"}), "namespaces[1].name", "DNS label"),
        (
            lambda d: d["nodes"][0].update(capture="nftables"),
            "nodes[0].capture",
            "not a capture backend (iptables, ebpf)",
        ),
    ],
)
def test_each_mistake_is_refused_naming_the_field(change: Any, path: str, words: str) -> None:
    d = doc()
    change(d)
    with pytest.raises(ClusterSpecError) as info:
        parse_spec(d)
    assert info.value.path == path, str(info.value)
    assert words in str(info.value)


def test_not_a_mapping_is_refused() -> None:
    with pytest.raises(ClusterSpecError, match="must be a mapping"):
        parse_spec(["nodes"])


def test_a_node_names_its_capture_backend_iptables_by_default() -> None:
    d = doc()
    d["nodes"][1]["capture"] = "ebpf"
    cluster = parse_spec(d)
    assert [n.capture for n in cluster.nodes] == ["iptables", "ebpf"]
    again = parse_spec(cluster.to_dict())
    assert [n.capture for n in again.nodes] == ["iptables", "ebpf"]
    assert "capture" not in cluster.to_dict()["nodes"][0]
