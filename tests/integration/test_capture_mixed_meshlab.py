"""A mixed cluster: node1 captures its pods with eBPF, node2 with iptables, and the
mesh works across them both ways, HBONE only on the underlay.

The backends meet only on the wire (HBONE between the nodes' ztunnels), so a
cluster can move node by node from one to the other.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import yaml
from scapy.layers.inet import TCP

from meshlab import mesh
from tests.integration.conftest import (
    assert_nothing_left,
    http_get,
    mesh_args,
    meshlab,
    skip_unless_backend_runs,
    unique_name,
)
from tests.integration.meshlab_pods import backend_of, captured, curl, pod_ip, seen, sniff

CLUSTER = {
    "nodes": [{"name": "node1", "capture": "ebpf"}, {"name": "node2", "capture": "iptables"}],
    "namespaces": [{"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}],
    "pods": [
        {
            "name": f"echo-{node}",
            "namespace": "shop",
            "node": node,
            "command": ["meshlab", "app", "echo", "--port", "8080"],
        }
        for node in ("node1", "node2")
    ],
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    skip_unless_backend_runs("ebpf")
    name = unique_name()
    spec = tmp_path_factory.mktemp("mixed") / "cluster.yaml"
    spec.write_text(yaml.safe_dump(CLUSTER))
    try:
        meshlab("up", "-f", str(spec), "--name", name, *mesh_args())
        yield name
    finally:
        meshlab("down", "--name", name, check=False)
        assert_nothing_left(name)


def test_each_node_runs_its_own_backend(cluster: str) -> None:
    for node, backend in (("node1", "ebpf"), ("node2", "iptables")):
        status = mesh.agent_status(cluster, node)
        assert status["capture"] == {"backend": backend, "requested": backend, "refused": ""}
        key = f"shop/echo-{node}"
        assert backend_of(cluster, key) == backend
        assert captured(cluster, key)  # by its node's backend only (checked inside)


def test_pods_reach_each_other_across_the_two_backends_over_hbone(cluster: str) -> None:
    one, two = pod_ip(cluster, "shop/echo-node1"), pod_ip(cluster, "shop/echo-node2")
    marker = f"mixed-{secrets.token_hex(8)}"
    sniffer = sniff(cluster)
    there = http_get(cluster, "shop/echo-node1", f"http://{two}:8080/there")
    code, body = curl(cluster, "shop/echo-node2", f"http://{one}:8080/back", data=marker)
    wire = seen(sniffer)
    assert code == 0, body
    # Captured at the source (eBPF, then iptables), delivered from the client's address.
    assert there["pod"] == "echo-node2" and there["client"].split(":")[0] == one
    assert yaml.safe_load(body)["client"].split(":")[0] == two
    assert {min(p[TCP].sport, p[TCP].dport) for p in wire} == {15008}
    assert not any(marker.encode() in bytes(p[TCP].payload) for p in wire)
