"""Snapshots for the proxy's pure cores, written as the YAML a user would apply."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from controlplane.authz_yaml import parse_authorization_policy
from controlplane.translate import build_policy
from mesh.model import Policy, Port, Service, TunnelProtocol, Workload, WorkloadStatus
from mesh.model.workload import GatewayAddress
from mesh.xds import XdsState
from ztunnel.index import StateIndex


def policy(name: str, namespace: str, spec: dict[str, Any]) -> Policy:
    info = parse_authorization_policy(
        {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
    )
    return build_policy(info, "istio-system")


def workload(
    name: str,
    ip: str,
    namespace: str = "shop",
    sa: str = "default",
    *,
    hbone: bool = True,
    node: str = "node1",
    services: Mapping[str, tuple[Port, ...]] | None = None,
    policies: tuple[str, ...] = (),
    healthy: bool = True,
    waypoint: str | None = None,
) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{namespace}/{name}",
        name=name,
        namespace=namespace,
        addresses=(ipaddress.ip_address(ip),),
        node=node,
        service_account=sa,
        tunnel_protocol=TunnelProtocol.HBONE if hbone else TunnelProtocol.NONE,
        services=MappingProxyType(dict(services or {})),
        authorization_policies=policies,
        status=WorkloadStatus.HEALTHY if healthy else WorkloadStatus.UNHEALTHY,
        waypoint=GatewayAddress(address=ipaddress.ip_address(waypoint)) if waypoint else None,
    )


def service(
    name: str,
    vip: str,
    namespace: str = "shop",
    ports: tuple[Port, ...] = (Port(service_port=80, target_port=8080),),
    waypoint: str | None = None,
) -> Service:
    return Service(
        name=name,
        namespace=namespace,
        hostname=f"{name}.{namespace}.svc.cluster.local",
        addresses=(ipaddress.ip_address(vip),),
        ports=ports,
        waypoint=GatewayAddress(address=ipaddress.ip_address(waypoint)) if waypoint else None,
    )


def index(
    workloads: tuple[Workload, ...] = (),
    services: tuple[Service, ...] = (),
    policies: tuple[Policy, ...] = (),
) -> StateIndex:
    return StateIndex.build(
        XdsState(
            workloads=MappingProxyType({w.uid: w for w in workloads}),
            services=MappingProxyType({s.resource_name: s for s in services}),
            policies=MappingProxyType({p.resource_name: p for p in policies}),
        )
    )
