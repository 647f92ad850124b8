"""Each service port's rules (:class:`~controlplane.l7.ir.PortRoutes`), as Istio orders them.

A port the routes attached to gets their rules, ordered as the Gateway API
and Istio order them (path rank and length, method, headers, query; then
route age), nothing kept after a catch-all; a port with a VirtualService
(and no route) its rules; any other HTTP port Istio's default route to the
service, with its default retries; a TCP port relays bytes to the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from controlplane.l7.gateway_api import BackendSpec, RouteSpec, RuleSpec
from controlplane.l7.ir import (
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
)
from controlplane.l7.protocol import declared_protocol
from controlplane.l7.route_attachment import CORE_GROUP, Attachment, backend_problem
from controlplane.l7.share import service_key
from controlplane.l7.status import Out
from controlplane.l7.virtual_service import VirtualServiceRoutes
from controlplane.state import ServiceInfo


def ports_of(
    services: Mapping[str, ServiceInfo],
    attached: Mapping[str, list[Attachment]],
    virtual_services: Mapping[str, VirtualServiceRoutes],
    out: Out,
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
    attachments: list[Attachment],
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
    problem = backend_problem(b, services)
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
