"""The typed cluster model and its parsing from YAML/JSON documents.

One shape serves two purposes: the ``cluster.yaml`` a user writes (intent
only) and the state file of a running cluster (the same document with the
runtime fields filled in: node IPs, pod IPs, network namespaces, process
ids). Parsing validates everything at once and names the offending field, so
a typo in a 200-line file is reported as ``pods[12].serviceAccount: ...``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType
from typing import Any

from mesh.cluster.labels import selector_matches

API_VERSION = "meshlab/v1"
CAPTURE_BACKENDS = ("iptables", "ebpf")  # the first is the default
DEFAULT_NAMESPACE = "default"
DEFAULT_SERVICE_ACCOUNT = "default"
DEFAULT_POD_CIDR = IPv4Network("10.244.0.0/16")
DEFAULT_SERVICE_CIDR = IPv4Network("10.96.0.0/16")
# The values Kubernetes accepts in a service's spec.trafficDistribution and
# spec.internalTrafficPolicy (PreferClose is PreferSameZone's former name).
TRAFFIC_DISTRIBUTIONS = ("PreferClose", "PreferSameZone", "PreferSameNode")
INTERNAL_TRAFFIC_POLICIES = ("Cluster", "Local")
# Kubernetes hands out service VIPs from the bottom of the range; .1 is the API
# server's and .10 kube-dns's by convention, so ours start above them.
_FIRST_AUTO_VIP_OFFSET = 16

Labels = Mapping[str, str]


def _frozen(labels: Mapping[str, str]) -> Labels:
    return MappingProxyType(dict(labels))


@dataclass(frozen=True, slots=True, kw_only=True)
class Network:
    """Address plan. ``underlay`` is picked by meshlab at ``up`` when not given."""

    underlay: IPv4Network | None = None
    pod_cidr: IPv4Network = DEFAULT_POD_CIDR
    service_cidr: IPv4Network = DEFAULT_SERVICE_CIDR
    bridge: str | None = None
    gateway: IPv4Address | None = None

    @property
    def dns_ip(self) -> IPv4Address:
        """The cluster DNS address pods are told to use (kube-dns's: the 10th of the
        service CIDR). Queries to it from mesh pods are answered by ztunnel."""
        return self.service_cidr.network_address + 10


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    name: str
    pod_cidr: IPv4Network
    ip: IPv4Address | None = None
    netns: str | None = None
    capture: str = "iptables"  # how the node's mesh pods are captured: CAPTURE_BACKENDS


@dataclass(frozen=True, slots=True, kw_only=True)
class Namespace:
    name: str
    labels: Labels = field(default_factory=lambda: _frozen({}))


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAccount:
    namespace: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Pod:
    name: str
    namespace: str
    node: str
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    labels: Labels = field(default_factory=lambda: _frozen({}))
    command: tuple[str, ...] = ()
    ip: IPv4Address | None = None
    netns: str | None = None
    container_id: str | None = None
    pid: int | None = None

    @property
    def key(self) -> str:
        """``namespace/name``, the way kubectl names a pod across namespaces."""
        return f"{self.namespace}/{self.name}"

    @property
    def uid(self) -> str:
        """The pod's UID (Kubernetes' metadata.uid): a UUID made of its sandbox's id,
        stable for that sandbox; empty before it has one. meshlab names the pod's
        cgroup after it and passes it in CNI_ARGS, as kubelet does."""
        if not self.container_id or len(self.container_id) < 32:
            return ""
        try:
            return str(uuid.UUID(self.container_id[:32]))
        except ValueError:
            return ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""  # Kubernetes' appProtocol: what the port carries (http, grpc, ...)


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    name: str
    namespace: str
    vip: IPv4Address
    ports: tuple[ServicePort, ...]
    selector: Labels = field(default_factory=lambda: _frozen({}))
    # As in Kubernetes: a hint to prefer close endpoints, and "Local" to allow
    # only endpoints on the client's node. None: not set.
    traffic_distribution: str | None = None
    internal_traffic_policy: str | None = None
    labels: Labels = field(default_factory=lambda: _frozen({}))

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """A whole cluster: the user's intent plus, once running, the runtime facts."""

    name: str | None
    network: Network
    nodes: tuple[Node, ...]
    namespaces: tuple[Namespace, ...]
    service_accounts: tuple[ServiceAccount, ...]
    pods: tuple[Pod, ...]
    services: tuple[Service, ...]
    # Istio AuthorizationPolicy objects, as written (apiVersion, kind,
    # metadata, spec); meshd parses and validates them like the API server's.
    policies: tuple[Mapping[str, Any], ...] = ()
    # Waypoints (Gateways of class istio-waypoint): name, namespace, address.
    waypoints: tuple[Mapping[str, Any], ...] = ()
    # Gateway API and Istio objects as written (Gateway, HTTPRoute, GRPCRoute,
    # VirtualService, DestinationRule, RequestAuthentication, EnvoyFilter): apiVersion, kind,
    # metadata, spec, status.
    resources: tuple[Mapping[str, Any], ...] = ()
    resource_version: int = 0
    phase: str | None = None
    # Run the mesh on the cluster: meshd, and on each node the node agent,
    # ztunnel and the ztunnel-cni plugin in the CNI chain.
    mesh: bool = False

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def namespace(self, name: str) -> Namespace:
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        raise KeyError(name)

    def endpoints(self, service: Service) -> list[Pod]:
        """Pods a service selects, in file order (Kubernetes' EndpointSlice contents)."""
        return [
            p
            for p in self.pods
            if p.namespace == service.namespace and selector_matches(service.selector, p.labels)
        ]

    def with_namespace_labels(self, name: str, labels: Mapping[str, str]) -> Cluster:
        namespaces = tuple(
            replace(ns, labels=_frozen(labels)) if ns.name == name else ns for ns in self.namespaces
        )
        return replace(self, namespaces=namespaces)

    def with_pod_labels(self, key: str, labels: Mapping[str, str]) -> Cluster:
        pods = tuple(replace(p, labels=_frozen(labels)) if p.key == key else p for p in self.pods)
        return replace(self, pods=pods)

    def with_pod(self, pod: Pod) -> Cluster:
        pods = tuple(pod if p.key == pod.key else p for p in self.pods)
        return replace(self, pods=pods)

    def to_dict(self) -> dict[str, Any]:
        """The document form (camelCase, as in ``cluster.yaml``); runtime fields when set."""
        net: dict[str, Any] = {
            "podCIDR": str(self.network.pod_cidr),
            "serviceCIDR": str(self.network.service_cidr),
        }
        if self.network.underlay is not None:
            net["underlay"] = str(self.network.underlay)
        if self.network.bridge is not None:
            net["bridge"] = self.network.bridge
        if self.network.gateway is not None:
            net["gateway"] = str(self.network.gateway)
        doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": "Cluster"}
        if self.name is not None:
            doc["name"] = self.name
        if self.phase is not None:
            doc["phase"] = self.phase
        doc["resourceVersion"] = self.resource_version
        if self.mesh:
            doc["mesh"] = True
        doc["network"] = net
        doc["nodes"] = [
            _drop_none(
                {
                    "name": n.name,
                    "podCIDR": str(n.pod_cidr),
                    "ip": _str_or_none(n.ip),
                    "netns": n.netns,
                    "capture": n.capture if n.capture != CAPTURE_BACKENDS[0] else None,
                }
            )
            for n in self.nodes
        ]
        doc["namespaces"] = [{"name": ns.name, "labels": dict(ns.labels)} for ns in self.namespaces]
        doc["serviceAccounts"] = [
            {"namespace": sa.namespace, "name": sa.name} for sa in self.service_accounts
        ]
        doc["pods"] = [
            _drop_none(
                {
                    "name": p.name,
                    "namespace": p.namespace,
                    "node": p.node,
                    "serviceAccount": p.service_account,
                    "labels": dict(p.labels),
                    "command": list(p.command),
                    "ip": _str_or_none(p.ip),
                    "netns": p.netns,
                    "containerID": p.container_id,
                    "pid": p.pid,
                }
            )
            for p in self.pods
        ]
        doc["services"] = [
            _drop_none(
                {
                    "name": s.name,
                    "namespace": s.namespace,
                    "vip": str(s.vip),
                    "ports": [
                        _drop_empty(
                            {
                                "name": sp.name,
                                "port": sp.port,
                                "targetPort": sp.target_port,
                                "protocol": sp.protocol,
                                "appProtocol": sp.app_protocol,
                            }
                        )
                        for sp in s.ports
                    ],
                    "selector": dict(s.selector),
                    "labels": dict(s.labels) or None,
                    "trafficDistribution": s.traffic_distribution,
                    "internalTrafficPolicy": s.internal_traffic_policy,
                }
            )
            for s in self.services
        ]
        if self.policies:
            doc["authorizationPolicies"] = [dict(p) for p in self.policies]
        if self.waypoints:
            doc["waypoints"] = [dict(w) for w in self.waypoints]
        if self.resources:
            doc["resources"] = [_plain(r) for r in self.resources]
        return doc

    def resource(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        return next((r for r in self.resources if resource_key(r) == (kind, namespace, name)), None)

    def with_resource(self, obj: Mapping[str, Any]) -> Cluster:
        """Add ``obj``, or replace the one of the same kind, namespace and name."""
        key = resource_key(obj)
        kept = tuple(r for r in self.resources if resource_key(r) != key)
        return replace(self, resources=(*kept, obj))

    def without_resource(self, kind: str, namespace: str, name: str) -> Cluster:
        key = (kind, namespace, name)
        return replace(self, resources=tuple(r for r in self.resources if resource_key(r) != key))

    def with_service(self, service: Service) -> Cluster:
        kept = tuple(
            s for s in self.services if (s.namespace, s.name) != (service.namespace, service.name)
        )
        return replace(self, services=(*kept, service))

    def without_service(self, namespace: str, name: str) -> Cluster:
        return replace(
            self,
            services=tuple(s for s in self.services if (s.namespace, s.name) != (namespace, name)),
        )

    def with_service_labels(self, namespace: str, name: str, labels: Mapping[str, str]) -> Cluster:
        services = tuple(
            replace(s, labels=_frozen(labels)) if (s.namespace, s.name) == (namespace, name) else s
            for s in self.services
        )
        return replace(self, services=services)

    def with_policy(self, policy: Mapping[str, Any]) -> Cluster:
        """Add ``policy``, or replace the one of the same namespace and name."""
        key = _policy_key(policy)
        kept = tuple(p for p in self.policies if _policy_key(p) != key)
        return replace(self, policies=(*kept, policy))

    def without_policy(self, namespace: str, name: str) -> Cluster:
        return replace(
            self, policies=tuple(p for p in self.policies if _policy_key(p) != (namespace, name))
        )


def resource_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    """(kind, namespace, name) of an object as written."""
    meta = obj.get("metadata") or {}
    return (
        str(obj.get("kind") or ""),
        str(meta.get("namespace") or DEFAULT_NAMESPACE),
        str(meta.get("name") or ""),
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _drop_empty(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v not in (None, "")}


def _policy_key(policy: Mapping[str, Any]) -> tuple[str, str]:
    meta = policy.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


def _str_or_none(value: object | None) -> str | None:
    return None if value is None else str(value)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}
