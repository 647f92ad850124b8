"""The instance of a waypoint Gateway on meshlab, as Istio's deployment controller makes it.

For a ``Gateway`` of class ``istio-waypoint``, Istio creates a Deployment, a
ServiceAccount and a Service named after it. meshlab has no Deployments, so
it plays the controller and the kubelet both: it adds to the cluster

* a service account named after the Gateway;
* a pod named after the Gateway, labelled as Istio labels waypoint pods
  (``gateway.networking.k8s.io/gateway-name``,
  ``gateway.istio.io/managed=istio.io-mesh-controller``,
  ``istio.io/dataplane-mode=none``: the waypoint does its own HBONE), running
  ``waypoint`` with a token of its own for meshd's CA;
* a Service named after the Gateway (15008 ``mesh``, 15021 ``status-port``,
  15020 ``metrics``) selecting that pod;

and writes the Service's address into the Gateway's ``status.addresses``, as
the controller does. Deleting the Gateway removes all three.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mesh.cluster import Cluster, Pod, Service, ServiceAccount, ServicePort

WAYPOINT_CLASS = "istio-waypoint"
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
MANAGED = "gateway.istio.io/managed"
MANAGED_VALUE = "istio.io-mesh-controller"
PORTS = (
    ServicePort(port=15008, target_port=15008, name="mesh", app_protocol="all"),
    ServicePort(port=15021, target_port=15021, name="status-port", app_protocol="tcp"),
    ServicePort(port=15020, target_port=15020, name="metrics", app_protocol="http"),
)


def is_waypoint(obj: Mapping[str, Any]) -> bool:
    spec = obj.get("spec") or {}
    return obj.get("kind") == "Gateway" and spec.get("gatewayClassName") == WAYPOINT_CLASS


def gateway_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta["name"])


def instance_pod(
    state: Cluster, namespace: str, name: str, *, command: list[str], node: str | None = None
) -> Pod:
    """The waypoint's pod, on the node with the fewest pods (a scheduler's first guess)."""
    if node is None:
        counts = {n.name: 0 for n in state.nodes}
        for p in state.pods:
            counts[p.node] = counts.get(p.node, 0) + 1
        node = min(counts, key=lambda n: (counts[n], n))
    return Pod(
        name=name,
        namespace=namespace,
        node=node,
        service_account=name,
        labels=MappingProxyType(
            {
                GATEWAY_NAME: name,
                MANAGED: MANAGED_VALUE,
                "istio.io/dataplane-mode": "none",
                "service.istio.io/canonical-name": name,
            }
        ),
        command=tuple(command),
    )


def instance_service(namespace: str, name: str, vip: IPv4Address) -> Service:
    return Service(
        name=name,
        namespace=namespace,
        vip=vip,
        ports=PORTS,
        selector=MappingProxyType({GATEWAY_NAME: name}),
        labels=MappingProxyType({GATEWAY_NAME: name, MANAGED: MANAGED_VALUE}),
    )


def command(
    namespace: str, name: str, *, bin_dir: Path, xds: str, root_cert: Path, token: Path
) -> list[str]:
    return [
        str(bin_dir / "waypoint"),
        "--gateway",
        f"{namespace}/{name}",
        "--xds-address",
        xds,
        "--root-cert",
        str(root_cert),
        "--token-file",
        str(token),
        "--pod-name",
        name,
    ]


def free_vip(state: Cluster) -> IPv4Address:
    taken = {s.vip for s in state.services}
    cidr = state.network.service_cidr
    for offset in range(16, cidr.num_addresses - 1):
        candidate = cidr.network_address + offset
        if candidate not in taken:
            return candidate
    raise ValueError(f"no free address left in {cidr}")


def with_instance(state: Cluster, gateway: Mapping[str, Any], pod: Pod) -> Cluster:
    """``state`` with the Gateway, its service account, Service and pod (planned: the pod
    is created by the caller), and the Service's VIP as the Gateway's address."""
    namespace, name = gateway_of(gateway)
    existing = next((s for s in state.services if (s.namespace, s.name) == (namespace, name)), None)
    vip = existing.vip if existing is not None else free_vip(state)
    doc = copy.deepcopy(dict(gateway))
    status = dict(doc.get("status") or {})
    status["addresses"] = [{"type": "IPAddress", "value": str(vip)}]
    doc["status"] = status
    accounts = state.service_accounts
    if not any((a.namespace, a.name) == (namespace, name) for a in accounts):
        accounts = (*accounts, ServiceAccount(namespace=namespace, name=name))
    state = state.with_resource(doc).with_service(instance_service(namespace, name, vip))
    pods = (*(p for p in state.pods if p.key != pod.key), pod)
    return replace(state, service_accounts=accounts, pods=pods)


def without_instance(state: Cluster, namespace: str, name: str) -> Cluster:
    state = state.without_resource("Gateway", namespace, name).without_service(namespace, name)
    pods = tuple(
        p
        for p in state.pods
        if not (p.namespace == namespace and p.labels.get(GATEWAY_NAME) == name)
    )
    accounts = tuple(
        a for a in state.service_accounts if (a.namespace, a.name) != (namespace, name)
    )
    return replace(state, pods=pods, service_accounts=accounts)


def instances(state: Cluster, namespace: str, name: str) -> list[Pod]:
    return [
        p
        for p in state.pods
        if p.namespace == namespace
        and p.labels.get(GATEWAY_NAME) == name
        and p.labels.get(MANAGED) == MANAGED_VALUE
    ]
