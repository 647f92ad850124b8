"""Each waypoint's share of the world: the services it serves, their routes, the clusters.

``build(state)`` is the specification, a pure function:

* a waypoint serves the services bound to it (:mod:`controlplane.l7.binding`);
* each port of such a service gets its rules (:class:`~controlplane.l7.ir.PortRoutes`,
  :mod:`controlplane.l7.port_routes`): those of the HTTPRoutes and GRPCRoutes of
  the service's namespace that name the service (and that port, or no port) as
  a parent (:mod:`controlplane.l7.route_attachment`), ordered as the Gateway
  API and Istio order them; a port no route attaches to forwards everything to
  the service (Istio's default route, with its default retries); a TCP port
  relays bytes to the service;
* every service port (and subset) the rules send to becomes a cluster, with
  the pods behind it as endpoints (over HBONE when they are in the mesh;
  :mod:`controlplane.l7.clusters`);
* a waypoint for ``workload`` (or ``all``) traffic also serves the pods bound
  to it (:class:`~controlplane.l7.workloads.WorkloadSpec`): what a client sends
  to such a pod's own IP, on any port, reaches it through the waypoint;
* the AuthorizationPolicies that target the waypoint (its Gateway, or the
  GatewayClass ``istio-waypoint`` from the root namespace) apply to all its
  chains, those that target a Service to that service's chains
  (:mod:`controlplane.l7.authz`); each says where it is bound;
* the RequestAuthentications bound the same way become each HTTP chain's JWT
  rules (:mod:`controlplane.l7.request_authn`), in the order istiod gathers
  them: those of the waypoint's namespace, then the root namespace's, then the
  service's namespace's, each oldest first; each says where it is bound;
* the EnvoyFilters bound the same way (Istio's local rate limit recipe only,
  :mod:`controlplane.l7.envoy_filter`) become each HTTP chain's
  ``local_ratelimit`` filter and its routes' per-route limits (the oldest
  inserting the filter wins a chain; the others say so);
* routes, Gateways and their references get Gateway API status conditions,
  and what cannot be used is said once in ``rejected``.

The share's values are in :mod:`controlplane.l7.share`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, TypeVar

from controlplane.l7 import (
    authz,
    envoy_filter,
    istio_api,
    mesh_config,
    request_authn,
    telemetry_api,
)
from controlplane.l7.binding import bind
from controlplane.l7.clusters import Endpoints, clusters_for
from controlplane.l7.ir import DEFAULT_POLICY
from controlplane.l7.ir import Protocol as L7Protocol
from controlplane.l7.port_routes import ports_of
from controlplane.l7.route_attachment import attach, parse_routes
from controlplane.l7.share import ClusterSpec, ServiceSpec, WaypointShare, service_key
from controlplane.l7.status import Condition, ObjectStatus, Out
from controlplane.l7.workloads import bound_pods, workload_spec
from controlplane.state import ServiceInfo, SourceState, WaypointInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class L7Result:
    shares: Mapping[str, WaypointShare] = field(default_factory=lambda: MappingProxyType({}))
    statuses: tuple[ObjectStatus, ...] = ()
    rejected: tuple[str, ...] = ()


def build(state: SourceState) -> L7Result:
    namespaces = {ns.name: ns.labels for ns in state.namespaces}
    waypoints = {(w.namespace, w.name): w for w in state.waypoints}
    services = {service_key(s.namespace, s.name): s for s in state.services}
    out = Out()

    routes = parse_routes(state.l7, out)
    policies, virtual_services = istio_api.parse_all(state.l7, services, out.reject, out.status)
    authorizations = authz.parse_all(state.l7, state.root_namespace)
    out.status.extend(authz.unreadable(state.l7, state.root_namespace))
    bound_to: dict[str, list[str]] = {p.key: [] for p in authorizations}
    authentications, refused = request_authn.parse_all(state.l7, state.root_namespace, state.jwks)
    out.status.extend(refused)
    authn_bound_to: dict[str, list[str]] = {a.key: [] for a in authentications}
    limits, refused_limits = envoy_filter.parse_all(state.l7, state.root_namespace)
    out.status.extend(refused_limits)
    limit_bound: dict[str, list[str]] = {f.key: [] for f in limits}
    mesh = _mesh_config(state, out)
    telemetries, refused_telemetry = telemetry_api.parse_all(state.l7, state.root_namespace, mesh)
    out.status.extend(refused_telemetry)
    telemetry_bound: dict[str, list[str]] = {t.key: [] for t in telemetries}
    limit_shadowed: dict[str, list[str]] = {f.key: [] for f in limits}

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
    attached = attach(routes, services, out)
    ported = ports_of(services, attached, virtual_services, out)
    endpoints = Endpoints(state, namespaces)

    shares: dict[str, WaypointShare] = {}
    for waypoint in state.waypoints:
        out.status.append(
            _gateway_status(waypoint, bool(bound.get(waypoint.key)), bool(pods.get(waypoint.key)))
        )
        if waypoint.problem:
            out.reject(f"Gateway {waypoint.key}: {waypoint.problem}")
            continue
        specs: list[ServiceSpec] = []
        own = _targeting(authorizations, waypoint, None)
        for p in own:
            bound_to[p.key].append(f"waypoint {waypoint.key}")
        own_authn = _targeting(authentications, waypoint, None)
        for a in own_authn:
            authn_bound_to[a.key].append(f"waypoint {waypoint.key}")
        own_limits = _targeting(limits, waypoint, None)
        own_levels = telemetry_api.levels(telemetries, waypoint, state.root_namespace, None)
        for t in own_levels:
            telemetry_bound[t.key].append(f"waypoint {waypoint.key}")
        for info in sorted(bound.get(waypoint.key, ()), key=lambda s: (s.namespace, s.name)):
            key = service_key(info.namespace, info.name)
            theirs = _targeting(authorizations, waypoint, info)
            for p in theirs:
                if p not in own:
                    bound_to[p.key].append(f"service {info.namespace}/{info.name}")
            their_authn = _targeting(authentications, waypoint, info)
            for a in their_authn:
                if a not in own_authn:
                    authn_bound_to[a.key].append(f"service {info.namespace}/{info.name}")
            in_force = _one_filter(_targeting(limits, waypoint, info))
            for f in _targeting(limits, waypoint, info):
                where = (
                    f"waypoint {waypoint.key}"
                    if f in own_limits
                    else f"service {info.namespace}/{info.name}"
                )
                said = limit_bound if f in in_force else limit_shadowed
                if where not in said[f.key]:
                    said[f.key].append(where)
            in_force_telemetry = telemetry_api.levels(
                telemetries, waypoint, state.root_namespace, (info.namespace, info.name)
            )
            for t in in_force_telemetry:
                if t not in own_levels:
                    telemetry_bound[t.key].append(f"service {info.namespace}/{info.name}")
            specs.append(
                ServiceSpec(
                    key=key,
                    name=info.name,
                    namespace=info.namespace,
                    hostname=key.split("/", 1)[1],
                    vips=tuple(ip for ip in info.cluster_ips if ip and ip != "None"),
                    ports=tuple(ported[key]),
                    policies=tuple(theirs),
                    authentications=_istio_order(
                        their_authn, waypoint.namespace, state.root_namespace
                    ),
                    ratelimits=in_force,
                    telemetry=telemetry_api.resolve(in_force_telemetry, mesh),
                )
            )
        clusters = clusters_for(
            [pr for spec in specs for pr in spec.ports], services, ported, policies, endpoints, out
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
        zipkin: dict[str, ClusterSpec] = {}
        collectors = _collectors(specs, services, endpoints, zipkin)
        for provider, cluster in collectors.items():
            if not cluster:
                out.reject(
                    f"zipkin provider {provider}: its service is not a Service meshd knows: "
                    "no spans are sent (Envoy's zipkin tracer posts to a cluster)"
                )
        clusters = {**clusters, **zipkin}
        shares[waypoint.key] = WaypointShare(
            waypoint=waypoint,
            trust_domain=state.trust_domain,
            services=tuple(specs),
            clusters=MappingProxyType(clusters),
            workloads=tuple(workloads),
            workload_policies=tuple(own),
            collectors=MappingProxyType(collectors),
        )
    for p in authorizations:
        out.status.append(authz.status_of(p, bound_to[p.key]))
    for a in authentications:
        out.status.append(request_authn.status_of(a, authn_bound_to[a.key]))
    for f in limits:
        out.status.append(envoy_filter.status_of(f, limit_bound[f.key], limit_shadowed[f.key]))
    for t in telemetries:
        out.status.append(telemetry_api.status_of(t, telemetry_bound[t.key]))
    return L7Result(
        shares=MappingProxyType(shares),
        statuses=tuple(sorted(out.status, key=lambda s: s.key)),
        rejected=tuple(sorted(set(out.rejected))),
    )


class _Targeted(Protocol):
    @property
    def targets(self) -> tuple[authz.Target, ...]: ...


_P = TypeVar("_P", bound=_Targeted)


def _targeting(
    policies: Sequence[_P], waypoint: WaypointInfo, service: ServiceInfo | None
) -> list[_P]:
    """The policies in force on the waypoint's chains (``service`` None) or on a service's."""
    out = []
    for p in policies:
        for t in p.targets:
            if t.kind == "GatewayClass" or (
                t.kind == "Gateway" and (t.namespace, t.name) == (waypoint.namespace, waypoint.name)
            ):
                out.append(p)
                break
            if (
                service is not None
                and t.kind == "Service"
                and (t.namespace, t.name) == (service.namespace, service.name)
            ):
                out.append(p)
                break
    return out


def _one_filter(
    limits: Sequence[envoy_filter.WaypointRateLimit],
) -> tuple[envoy_filter.WaypointRateLimit, ...]:
    """The EnvoyFilters in force on a chain: the oldest that inserts the local rate limit
    filter (the waypoint runs one), and every one that only patches routes."""
    out, inserted = [], False
    for f in limits:
        if f.config is not None:
            if inserted:
                continue
            inserted = True
        out.append(f)
    return tuple(out)


def _istio_order(
    authentications: Sequence[request_authn.WaypointAuthentication],
    waypoint_namespace: str,
    root_namespace: str,
) -> tuple[request_authn.WaypointAuthentication, ...]:
    """istiod's order (``getConfigsForWorkload``): the waypoint's namespace, the root
    namespace, then the service's; within each, creation time then name (the input's)."""

    def rank(a: request_authn.WaypointAuthentication) -> int:
        if a.namespace == waypoint_namespace:
            return 0
        return 1 if a.namespace == root_namespace else 2

    return tuple(sorted(authentications, key=rank))


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


MESH_CONFIG_MAP = "istio"  # istiod's ConfigMap (in the root namespace), key ``mesh``


def _mesh_config(state: SourceState, out: Out) -> mesh_config.MeshConfig:
    """meshd's --mesh-config file, else the root namespace's ``istio`` ConfigMap, else Istio's
    defaults; what cannot be read of it is said once in ``rejected``."""
    if state.mesh_config is not None:
        mesh = mesh_config.parse(state.mesh_config, "--mesh-config")
    else:
        cm = next(
            (
                o
                for o in state.l7
                if o.kind == "ConfigMap"
                and (o.namespace, o.name) == (state.root_namespace, MESH_CONFIG_MAP)
            ),
            None,
        )
        if cm is None:
            return mesh_config.DEFAULT
        mesh = mesh_config.from_config_map(cm.raw, f"ConfigMap {cm.namespace}/{cm.name}")
    for problem in mesh.problems:
        out.reject(problem)
    return mesh


def key_host(info: ServiceInfo) -> str:
    return service_key(info.namespace, info.name).split("/", 1)[1]


def _collectors(
    specs: Sequence[ServiceSpec],
    services: Mapping[str, ServiceInfo],
    endpoints: Endpoints,
    zipkin: dict[str, ClusterSpec],
) -> dict[str, str]:
    """Each tracing provider's collector as a gRPC target: the ready pods of the Service it
    names (``ipv4:IP:PORT,...``), or its host by DNS when meshd does not know it; for a
    zipkin provider the name of the cluster added to ``zipkin`` ("" when the Service is
    not known: no tracer then, and a line in ``rejected``)."""
    out: dict[str, str] = {}
    for spec in specs:
        tracing = spec.telemetry.tracing
        if tracing is None or tracing.provider.name in out:
            continue
        p = tracing.provider
        host = p.service.rstrip(".")
        info = next(
            (
                s
                for key, s in services.items()
                if host in (key.split("/", 1)[1], f"{s.name}.{s.namespace}")
            ),
            None,
        )
        target = f"dns:///{host}:{p.port}"
        if p.kind == "zipkin":
            # Envoy's zipkin tracer posts to a cluster: istiod's outbound cluster of the
            # collector's Service (its pods, as any cluster's endpoints).
            if info is None:
                out[p.name] = ""
                continue
            name = f"outbound|{p.port}||{key_host(info)}"
            zipkin[name] = ClusterSpec(
                name=name,
                service=service_key(info.namespace, info.name),
                hostname=key_host(info),
                port=p.port,
                subset="",
                protocol=L7Protocol.HTTP,
                policy=DEFAULT_POLICY,
                endpoints=endpoints.of(info, p.port, {}),
            )
            out[p.name] = name
            continue
        if info is not None:
            ready = [e for e in endpoints.of(info, p.port, {}) if e.healthy]
            if ready:
                scheme = "ipv6" if ":" in ready[0].ip else "ipv4"
                addrs = ",".join(
                    f"[{e.ip}]:{e.port}" if ":" in e.ip else f"{e.ip}:{e.port}" for e in ready
                )
                target = f"{scheme}:{addrs}"
        out[p.name] = target
    return out
