"""Each waypoint's share of the world: the services it serves, their routes, the clusters.

``build(state)`` is the specification, a pure function:

* a waypoint serves the services bound to it (:mod:`controlplane.l7.binding`);
* each port of such a service gets its rules (:class:`~controlplane.l7.ir.PortRoutes`):
  those of the HTTPRoutes and GRPCRoutes of the service's namespace that name
  the service (and that port, or no port) as a parent, ordered as the Gateway
  API and Istio order them; a port no route attaches to forwards everything to
  the service (Istio's default route, with its default retries); a TCP port
  relays bytes to the service;
* every service port (and subset) the rules send to becomes a cluster, with
  the pods behind it as endpoints (over HBONE when they are in the mesh);
* a waypoint for ``workload`` (or ``all``) traffic also serves the pods bound
  to it (:class:`WorkloadSpec`): what a client sends to such a pod's own IP,
  on any port, reaches it through the waypoint;
* routes, Gateways and their references get Gateway API status conditions,
  and what cannot be used is said once in ``rejected``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from controlplane.l7 import gateway_api, istio_api
from controlplane.l7.binding import CLUSTER_DOMAIN, bind
from controlplane.l7.gateway_api import BackendSpec, ParentRef, RouteSpec, RuleSpec
from controlplane.l7.ir import (
    DEFAULT_POLICY,
    DEFAULT_RETRY,
    BackendRef,
    Mirror,
    PathKind,
    PathMatch,
    PortRoutes,
    Protocol,
    RequestMatch,
    Retry,
    Rule,
    TrafficPolicy,
)
from controlplane.l7.protocol import declared_protocol
from controlplane.l7.reader import InvalidObject
from controlplane.l7.status import (
    Condition,
    ObjectStatus,
    ParentStatus,
    accepted,
    not_accepted,
    not_resolved,
    resolved,
)
from controlplane.l7.workloads import WorkloadSpec, bound_pods, workload_spec
from controlplane.state import (
    L7Object,
    PodInfo,
    ServiceInfo,
    SourceState,
    WaypointInfo,
)
from mesh.ambient import in_ambient

CORE_GROUP = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSpec:
    ip: str
    port: int  # the pod's port (the service port's targetPort)
    healthy: bool
    hbone: bool  # the pod is in the mesh: reached over HBONE to ip:15008
    identity: str  # its SPIFFE ID
    pod: str
    namespace: str
    canonical_name: str = ""
    canonical_revision: str = ""
    node: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSpec:
    name: str
    service: str  # namespace/hostname
    hostname: str
    port: int
    subset: str
    protocol: Protocol
    policy: TrafficPolicy
    endpoints: tuple[EndpointSpec, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    key: str  # namespace/hostname
    name: str
    namespace: str
    hostname: str
    vips: tuple[str, ...]
    ports: tuple[PortRoutes, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointShare:
    waypoint: WaypointInfo
    trust_domain: str
    services: tuple[ServiceSpec, ...]
    clusters: Mapping[str, ClusterSpec]
    workloads: tuple[WorkloadSpec, ...] = ()

    @property
    def key(self) -> str:
        return self.waypoint.key


@dataclass(frozen=True, slots=True, kw_only=True)
class L7Result:
    shares: Mapping[str, WaypointShare] = field(default_factory=lambda: MappingProxyType({}))
    statuses: tuple[ObjectStatus, ...] = ()
    rejected: tuple[str, ...] = ()


def service_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}.{namespace}.{CLUSTER_DOMAIN}"


def cluster_name(hostname: str, port: int, protocol: Protocol, subset: str = "") -> str:
    """Istio's waypoint cluster names: ``inbound-vip|<port>|http[/<subset>]|<host>``."""
    kind = "tcp" if protocol is Protocol.TCP else "http"
    return f"inbound-vip|{port}|{kind}{'/' + subset if subset else ''}|{hostname}"


# ------------------------------------------------------------------ the whole thing


def build(state: SourceState) -> L7Result:
    namespaces = {ns.name: ns.labels for ns in state.namespaces}
    waypoints = {(w.namespace, w.name): w for w in state.waypoints}
    services = {service_key(s.namespace, s.name): s for s in state.services}
    out = _Out()

    routes = _parse_routes(state.l7, out)
    policies, virtual_services = istio_api.parse_all(state.l7, services, out.reject, out.status)

    bound: dict[str, list[ServiceInfo]] = {}
    for key, info in services.items():
        binding = bind(
            kind="service",
            what=f"service {key}",
            namespace=info.namespace,
            object_labels=info.labels,
            namespace_labels=namespaces.get(info.namespace, {}),
            waypoints=waypoints,
            all_namespaces=namespaces,
        )
        if binding is not None and binding.waypoint is not None and binding.usable:
            bound.setdefault(binding.key, []).append(info)

    pods = bound_pods(state, namespaces, waypoints)
    attached = _attach(routes, services, out)
    ported = _ports_of(services, attached, virtual_services, out)
    endpoints = _Endpoints(state, namespaces)

    shares: dict[str, WaypointShare] = {}
    for waypoint in state.waypoints:
        out.status.append(
            _gateway_status(waypoint, bool(bound.get(waypoint.key)), bool(pods.get(waypoint.key)))
        )
        if waypoint.problem:
            out.reject(f"Gateway {waypoint.key}: {waypoint.problem}")
            continue
        specs: list[ServiceSpec] = []
        wanted: dict[str, tuple[str, int, str, Protocol]] = {}
        for info in sorted(bound.get(waypoint.key, ()), key=lambda s: (s.namespace, s.name)):
            key = service_key(info.namespace, info.name)
            port_routes = tuple(ported[key])
            specs.append(
                ServiceSpec(
                    key=key,
                    name=info.name,
                    namespace=info.namespace,
                    hostname=key.split("/", 1)[1],
                    vips=tuple(ip for ip in info.cluster_ips if ip and ip != "None"),
                    ports=port_routes,
                )
            )
            for pr in port_routes:
                for backend, http in _backends(pr):
                    if backend.problem:
                        continue
                    target = services[backend.service]
                    protocol = _port_protocol(target, backend.port, ported)
                    if http and not protocol.is_http:
                        # An HTTP route's backend is spoken to in HTTP, whatever the port
                        # says of itself (an unnamed port with no route of its own is TCP).
                        protocol = Protocol.HTTP
                    elif not http:
                        protocol = Protocol.TCP
                    name = cluster_name(
                        backend.service.split("/", 1)[1], backend.port, protocol, backend.subset
                    )
                    wanted[name] = (backend.service, backend.port, backend.subset, protocol)
        clusters = {}
        for name, (skey, port, subset, protocol) in sorted(wanted.items()):
            target = services[skey]
            policy = policies.get(skey)
            labels = {}
            if subset:
                chosen = policy.subset(subset) if policy is not None else None
                if chosen is None:
                    # Not built: the routes' share for it is answered by Envoy (503, NC).
                    out.reject(
                        f"service {skey}: no DestinationRule subset {subset!r}; "
                        "requests routed to it fail"
                    )
                    continue
                labels = dict(chosen.labels)
            clusters[name] = ClusterSpec(
                name=name,
                service=skey,
                hostname=skey.split("/", 1)[1],
                port=port,
                subset=subset,
                protocol=protocol,
                policy=policy.for_port(port, subset) if policy is not None else DEFAULT_POLICY,
                endpoints=endpoints.of(target, port, labels),
            )
        vips = {vip for spec in specs for vip in spec.vips}
        workloads = []
        for pod in pods.get(waypoint.key, ()):
            if pod.ip in vips:
                # Its chains would clash with the service's (Envoy refuses the listener).
                out.reject(
                    f"pod {pod.namespace}/{pod.name}: IP {pod.ip} is also a service VIP "
                    f"of waypoint {waypoint.key}; traffic to it as a workload is refused"
                )
                continue
            workloads.append(workload_spec(state, pod, namespaces))
        shares[waypoint.key] = WaypointShare(
            waypoint=waypoint,
            trust_domain=state.trust_domain,
            services=tuple(specs),
            clusters=MappingProxyType(clusters),
            workloads=tuple(workloads),
        )
    return L7Result(
        shares=MappingProxyType(shares),
        statuses=tuple(sorted(out.status, key=lambda s: s.key)),
        rejected=tuple(sorted(set(out.rejected))),
    )


class _Out:
    def __init__(self) -> None:
        self.status: list[ObjectStatus] = []
        self.rejected: list[str] = []

    def reject(self, line: str) -> None:
        self.rejected.append(line)


def _backends(pr: PortRoutes) -> Iterable[tuple[BackendRef, bool]]:
    """Every backend the port sends to, and whether it is sent HTTP (False: TCP)."""
    for b in pr.tcp_backends:
        yield b, False
    for rule in pr.rules:
        for b in rule.backends:
            yield b, True
        for m in rule.mirrors:
            yield m.backend, True


def _port_protocol(
    info: ServiceInfo, port: int, ported: Mapping[str, list[PortRoutes]]
) -> Protocol:
    for pr in ported.get(service_key(info.namespace, info.name), ()):
        if pr.port == port:
            return pr.protocol
    for p in info.ports:
        if p.port == port:
            return declared_protocol(p) or Protocol.TCP
    return Protocol.HTTP


def _gateway_status(waypoint: WaypointInfo, services: bool, workloads: bool) -> ObjectStatus:
    if waypoint.problem:
        conditions: tuple[Condition, ...] = (
            Condition(type="Accepted", status=False, reason="Invalid", message=waypoint.problem),
            Condition(type="Programmed", status=False, reason="Invalid", message=waypoint.problem),
        )
    elif not waypoint.address:
        conditions = (
            Condition(type="Accepted", status=True, reason="Accepted"),
            Condition(
                type="Programmed",
                status=False,
                reason="AddressNotAssigned",
                message="the waypoint's instance has no address yet",
            ),
        )
    else:
        conditions = (
            Condition(type="Accepted", status=True, reason="Accepted"),
            Condition(
                type="Programmed",
                status=True,
                reason="Programmed",
                message="serving " + _serving(services, workloads),
            ),
        )
    return ObjectStatus(
        kind="Gateway",
        namespace=waypoint.namespace,
        name=waypoint.name,
        generation=waypoint.generation,
        conditions=conditions,
        addresses=(waypoint.address,) if waypoint.address else (),
    )


def _serving(services: bool, workloads: bool) -> str:
    if services and workloads:
        return "its bound services and workloads"
    if workloads:
        return "its bound workloads"
    return "its bound services" if services else "no service yet"


# ------------------------------------------------------------------ routes


def _parse_routes(objects: Iterable[L7Object], out: _Out) -> list[RouteSpec]:
    routes = []
    for obj in objects:
        if obj.kind not in ("HTTPRoute", "GRPCRoute"):
            continue
        try:
            spec = (
                gateway_api.parse_http_route(obj.raw)
                if obj.kind == "HTTPRoute"
                else gateway_api.parse_grpc_route(obj.raw)
            )
        except InvalidObject as e:
            out.reject(str(e))
            out.status.append(_invalid_route_status(obj, str(e.reason), e.path))
            continue
        routes.append(spec)
    # Precedence ties go to the oldest route, then by namespace/name.
    routes.sort(key=lambda r: (r.created, r.namespace, r.name))
    return routes


def _invalid_route_status(obj: L7Object, reason: str, path: str) -> ObjectStatus:
    """A route that failed validation: every Service parent it names hears why."""
    parents = []
    spec = obj.raw.get("spec") or {}
    for raw in spec.get("parentRefs") or [] if isinstance(spec, Mapping) else []:
        if isinstance(raw, Mapping) and raw.get("kind") == "Service" and raw.get("name"):
            ref = ParentRef(
                group=str(raw.get("group") or CORE_GROUP),
                kind="Service",
                namespace=str(raw.get("namespace") or obj.namespace),
                name=str(raw["name"]),
                port=raw.get("port") if isinstance(raw.get("port"), int) else None,
            )
            parents.append(
                ParentStatus(
                    parent=ref,
                    conditions=(not_accepted("UnsupportedValue", f"{path}: {reason}"),),
                )
            )
    meta = obj.raw.get("metadata") or {}
    return ObjectStatus(
        kind=obj.kind,
        namespace=obj.namespace,
        name=obj.name,
        generation=int(meta.get("generation") or 0) if isinstance(meta, Mapping) else 0,
        parents=tuple(parents),
    )


@dataclass(slots=True)
class _Attachment:
    route: RouteSpec
    parent: ParentRef


def _attach(
    routes: list[RouteSpec], services: Mapping[str, ServiceInfo], out: _Out
) -> dict[str, list[_Attachment]]:
    """Routes by the service they name as a parent; and each route's parent status."""
    by_service: dict[str, list[_Attachment]] = {}
    for route in routes:
        parents: list[ParentStatus] = []
        for parent in route.parents:
            if parent.kind != "Service" or parent.group != CORE_GROUP:
                continue  # a Gateway parent: an ingress controller's business, not ours
            key = service_key(parent.namespace, parent.name)
            info = services.get(key)
            if info is None:
                condition = not_accepted(
                    "NoMatchingParent", f"parent service {parent.namespace}/{parent.name} not found"
                )
            elif parent.namespace != route.namespace:
                condition = not_accepted(
                    "NotAllowedByParent",
                    f"consumer routes (a route in namespace {route.namespace} for a service of "
                    f"{parent.namespace}) are not applied by waypoints; put the route in "
                    f"{parent.namespace}",
                )
            elif parent.port is not None and not any(p.port == parent.port for p in info.ports):
                condition = not_accepted(
                    "NoMatchingParent", f"service {key} has no port {parent.port}"
                )
            elif declared_protocol_of(info, parent.port) is Protocol.TCP:
                condition = not_accepted(
                    "UnsupportedValue",
                    f"port {parent.port if parent.port is not None else '(all)'} of service "
                    f"{key} is declared TCP (appProtocol or port name): {route.kind}s do not "
                    "apply to it",
                )
            else:
                condition = accepted()
                by_service.setdefault(key, []).append(_Attachment(route, parent))
            problems = _backend_problems(route, services) if condition.status else []
            refs = (
                not_resolved(problems[0][0], "; ".join(p[1] for p in problems))
                if problems
                else resolved()
            )
            parents.append(ParentStatus(parent=parent, conditions=(condition, refs)))
        if parents:
            out.status.append(
                ObjectStatus(
                    kind=route.kind,
                    namespace=route.namespace,
                    name=route.name,
                    generation=route.generation,
                    parents=tuple(parents),
                )
            )
            for p in parents:
                for c in p.conditions:
                    if not c.status:
                        out.reject(f"{route.kind} {route.key} (parent {p.parent}): {c.message}")
    return by_service


def declared_protocol_of(info: ServiceInfo, port: int | None) -> Protocol | None:
    """The declared protocol of a port, or for all ports: TCP only if every port is TCP."""
    ports = [p for p in info.ports if port is None or p.port == port]
    found = [declared_protocol(p) for p in ports]
    if found and all(f is Protocol.TCP for f in found):
        return Protocol.TCP
    return None


def _backend_problems(
    route: RouteSpec, services: Mapping[str, ServiceInfo]
) -> list[tuple[str, str]]:
    problems = []
    for rule in route.rules:
        refs = [*rule.backends, *(m.backend for m in rule.mirrors)]
        for b in refs:
            problem = _backend_problem(b, services)
            if problem:
                problems.append(problem)
    return problems


def _backend_problem(b: BackendSpec, services: Mapping[str, ServiceInfo]) -> tuple[str, str] | None:
    if b.kind != "Service" or b.group != CORE_GROUP:
        return (
            "InvalidKind",
            f"referencing unsupported backendRef: group {b.group!r} kind {b.kind!r}",
        )
    info = services.get(service_key(b.namespace, b.name))
    if info is None:
        return (
            "BackendNotFound",
            f"backend({b.name}.{b.namespace}.{CLUSTER_DOMAIN}) not found",
        )
    if not any(p.port == b.port for p in info.ports):
        return ("BackendNotFound", f"service {b.namespace}/{b.name} has no port {b.port}")
    return None


def _ports_of(
    services: Mapping[str, ServiceInfo],
    attached: Mapping[str, list[_Attachment]],
    virtual_services: Mapping[str, istio_api.VirtualServiceRoutes],
    out: _Out,
) -> dict[str, list[PortRoutes]]:
    result: dict[str, list[PortRoutes]] = {}
    for key, info in services.items():
        hostname = key.split("/", 1)[1]
        ports = []
        vs = virtual_services.get(key)
        routes = attached.get(key, ())
        if routes and vs is not None:
            # Decided for the whole service, whichever ports the routes name.
            out.reject(
                f"VirtualService {vs.origin}: service {key} also has "
                f"{routes[0].route.kind} {routes[0].route.key}; mixing the two APIs for one "
                "service is not supported: the VirtualService is not applied"
            )
            vs = None
        for port in info.ports:
            if port.protocol != "TCP":
                continue
            here = [a for a in routes if a.parent.port in (None, port.port)]
            vs_rules = vs.rules_for(port.port) if vs is not None and vs.http else ()
            protocol = declared_protocol(port)
            if protocol is None:
                grpc = any(a.route.kind == "GRPCRoute" for a in here)
                protocol = (
                    (Protocol.HTTP2 if grpc else Protocol.HTTP)
                    if here or vs_rules
                    else Protocol.TCP
                )
            if protocol is Protocol.TCP:
                ports.append(
                    PortRoutes(
                        service=key,
                        port=port.port,
                        protocol=protocol,
                        rules=(),
                        tcp_backends=(BackendRef(service=key, port=port.port),),
                    )
                )
                continue
            rules: tuple[Rule, ...] = ()
            source = "default"
            if here:
                rules = _rules(here, hostname, port.port, services)
                kinds = {a.route.kind for a in here}
                source = "GRPCRoute" if kinds == {"GRPCRoute"} else "HTTPRoute"
            elif vs_rules:
                rules = vs_rules
                source = "VirtualService"
            if not rules:
                # No route (or none for this port): Istio's default route to the service.
                rules = (_default_rule(key, hostname, port.port, protocol),)
            ports.append(
                PortRoutes(
                    service=key, port=port.port, protocol=protocol, rules=rules, source=source
                )
            )
        result[key] = ports
    return result


def _default_rule(key: str, hostname: str, port: int, protocol: Protocol) -> Rule:
    return Rule(
        name="default",
        origin=f"default route of {key}:{port}",
        matches=(RequestMatch(path=PathMatch(kind=PathKind.PREFIX, value="/")),),
        backends=(BackendRef(service=key, port=port),),
        timeout_s=0.0,
        retry=DEFAULT_RETRY,
        operation=f"{hostname}:{port}/*",
    )


# ------------------------------------------------------------------ rules


@dataclass(frozen=True, slots=True)
class _Entry:
    route: RouteSpec
    rule: RuleSpec
    match: RequestMatch
    has_match: bool


def _uri_rank(m: RequestMatch) -> tuple[int, int]:
    """Istio's ordering key for a match's path: Exact > Prefix > Regex, then longer first."""
    if m.path is None:
        return (-1, 0)
    rank = {
        PathKind.EXACT: 3,
        PathKind.PREFIX: 2,
        PathKind.SEGMENT_PREFIX: 2,
        PathKind.REGEX: 1,
    }[m.path.kind]
    value = m.path.value
    if m.path.kind is PathKind.SEGMENT_PREFIX and value != "/":
        value = value.rstrip("/")
    return (rank, len(value))


def _order(entries: list[_Entry]) -> list[_Entry]:
    """A stable sort: entries without a match last; then path rank and length, method,
    header count, query count, all descending. Ties keep route age, name, rule order."""

    def key(e: _Entry) -> tuple[int, int, int, int, int, int]:
        if not e.has_match:
            return (1, 0, 0, 0, 0, 0)
        rank, length = _uri_rank(e.match)
        m = e.match
        return (0, -rank, -length, 0 if m.method else 1, -len(m.headers), -len(m.query))

    return sorted(entries, key=key)


def _rules(
    attachments: list[_Attachment],
    hostname: str,
    port: int,
    services: Mapping[str, ServiceInfo],
) -> tuple[Rule, ...]:
    entries = []
    for a in attachments:  # already oldest route first
        for rule in a.route.rules:
            for match in rule.matches:
                entries.append(_Entry(a.route, rule, match, rule.has_matches))
    rules = []
    for e in _order(entries):
        rules.append(_to_rule(e, hostname, port, services))
        if _catch_all(e.match):
            break  # nothing after a catch-all can match
    return tuple(rules)


def _catch_all(m: RequestMatch) -> bool:
    return (
        m.path is not None
        and (
            (m.path.kind in (PathKind.PREFIX, PathKind.SEGMENT_PREFIX) and m.path.value == "/")
            or (m.path.kind is PathKind.REGEX and m.path.value == ".*")
        )
        and not m.headers
        and not m.query
        and not m.method
    )


def _to_backend(b: BackendSpec, services: Mapping[str, ServiceInfo]) -> BackendRef:
    problem = _backend_problem(b, services)
    kind_ok = b.kind == "Service" and b.group == CORE_GROUP
    return BackendRef(
        # Not a Service: no service at all (Istio's "UnknownService"), so that a
        # ServiceImport named like a Service never reaches that Service.
        service=service_key(b.namespace, b.name) if kind_ok else "",
        port=b.port or 0,
        weight=b.weight,
        problem=problem[1] if problem else "",
    )


_HTTPROUTE_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled"


def _to_rule(e: _Entry, hostname: str, port: int, services: Mapping[str, ServiceInfo]) -> Rule:
    route, spec = e.route, e.rule
    name = spec.name or f"{route.namespace}.{route.name}.{spec.index}"
    origin = f"{route.kind} {route.key} rule {spec.index}" + (
        f" ({spec.name})" if spec.name else ""
    )
    base = Rule(
        name=name,
        origin=origin,
        matches=(e.match,),
        request_headers=spec.request_headers,
        response_headers=spec.response_headers,
        rewrite=spec.rewrite,
        mirrors=tuple(
            Mirror(backend=_to_backend(m.backend, services), percent=m.percent)
            for m in spec.mirrors
            if m.percent > 0
        ),
        operation=f"{hostname}:{port}/*",
    )
    if spec.redirect is not None:
        return replace(base, redirect=spec.redirect, retry=None)
    backends = tuple(_to_backend(b, services) for b in spec.backends if b.weight > 0)
    if not backends:
        return replace(base, direct_status=500, retry=None)
    timeout = spec.timeout_s
    retry: Retry | None = DEFAULT_RETRY
    if spec.retry is not None:
        attempts = 2 if spec.retry.attempts is None else spec.retry.attempts
        retry = (
            None
            if attempts <= 0
            else Retry(
                attempts=attempts,
                # Istio's conversion: these four, and retriable-status-codes only with codes.
                retry_on=_HTTPROUTE_RETRY_ON
                + (",retriable-status-codes" if spec.retry.codes else ""),
                codes=spec.retry.codes,
                backoff_base_s=spec.retry.backoff_s,
                per_try_timeout_s=spec.backend_timeout_s,
            )
        )
    elif spec.backend_timeout_s:
        timeout = spec.backend_timeout_s  # Istio: without a retry stanza it is the route's
    return replace(base, backends=backends, timeout_s=timeout or 0.0, retry=retry)


# ------------------------------------------------------------------ endpoints


class _Endpoints:
    def __init__(self, state: SourceState, namespaces: Mapping[str, Mapping[str, str]]) -> None:
        self.state = state
        self.namespaces = namespaces
        self.slices: dict[str, set[str]] = {}
        for s in state.endpoint_slices:
            self.slices.setdefault(service_key(s.namespace, s.service), set()).update(s.addresses)
        self.pods_by_ns: dict[str, list[PodInfo]] = {}
        for pod in state.pods:
            if pod.ip:
                self.pods_by_ns.setdefault(pod.namespace, []).append(pod)

    def of(
        self, info: ServiceInfo, port: int, subset_labels: Mapping[str, str]
    ) -> tuple[EndpointSpec, ...]:
        target = next((p.target_port for p in info.ports if p.port == port), port)
        key = service_key(info.namespace, info.name)
        found = []
        for pod in self.pods_by_ns.get(info.namespace, ()):
            if info.selector:
                if not all(pod.labels.get(k) == v for k, v in info.selector.items()):
                    continue
            elif pod.ip not in self.slices.get(key, ()):
                continue
            if not all(pod.labels.get(k) == v for k, v in subset_labels.items()):
                continue
            labels = pod.labels
            found.append(
                EndpointSpec(
                    ip=str(pod.ip),
                    port=target,
                    healthy=pod.ready,
                    hbone=in_ambient(labels, self.namespaces.get(pod.namespace, {})),
                    identity=(
                        f"spiffe://{self.state.trust_domain}/ns/{pod.namespace}"
                        f"/sa/{pod.service_account}"
                    ),
                    pod=pod.name,
                    namespace=pod.namespace,
                    canonical_name=labels.get("service.istio.io/canonical-name")
                    or labels.get("app")
                    or pod.name,
                    canonical_revision=labels.get("service.istio.io/canonical-revision")
                    or labels.get("version")
                    or "latest",
                    node=pod.node,
                )
            )
        return tuple(sorted(found, key=lambda e: tuple(int(x) for x in re.findall(r"\d+", e.ip))))
