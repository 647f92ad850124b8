"""A 2-node x 2-pod cluster built from a file: traffic, status, labels, exec."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.cluster.statefile import cluster_dir
from tests.integration.conftest import http_get, meshlab, status, unique_name

ECHO = ["meshlab", "app", "echo", "--port", "8080"]
SPEC: dict[str, Any] = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "namespaces": [{"name": "apps", "labels": {"team": "a"}}],
    "serviceAccounts": [{"namespace": "apps", "name": "web"}],
    "pods": [
        {
            "name": "a1",
            "namespace": "apps",
            "node": "node1",
            "serviceAccount": "web",
            "labels": {"app": "web"},
            "command": ECHO,
        },
        {
            "name": "a2",
            "namespace": "apps",
            "node": "node1",
            "labels": {"app": "db"},
            "command": ECHO,
        },
        {
            "name": "b1",
            "namespace": "apps",
            "node": "node2",
            "serviceAccount": "web",
            "labels": {"app": "web"},
            "command": ECHO,
        },
        {"name": "b2", "node": "node2", "command": ECHO},
    ],
    "services": [
        {
            "name": "web",
            "namespace": "apps",
            "vip": "10.96.0.80",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            "selector": {"app": "web"},
        }
    ],
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = unique_name()
    path: Path = tmp_path_factory.mktemp("lab") / "cluster.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    try:
        meshlab("up", "-f", str(path), "--name", name)
        yield name
    finally:
        meshlab("down", "--name", name, check=False)


def pods_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in doc["pods"]}


def test_status_matches_the_file(lab: str) -> None:
    doc = status(lab)
    assert doc["name"] == lab and doc["phase"] == "Running"
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert sorted(nodes) == ["node1", "node2"]
    assert {ns["name"]: ns["labels"] for ns in doc["namespaces"]} == {
        "default": {},
        "apps": {"team": "a"},
    }
    pods = pods_by_name(doc)
    assert sorted(pods) == ["a1", "a2", "b1", "b2"]
    for spec in SPEC["pods"]:
        pod = pods[spec["name"]]
        assert pod["namespace"] == spec.get("namespace", "default")
        assert pod["node"] == spec["node"]
        assert pod["serviceAccount"] == spec.get("serviceAccount", "default")
        assert pod["labels"] == spec.get("labels", {})
        assert pod["phase"] == "Running"
        # Each pod got its address from host-local IPAM, inside its node's CIDR.
        assert IPv4Address(pod["ip"]) in IPv4Network(nodes[pod["node"]]["podCIDR"])
    assert len({p["ip"] for p in pods.values()}) == 4
    (svc,) = doc["services"]
    assert (svc["name"], svc["namespace"], svc["vip"]) == ("web", "apps", "10.96.0.80")
    assert svc["ports"] == [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    assert sorted(e["pod"] for e in svc["endpoints"]) == ["a1", "b1"]


def test_status_yaml_and_table_say_the_same(lab: str) -> None:
    as_yaml = yaml.safe_load(meshlab("status", "--name", lab, "-o", "yaml").stdout)
    assert as_yaml == status(lab)
    table = meshlab("status", "--name", lab).stdout
    for pod in status(lab)["pods"]:
        assert pod["ip"] in table


def test_tcp_between_pods_on_the_same_node(lab: str) -> None:
    pods = pods_by_name(status(lab))
    reply = http_get(lab, "apps/a1", f"http://{pods['a2']['ip']}:8080/same-node")
    assert (reply["pod"], reply["node"], reply["path"]) == ("a2", "node1", "/same-node")
    assert reply["client"].split(":")[0] == pods["a1"]["ip"]


def test_tcp_between_pods_across_nodes_keeps_the_pod_address(lab: str) -> None:
    pods = pods_by_name(status(lab))
    reply = http_get(lab, "apps/a1", f"http://{pods['b2']['ip']}:8080/cross")
    assert (reply["pod"], reply["namespace"], reply["node"]) == ("b2", "default", "node2")
    # Pod CIDRs are routed between nodes, not masqueraded: the source is a1's own IP.
    assert reply["client"].split(":")[0] == pods["a1"]["ip"]
    back = http_get(lab, "b2", f"http://{pods['a1']['ip']}:8080/back")
    assert back["pod"] == "a1" and back["client"].split(":")[0] == pods["b2"]["ip"]


def test_pods_cannot_reach_beyond_the_cluster(lab: str) -> None:
    # 192.0.2.0/24 is TEST-NET-1: no node routes it, so the connection fails at once.
    done = meshlab(
        "exec",
        "--name",
        lab,
        "apps/a1",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "3",
        "http://192.0.2.1/",
        check=False,
    )
    assert done.returncode == 7, done.stderr  # curl: could not connect (refused at the node)
    for node in ("node1", "node2"):
        routes = meshlab("exec", "--name", lab, f"node/{node}", "--", "ip", "-4", "route").stdout
        assert "default" not in routes, f"{node} must not route anywhere outside the cluster"


def test_label_changes_show_in_status(lab: str) -> None:
    before = status(lab)["resourceVersion"]
    out = meshlab("label", "--name", lab, "namespace", "apps", "istio.io/dataplane-mode=ambient")
    assert out.stdout.strip() == "namespace/apps labeled"
    doc = status(lab)
    assert doc["resourceVersion"] == before + 1
    labels = {ns["name"]: ns["labels"] for ns in doc["namespaces"]}["apps"]
    assert labels == {"team": "a", "istio.io/dataplane-mode": "ambient"}

    refused = meshlab("label", "--name", lab, "ns", "apps", "team=b", check=False)
    assert refused.returncode == 1 and "--overwrite" in refused.stderr
    same = meshlab("label", "--name", lab, "ns", "apps", "team=a")
    assert same.stdout.strip() == "namespace/apps not labeled"
    assert status(lab)["resourceVersion"] == before + 1, "no change, no new version"

    meshlab(
        "label",
        "--name",
        lab,
        "namespace",
        "apps",
        "istio.io/dataplane-mode-",
        "team=b",
        "--overwrite",
    )
    labels = {ns["name"]: ns["labels"] for ns in status(lab)["namespaces"]}["apps"]
    assert labels == {"team": "b"}

    meshlab("label", "--name", lab, "pod", "-n", "apps", "a2", "istio.io/dataplane-mode=none")
    assert pods_by_name(status(lab))["a2"]["labels"] == {
        "app": "db",
        "istio.io/dataplane-mode": "none",
    }
    missing = meshlab("label", "--name", lab, "namespace", "ghost", "a=b", check=False)
    assert missing.returncode == 1 and 'namespaces "ghost" not found' in missing.stderr


def test_exec_runs_in_the_pod_or_node_and_passes_the_exit_status(lab: str) -> None:
    doc = status(lab)
    pods, nodes = pods_by_name(doc), {n["name"]: n for n in doc["nodes"]}
    addr = meshlab("exec", "--name", lab, "b2", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert pods["b2"]["ip"] in addr.stdout
    node = meshlab("exec", "--name", lab, "node/node2", "--", "ip", "-4", "-o", "addr")
    assert nodes["node2"]["ip"] in node.stdout
    # ptp, as kindnet: each pod's host-side veth holds the node's pod gateway address.
    assert " veth" in node.stdout and nodes["node2"]["podCIDR"].rsplit(".", 1)[0] in node.stdout
    env = meshlab("exec", "--name", lab, "apps/a1", "--", "sh", "-c", "echo $POD_NAME $NODE_NAME")
    assert env.stdout.split() == ["a1", "node1"]
    failed = meshlab("exec", "--name", lab, "apps/a1", "--", "sh", "-c", "exit 7", check=False)
    assert failed.returncode == 7


def test_nodes_are_wired_like_kind(lab: str) -> None:
    doc = status(lab)
    nodes = {n["name"]: n for n in doc["nodes"]}
    routes = meshlab("exec", "--name", lab, "node/node1", "--", "ip", "-4", "route").stdout
    assert f"{nodes['node2']['podCIDR']} via {nodes['node2']['ip']}" in routes
    forwarding = meshlab(
        "exec", "--name", lab, "node/node1", "--", "sysctl", "-n", "net.ipv4.ip_forward"
    ).stdout
    assert forwarding.strip() == "1"
    # The CNI result of each pod is cached as libcni does, for DEL at teardown.
    results = cluster_dir(lab) / "nodes" / "node1" / "cni" / "results"
    cached = [json.loads(p.read_text()) for p in results.iterdir()]
    ips = {ip["address"].split("/")[0] for r in cached for ip in r.get("ips", [])}
    assert pods_by_name(doc)["a1"]["ip"] in ips


def test_a_second_up_with_the_same_name_is_refused(lab: str, tmp_path: Path) -> None:
    done = meshlab("up", "--name", lab, "--nodes", "1", "--pods-per-node", "1", check=False)
    assert done.returncode == 1
    assert "already exists" in done.stderr and f"meshlab down --name {lab}" in done.stderr
    assert status(lab)["phase"] == "Running", "the refused up must not touch the cluster"


def test_app_logs_are_kept_per_pod(lab: str) -> None:
    log = cluster_dir(lab) / "logs" / "apps.a1.log"
    assert "echo: listening on 0.0.0.0:8080" in log.read_text()


def test_exec_with_unknown_target(lab: str) -> None:
    done = meshlab("exec", "--name", lab, "nope", "--", "true", check=False)
    assert done.returncode == 1 and "no pod or node 'nope'" in done.stderr
    assert subprocess.run(["true"]).returncode == 0
