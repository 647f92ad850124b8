"""HTTPRoutes and GRPCRoutes attached to the services they name as parents (GAMMA).

A route attaches to a Service parent of its own namespace (consumer routes
are not applied by waypoints), on the port it names (or all of them) unless
that port is declared TCP; a Gateway parent is an ingress controller's
business, not ours. Each Service parent hears whether the route is accepted
there and whether its backends resolve; a route that failed validation tells
every Service parent it names why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controlplane.l7 import gateway_api
from controlplane.l7.binding import CLUSTER_DOMAIN
from controlplane.l7.gateway_api import BackendSpec, ParentRef, RouteSpec
from controlplane.l7.ir import Protocol
from controlplane.l7.protocol import declared_protocol_of
from controlplane.l7.reader import InvalidObject
from controlplane.l7.share import service_key
from controlplane.l7.status import (
    ObjectStatus,
    Out,
    ParentStatus,
    accepted,
    not_accepted,
    not_resolved,
    resolved,
)
from controlplane.state import L7Object, ServiceInfo

CORE_GROUP = ""


def parse_routes(objects: Iterable[L7Object], out: Out) -> list[RouteSpec]:
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
class Attachment:
    route: RouteSpec
    parent: ParentRef


def attach(
    routes: list[RouteSpec], services: Mapping[str, ServiceInfo], out: Out
) -> dict[str, list[Attachment]]:
    """Routes by the service they name as a parent; and each route's parent status."""
    by_service: dict[str, list[Attachment]] = {}
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
                by_service.setdefault(key, []).append(Attachment(route, parent))
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


def _backend_problems(
    route: RouteSpec, services: Mapping[str, ServiceInfo]
) -> list[tuple[str, str]]:
    problems = []
    for rule in route.rules:
        refs = [*rule.backends, *(m.backend for m in rule.mirrors)]
        for b in refs:
            problem = backend_problem(b, services)
            if problem:
                problems.append(problem)
    return problems


def backend_problem(b: BackendSpec, services: Mapping[str, ServiceInfo]) -> tuple[str, str] | None:
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
