"""Parsing and validating cluster documents (``cluster.yaml``, state files) into the model.

Everything is checked at once and the offending field named, so a typo in a
200-line file is reported as ``pods[12].serviceAccount: ...``.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType
from typing import Any

from mesh.cluster.errors import ClusterSpecError
from mesh.cluster.labels import is_dns_label, is_dns_subdomain, parse_labels
from mesh.cluster.model import (
    _FIRST_AUTO_VIP_OFFSET,
    API_VERSION,
    CAPTURE_BACKENDS,
    DEFAULT_NAMESPACE,
    DEFAULT_POD_CIDR,
    DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_SERVICE_CIDR,
    INTERNAL_TRAFFIC_POLICIES,
    TRAFFIC_DISTRIBUTIONS,
    Cluster,
    Namespace,
    Network,
    Node,
    Pod,
    Service,
    ServiceAccount,
    ServicePort,
    _frozen,
    resource_key,
)

_TOP_KEYS = {
    "apiVersion",
    "kind",
    "name",
    "mesh",
    "network",
    "nodes",
    "namespaces",
    "serviceAccounts",
    "pods",
    "services",
    "resourceVersion",
    "phase",
    "authorizationPolicies",
    "waypoints",
    "resources",
}
# The kinds a cluster document (and `meshlab apply`) keeps as written, by API group.
RESOURCE_KINDS = {
    "Gateway": ("gateway.networking.k8s.io",),
    "HTTPRoute": ("gateway.networking.k8s.io",),
    "GRPCRoute": ("gateway.networking.k8s.io",),
    "VirtualService": ("networking.istio.io",),
    "DestinationRule": ("networking.istio.io",),
    "RequestAuthentication": ("security.istio.io",),
    "EnvoyFilter": ("networking.istio.io",),
    "Telemetry": ("telemetry.istio.io",),
    # Only the root namespace's ``istio`` one is read (its ``mesh`` key: MeshConfig).
    "ConfigMap": ("v1",),
}


class _Reader:
    """Typed access to one mapping of the document, with field paths in errors."""

    def __init__(self, raw: object, path: str, allowed: set[str]) -> None:
        if not isinstance(raw, Mapping):
            raise ClusterSpecError(path, f"must be a mapping, got {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in allowed)
        if unknown:
            raise ClusterSpecError(
                f"{path}.{unknown[0]}" if path else unknown[0],
                f"unknown field; known fields are {', '.join(sorted(allowed))}",
            )
        self.raw = raw
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def text(self, key: str, default: str | None = None) -> str:
        value = self.raw.get(key, default)
        if value is None:
            raise ClusterSpecError(self.at(key), "is required")
        if not isinstance(value, str):
            raise ClusterSpecError(self.at(key), f"must be a string, got {value!r}")
        return value

    def opt_str(self, key: str) -> str | None:
        return None if self.raw.get(key) is None else self.text(key)

    def items(self, key: str) -> Sequence[object]:
        value = self.raw.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ClusterSpecError(self.at(key), f"must be a list, got {type(value).__name__}")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.raw.get(key, default)
        if value is None:
            raise ClusterSpecError(self.at(key), "is required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ClusterSpecError(self.at(key), f"must be an integer, got {value!r}")
        return value

    def network(self, key: str, default: IPv4Network | None) -> IPv4Network | None:
        value = self.raw.get(key)
        if value is None:
            return default
        try:
            return IPv4Network(str(value), strict=True)
        except ValueError as e:
            raise ClusterSpecError(self.at(key), f"not an IPv4 network in CIDR form: {e}") from e

    def address(self, key: str) -> IPv4Address | None:
        value = self.raw.get(key)
        if value is None:
            return None
        try:
            return IPv4Address(str(value))
        except ValueError as e:
            raise ClusterSpecError(self.at(key), f"not an IPv4 address: {value!r}") from e


def _name(r: _Reader, key: str, check: str = "subdomain") -> str:
    value = r.text(key)
    ok = is_dns_label(value) if check == "label" else is_dns_subdomain(value)
    if not ok:
        kind = "an RFC 1123 DNS label" if check == "label" else "an RFC 1123 DNS subdomain"
        raise ClusterSpecError(
            r.at(key), f"{value!r} is not a valid name: must be {kind} (lowercase a-z, 0-9, '-')"
        )
    return value


def _unique(items: Sequence[str], path: str, what: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise ClusterSpecError(path, f"{what} {item!r} is defined more than once")
        seen.add(item)


def parse_spec(raw: object) -> Cluster:
    """Parse and validate a cluster document (``cluster.yaml`` or a state file).

    Pods without a ``node`` are spread over the nodes in file order (a simple,
    deterministic scheduler); services without a ``vip`` get one from the
    service CIDR; namespace ``default`` and the ``default`` service account of
    every namespace exist without being declared, as in Kubernetes.
    """
    top = _Reader(raw, "", _TOP_KEYS)
    api = top.raw.get("apiVersion")
    if api is not None and api != API_VERSION:
        raise ClusterSpecError("apiVersion", f"expected {API_VERSION!r}, got {api!r}")
    name = top.opt_str("name")
    resource_version = top.integer("resourceVersion", 0)
    phase = top.opt_str("phase")
    mesh = top.raw.get("mesh", False)
    if not isinstance(mesh, bool):
        raise ClusterSpecError("mesh", f"must be true or false, got {mesh!r}")

    network = _parse_network(top.raw.get("network"))
    nodes = _parse_nodes(top, network)
    namespaces = _parse_namespaces(top)
    ns_names = {ns.name for ns in namespaces}
    accounts = _parse_service_accounts(top, ns_names)
    pods = _parse_pods(top, nodes, ns_names, accounts)
    services = _parse_services(top, ns_names, network)
    policies = tuple(
        _parse_policy(raw, f"authorizationPolicies[{i}]")
        for i, raw in enumerate(top.items("authorizationPolicies"))
    )
    waypoints = tuple(
        _parse_waypoint(raw, f"waypoints[{i}]", ns_names)
        for i, raw in enumerate(top.items("waypoints"))
    )
    resources = tuple(
        _parse_resource(raw, f"resources[{i}]") for i, raw in enumerate(top.items("resources"))
    )
    _unique(
        ["/".join(resource_key(r)) for r in resources],
        "resources",
        "resource (kind/namespace/name)",
    )
    return Cluster(
        name=name,
        network=network,
        nodes=nodes,
        namespaces=namespaces,
        service_accounts=accounts,
        pods=pods,
        services=services,
        policies=policies,
        waypoints=waypoints,
        resources=resources,
        resource_version=resource_version,
        phase=phase,
        mesh=mesh,
    )


def parse_policy(raw: object) -> Mapping[str, Any]:
    """Check the envelope of an AuthorizationPolicy object; meshd checks its spec."""
    return _parse_policy(raw, "")


def _parse_policy(raw: object, path: str) -> Mapping[str, Any]:
    r = _Reader(raw, path, {"apiVersion", "kind", "metadata", "spec"})
    if r.raw.get("kind") != "AuthorizationPolicy":
        raise ClusterSpecError(r.at("kind"), "must be AuthorizationPolicy")
    api = r.raw.get("apiVersion", "security.istio.io/v1")
    if api not in ("security.istio.io/v1", "security.istio.io/v1beta1"):
        raise ClusterSpecError(r.at("apiVersion"), f"{api!r} is not security.istio.io/v1")
    meta = _Reader(
        r.raw.get("metadata"), r.at("metadata"), {"name", "namespace", "labels", "annotations"}
    )
    _name(meta, "name")
    if meta.raw.get("namespace") is not None:
        _name(meta, "namespace", "label")
    spec = r.raw.get("spec", {})
    if spec is not None and not isinstance(spec, Mapping):
        raise ClusterSpecError(r.at("spec"), "must be a mapping")
    return MappingProxyType(dict(r.raw))


def parse_resource(raw: object) -> Mapping[str, Any]:
    """Check the envelope of a Gateway API or Istio object; meshd checks its spec."""
    return _parse_resource(raw, "")


def _parse_resource(raw: object, path: str) -> Mapping[str, Any]:
    r = _Reader(raw, path, {"apiVersion", "kind", "metadata", "spec", "status", "data"})
    kind = r.text("kind")
    if kind != "ConfigMap" and r.raw.get("data") is not None:
        raise ClusterSpecError(r.at("data"), f"a {kind} has no data (only a ConfigMap has)")
    groups = RESOURCE_KINDS.get(kind)
    if groups is None:
        raise ClusterSpecError(
            r.at("kind"), f"{kind!r} is not kept here (kinds: {', '.join(RESOURCE_KINDS)})"
        )
    api = r.text("apiVersion")
    if api.split("/", 1)[0] not in groups:
        raise ClusterSpecError(r.at("apiVersion"), f"{api!r} is not a {kind} API version")
    meta = _Reader(
        r.raw.get("metadata"),
        r.at("metadata"),
        {
            "name",
            "namespace",
            "labels",
            "annotations",
            "creationTimestamp",
            "generation",
            "resourceVersion",
            "uid",
        },
    )
    _name(meta, "name")
    if meta.raw.get("namespace") is not None:
        _name(meta, "namespace", "label")
    parse_labels(meta.raw.get("labels"), meta.at("labels"))
    for key in ("spec", "status", "data"):
        value = r.raw.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise ClusterSpecError(r.at(key), "must be a mapping")
    if kind == "ConfigMap":
        for k, v in (r.raw.get("data") or {}).items():
            if not isinstance(v, str):
                raise ClusterSpecError(r.at(f"data.{k}"), "must be a string")
    return MappingProxyType(dict(r.raw))


def _parse_waypoint(raw: object, path: str, ns_names: set[str]) -> Mapping[str, Any]:
    r = _Reader(raw, path, {"name", "namespace", "address"})
    ns = r.text("namespace", DEFAULT_NAMESPACE)
    if ns not in ns_names:
        raise ClusterSpecError(r.at("namespace"), _unknown_namespace(ns, ns_names))
    return MappingProxyType(
        {"name": _name(r, "name"), "namespace": ns, "address": str(r.address("address") or "")}
    )


def _parse_network(raw: object) -> Network:
    if raw is None:
        return Network()
    r = _Reader(raw, "network", {"underlay", "podCIDR", "serviceCIDR", "bridge", "gateway"})
    underlay = r.network("underlay", None)
    pod_cidr = r.network("podCIDR", DEFAULT_POD_CIDR)
    service_cidr = r.network("serviceCIDR", DEFAULT_SERVICE_CIDR)
    assert pod_cidr is not None and service_cidr is not None
    if pod_cidr.prefixlen > 16:
        raise ClusterSpecError(
            "network.podCIDR",
            f"{pod_cidr} is too small: each node takes a /24, use a /16 or larger",
        )
    if underlay is not None and underlay.prefixlen > 28:
        raise ClusterSpecError(
            "network.underlay", f"{underlay} is too small for a bridge and nodes"
        )
    for a_name, a, b_name, b in (
        ("podCIDR", pod_cidr, "serviceCIDR", service_cidr),
        ("underlay", underlay, "podCIDR", pod_cidr),
        ("underlay", underlay, "serviceCIDR", service_cidr),
    ):
        if a is not None and b is not None and a.overlaps(b):
            raise ClusterSpecError(f"network.{a_name}", f"{a} overlaps {b_name} {b}")
    return Network(
        underlay=underlay,
        pod_cidr=pod_cidr,
        service_cidr=service_cidr,
        bridge=r.opt_str("bridge"),
        gateway=r.address("gateway"),
    )


def _capture(r: _Reader) -> str:
    capture = r.text("capture", CAPTURE_BACKENDS[0])
    if capture not in CAPTURE_BACKENDS:
        raise ClusterSpecError(
            r.at("capture"), f"{capture!r} is not a capture backend ({', '.join(CAPTURE_BACKENDS)})"
        )
    return capture


def _parse_nodes(top: _Reader, network: Network) -> tuple[Node, ...]:
    raw_nodes = top.items("nodes")
    if not raw_nodes:
        raise ClusterSpecError("nodes", "at least one node is required")
    subnets = list(network.pod_cidr.subnets(new_prefix=24))
    if len(raw_nodes) > min(len(subnets), 200):
        raise ClusterSpecError("nodes", f"at most {min(len(subnets), 200)} nodes are supported")
    nodes: list[Node] = []
    for i, raw in enumerate(raw_nodes):
        r = _Reader(raw, f"nodes[{i}]", {"name", "podCIDR", "ip", "netns", "capture"})
        pod_cidr = r.network("podCIDR", subnets[i])
        assert pod_cidr is not None
        if not pod_cidr.subnet_of(network.pod_cidr):
            raise ClusterSpecError(r.at("podCIDR"), f"{pod_cidr} is not inside {network.pod_cidr}")
        nodes.append(
            Node(
                name=_name(r, "name"),
                pod_cidr=pod_cidr,
                ip=r.address("ip"),
                netns=r.opt_str("netns"),
                capture=_capture(r),
            )
        )
    _unique([n.name for n in nodes], "nodes", "node")
    _unique([str(n.pod_cidr) for n in nodes], "nodes", "pod CIDR")
    return tuple(nodes)


def _parse_namespaces(top: _Reader) -> tuple[Namespace, ...]:
    namespaces: list[Namespace] = []
    for i, raw in enumerate(top.items("namespaces")):
        r = _Reader(raw, f"namespaces[{i}]", {"name", "labels"})
        namespaces.append(
            Namespace(
                name=_name(r, "name", "label"),
                labels=_frozen(parse_labels(r.raw.get("labels"), r.at("labels"))),
            )
        )
    _unique([ns.name for ns in namespaces], "namespaces", "namespace")
    if DEFAULT_NAMESPACE not in {ns.name for ns in namespaces}:
        namespaces.insert(0, Namespace(name=DEFAULT_NAMESPACE))
    return tuple(namespaces)


def _parse_service_accounts(top: _Reader, ns_names: set[str]) -> tuple[ServiceAccount, ...]:
    accounts: list[ServiceAccount] = []
    for i, raw in enumerate(top.items("serviceAccounts")):
        r = _Reader(raw, f"serviceAccounts[{i}]", {"name", "namespace"})
        ns = r.text("namespace", DEFAULT_NAMESPACE)
        if ns not in ns_names:
            raise ClusterSpecError(r.at("namespace"), _unknown_namespace(ns, ns_names))
        accounts.append(ServiceAccount(namespace=ns, name=_name(r, "name")))
    _unique([f"{sa.namespace}/{sa.name}" for sa in accounts], "serviceAccounts", "service account")
    declared = {(sa.namespace, sa.name) for sa in accounts}
    for ns in sorted(ns_names):
        if (ns, DEFAULT_SERVICE_ACCOUNT) not in declared:
            accounts.append(ServiceAccount(namespace=ns, name=DEFAULT_SERVICE_ACCOUNT))
    return tuple(accounts)


def _unknown_namespace(ns: str, known: set[str]) -> str:
    return f"namespace {ns!r} is not declared under namespaces: (known: {', '.join(sorted(known))})"


def _parse_command(raw: object, path: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        try:
            return tuple(shlex.split(raw))
        except ValueError as e:
            raise ClusterSpecError(path, f"cannot split the command line: {e}") from e
    if isinstance(raw, list) and all(isinstance(a, str | int | float) for a in raw):
        return tuple(str(a) for a in raw)
    raise ClusterSpecError(path, "must be a command line string or a list of arguments")


def _parse_pods(
    top: _Reader,
    nodes: tuple[Node, ...],
    ns_names: set[str],
    accounts: tuple[ServiceAccount, ...],
) -> tuple[Pod, ...]:
    node_names = [n.name for n in nodes]
    account_keys = {(sa.namespace, sa.name) for sa in accounts}
    pods: list[Pod] = []
    allowed = {
        "name",
        "namespace",
        "node",
        "serviceAccount",
        "labels",
        "command",
        "ip",
        "netns",
        "containerID",
        "pid",
    }
    for i, raw in enumerate(top.items("pods")):
        r = _Reader(raw, f"pods[{i}]", allowed)
        ns = r.text("namespace", DEFAULT_NAMESPACE)
        if ns not in ns_names:
            raise ClusterSpecError(r.at("namespace"), _unknown_namespace(ns, ns_names))
        node = r.text("node", node_names[i % len(node_names)])
        if node not in node_names:
            raise ClusterSpecError(
                r.at("node"), f"node {node!r} is not defined (nodes: {', '.join(node_names)})"
            )
        sa = r.text("serviceAccount", DEFAULT_SERVICE_ACCOUNT)
        if (ns, sa) not in account_keys:
            raise ClusterSpecError(
                r.at("serviceAccount"),
                f"service account {sa!r} is not declared in namespace {ns!r} "
                "(add it under serviceAccounts:)",
            )
        pid = r.raw.get("pid")
        pods.append(
            Pod(
                name=_name(r, "name"),
                namespace=ns,
                node=node,
                service_account=sa,
                labels=_frozen(parse_labels(r.raw.get("labels"), r.at("labels"))),
                command=_parse_command(r.raw.get("command"), r.at("command")),
                ip=r.address("ip"),
                netns=r.opt_str("netns"),
                container_id=r.opt_str("containerID"),
                pid=None if pid is None else r.integer("pid"),
            )
        )
    _unique([p.key for p in pods], "pods", "pod")
    return tuple(pods)


def _parse_ports(r: _Reader) -> tuple[ServicePort, ...]:
    raw_ports = r.items("ports")
    if not raw_ports:
        raise ClusterSpecError(r.at("ports"), "a service needs at least one port")
    ports: list[ServicePort] = []
    for j, raw in enumerate(raw_ports):
        pr = _Reader(
            raw, f"{r.at('ports')}[{j}]", {"name", "port", "targetPort", "protocol", "appProtocol"}
        )
        port = pr.integer("port")
        if isinstance(pr.raw.get("targetPort"), str):
            raise ClusterSpecError(
                pr.at("targetPort"), "named target ports are not supported: give the number"
            )
        target = pr.integer("targetPort", port)
        for key, value in (("port", port), ("targetPort", target)):
            if not 1 <= value <= 65535:
                raise ClusterSpecError(pr.at(key), f"{value} is not a port number (1-65535)")
        protocol = pr.text("protocol", "TCP").upper()
        if protocol not in ("TCP", "UDP"):
            raise ClusterSpecError(pr.at("protocol"), f"must be TCP or UDP, got {protocol!r}")
        name = pr.text("name", "")
        if name and not is_dns_label(name):
            raise ClusterSpecError(pr.at("name"), f"{name!r} is not a valid port name")
        ports.append(
            ServicePort(
                port=port,
                target_port=target,
                name=name,
                protocol=protocol,
                app_protocol=pr.text("appProtocol", ""),
            )
        )
    if len(ports) > 1 and any(not p.name for p in ports):
        raise ClusterSpecError(r.at("ports"), "every port needs a name when a service has several")
    _unique([f"{p.port}/{p.protocol}" for p in ports], r.at("ports"), "port")
    _unique([p.name for p in ports if p.name], r.at("ports"), "port name")
    return tuple(ports)


def _one_of(r: _Reader, key: str, allowed: Sequence[str]) -> str | None:
    """An optional enumerated string, spelled exactly as Kubernetes spells it."""
    value = r.opt_str(key)
    if value is not None and value not in allowed:
        raise ClusterSpecError(
            r.at(key), f"{value!r} is not supported; supported values: {', '.join(allowed)}"
        )
    return value


_SERVICE_KEYS = {
    "name",
    "namespace",
    "vip",
    "ports",
    "selector",
    "trafficDistribution",
    "internalTrafficPolicy",
    "labels",
}


def _parse_services(top: _Reader, ns_names: set[str], network: Network) -> tuple[Service, ...]:
    readers = [
        _Reader(raw, f"services[{i}]", _SERVICE_KEYS) for i, raw in enumerate(top.items("services"))
    ]
    return _parse_services_from(readers, ns_names, network)


def _parse_services_from(
    readers: list[_Reader], ns_names: set[str], network: Network
) -> tuple[Service, ...]:
    taken = {r.address("vip") for r in readers} - {None}
    auto = (
        network.service_cidr.network_address + offset
        for offset in range(_FIRST_AUTO_VIP_OFFSET, network.service_cidr.num_addresses - 1)
    )
    services: list[Service] = []
    seen_vips: set[IPv4Address] = set()
    for r in readers:
        ns = r.text("namespace", DEFAULT_NAMESPACE)
        if ns not in ns_names:
            raise ClusterSpecError(r.at("namespace"), _unknown_namespace(ns, ns_names))
        vip = r.address("vip")
        if vip is None:
            vip = next(a for a in auto if a not in taken)
        elif vip not in network.service_cidr:
            raise ClusterSpecError(
                r.at("vip"), f"{vip} is outside the service CIDR {network.service_cidr}"
            )
        if vip in seen_vips:
            raise ClusterSpecError(r.at("vip"), f"{vip} is already used by another service")
        seen_vips.add(vip)
        services.append(
            Service(
                name=_name(r, "name", "label"),
                namespace=ns,
                vip=ipaddress.IPv4Address(vip),
                ports=_parse_ports(r),
                selector=_frozen(parse_labels(r.raw.get("selector"), r.at("selector"))),
                traffic_distribution=_one_of(r, "trafficDistribution", TRAFFIC_DISTRIBUTIONS),
                internal_traffic_policy=_one_of(
                    r, "internalTrafficPolicy", INTERNAL_TRAFFIC_POLICIES
                ),
                labels=_frozen(parse_labels(r.raw.get("labels"), r.at("labels"))),
            )
        )
    _unique([f"{s.namespace}/{s.name}" for s in services], "services", "service")
    return tuple(services)


def service_from_kubernetes(raw: object, network: Network, taken: set[IPv4Address]) -> Service:
    """A Kubernetes ``v1`` Service object as a cluster service (``meshlab apply``).

    ``spec.clusterIP`` is kept when given (inside the service CIDR), else the
    next free address is taken, as the API server allocates one.
    """
    r = _Reader(raw, "", {"apiVersion", "kind", "metadata", "spec", "status"})
    if r.raw.get("kind") != "Service" or r.raw.get("apiVersion", "v1") != "v1":
        raise ClusterSpecError("kind", "must be a v1 Service")
    meta = _Reader(
        r.raw.get("metadata"),
        "metadata",
        {
            "name",
            "namespace",
            "labels",
            "annotations",
            "creationTimestamp",
            "uid",
            "resourceVersion",
        },
    )
    spec = _Reader(
        r.raw.get("spec"),
        "spec",
        {
            "ports",
            "selector",
            "clusterIP",
            "clusterIPs",
            "type",
            "trafficDistribution",
            "internalTrafficPolicy",
            "sessionAffinity",
            "ipFamilies",
            "ipFamilyPolicy",
        },
    )
    kind = spec.text("type", "ClusterIP")
    if kind != "ClusterIP":
        raise ClusterSpecError("spec.type", f"{kind!r} is not supported here (ClusterIP)")
    doc: dict[str, Any] = {
        "name": meta.raw.get("name"),
        "namespace": meta.raw.get("namespace") or DEFAULT_NAMESPACE,
        "ports": spec.raw.get("ports"),
        "selector": spec.raw.get("selector") or {},
        "labels": meta.raw.get("labels") or {},
    }
    vip = spec.address("clusterIP") if spec.raw.get("clusterIP") not in (None, "None") else None
    if vip is None:
        vip = next(
            (
                network.service_cidr.network_address + offset
                for offset in range(_FIRST_AUTO_VIP_OFFSET, network.service_cidr.num_addresses - 1)
                if network.service_cidr.network_address + offset not in taken
            ),
            None,
        )
        if vip is None:
            raise ClusterSpecError("spec.clusterIP", "no free address left in the service CIDR")
    doc["vip"] = str(vip)
    for key in ("trafficDistribution", "internalTrafficPolicy"):
        if spec.raw.get(key) is not None:
            doc[key] = spec.raw[key]
    reader = _Reader(doc, "", _SERVICE_KEYS)
    (service,) = _parse_services_from([reader], {doc["namespace"]}, network)
    return service
