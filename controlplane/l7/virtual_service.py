"""Istio's VirtualService as users write it, with Istio's semantics.

A VirtualService applies to a service of its own namespace (named in
``hosts``, short or fully qualified) unless its ``gateways`` leave out
``mesh``; its ``http`` routes become :class:`~controlplane.l7.ir.Rule` values
in the order written (VirtualServices for one host are merged, oldest first,
by :func:`controlplane.l7.istio_api.parse_all`). What a waypoint does not do
(TCP/TLS routes, delegation, CORS, matches on the client, ...) is refused
with the field's path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from controlplane.l7.gateway_api import check_regex
from controlplane.l7.ir import (
    DEFAULT_RETRY,
    BackendRef,
    Fault,
    HeaderMatch,
    HeaderOps,
    Mirror,
    PathKind,
    PathMatch,
    QueryMatch,
    Redirect,
    RequestMatch,
    Retry,
    Rewrite,
    Rule,
    StringKind,
    StringMatch,
)
from controlplane.l7.istio_object import check_api, created_of, generation_of, resolve_host
from controlplane.l7.reader import Reader, go_duration, object_name
from controlplane.state import ServiceInfo

# RFC 7230 token characters (a leading ":" for pseudo-headers such as :authority).
_HEADER_NAME = re.compile(r"^:?[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_REDIRECT_CODES = (301, 302, 303, 307, 308)
# Istio's retryOn conditions: Envoy's, plus gRPC ones and bare status codes.
_RETRY_ON = {
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualServiceRoutes:
    """The http routes of the VirtualServices for one service, merged."""

    service: str
    origin: str  # "ns/name[, ns/name...]"
    rules: tuple[Rule, ...] = ()
    http: bool = False

    def rules_for(self, port: int) -> tuple[Rule, ...]:
        """The rules for requests on ``port``; a destination without a port (of a
        service with several) takes this one, as Istio does."""

        def settle(b: BackendRef) -> BackendRef:
            return replace(b, port=port) if b.port == 0 and not b.problem else b

        return tuple(
            replace(
                r,
                backends=tuple(settle(b) for b in r.backends),
                mirrors=tuple(replace(m, backend=settle(m.backend)) for m in r.mirrors),
            )
            for r in self.rules
            if r.port in (None, port)
        )


@dataclass(frozen=True, slots=True)
class ParsedVirtualService:
    """One VirtualService read: the services it applies to and its rules, in order."""

    namespace: str
    name: str
    created: str
    generation: int
    services: tuple[str, ...]
    rules: tuple[Rule, ...]


def parse_virtual_service(
    obj: Mapping[str, Any], services: Mapping[str, ServiceInfo]
) -> ParsedVirtualService | None:
    """None: not for the mesh (its gateways leave out ``mesh``)."""
    namespace, name = object_name(obj, "VirtualService")
    full = f"{namespace}/{name}"
    top = Reader(obj, "VirtualService", full)
    check_api(top, "VirtualService")
    spec = top.child("spec").only(
        {"hosts", "gateways", "http", "exportTo"},
        {
            "tcp": "TCP routes in a VirtualService (use a TCP port; its traffic is relayed)",
            "tls": "TLS routes",
            "delegate": "delegation",
        },
    )
    gateways = spec.strings("gateways")
    if gateways and "mesh" not in gateways:
        return None
    hosts = spec.strings("hosts")
    if not hosts:
        raise spec.error("at least one host is required", "hosts")
    keys = []
    for i, host in enumerate(hosts):
        if "*" in host:
            raise spec.error(f"wildcard host {host!r} is not supported by waypoints", f"hosts[{i}]")
        key = resolve_host(host, namespace)
        if key.split("/", 1)[0] != namespace:
            raise spec.error(
                f"{host!r} is not a service of namespace {namespace}: a waypoint applies the "
                "VirtualServices of its services' own namespace",
                f"hosts[{i}]",
            )
        if key not in services:
            raise spec.error(f"no service {key.split('/', 1)[1]}", f"hosts[{i}]")
        keys.append(key)
    rules = tuple(
        _http_route(r, i, namespace, full, services) for i, r in enumerate(spec.children("http"))
    )
    return ParsedVirtualService(
        namespace=namespace,
        name=name,
        created=created_of(obj),
        generation=generation_of(obj),
        services=tuple(keys),
        rules=rules,
    )


_HTTP_ROUTE_FIELDS = {
    "name",
    "match",
    "route",
    "redirect",
    "directResponse",
    "rewrite",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirrorPercentage",
    "mirrorPercent",
    "mirrors",
    "headers",
}


def _http_route(
    r: Reader, index: int, namespace: str, full: str, services: Mapping[str, ServiceInfo]
) -> Rule:
    r.only(_HTTP_ROUTE_FIELDS, {"corsPolicy": "CORS", "delegate": "delegation"})
    matches = []
    ports = set()
    for m in r.children("match"):
        match, port = _match(m)
        matches.append(match)
        ports.add(port)
    if len(ports) > 1:
        raise r.error("all matches of one route must name the same port (or none)", "match")
    port = ports.pop() if ports else None
    actions = [k for k in ("route", "redirect", "directResponse") if r.has(k)]
    if len(actions) != 1:
        raise r.error("exactly one of route, redirect and directResponse is required")
    name = r.text("name", "") or f"{namespace}.{full.split('/', 1)[1]}.{index}"
    request, response = _headers(r.child("headers"))
    rule = Rule(
        name=name,
        origin=f"VirtualService {full} http[{index}]"
        + (f" ({r.raw.get('name')})" if r.raw.get("name") else ""),
        matches=tuple(matches) or (RequestMatch(),),
        request_headers=request,
        response_headers=response,
        timeout_s=go_duration(r, "timeout"),
        retry=_retries(r),
        fault=_fault(r.child("fault")) if r.has("fault") else None,
        mirrors=_mirrors(r, namespace, services),
        port=port,
    )
    if r.has("rewrite"):
        rw = r.child("rewrite").only({"uri", "authority", "uriRegexRewrite"})
        regex = None
        if rw.has("uriRegexRewrite"):
            rr = rw.child("uriRegexRewrite").only({"match", "rewrite"})
            check_regex(rr, "match", rr.text("match"))
            regex = (rr.text("match"), rr.text("rewrite"))
            if rw.has("uri"):
                raise rw.error("give uri or uriRegexRewrite, not both", "uriRegexRewrite")
        rule = _replace(
            rule,
            rewrite=Rewrite(host=rw.opt_text("authority"), prefix=rw.opt_text("uri"), regex=regex),
        )
    if r.has("redirect"):
        rd = r.child("redirect").only(
            {"uri", "authority", "port", "derivePort", "scheme", "redirectCode"}
        )
        code = rd.integer("redirectCode", 301)
        if code not in _REDIRECT_CODES:
            raise rd.error(f"{code} is not a redirect status {_REDIRECT_CODES}", "redirectCode")
        derive = rd.opt_text("derivePort")
        if derive is not None and derive not in ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"):
            raise rd.error(
                f"{derive!r} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT", "derivePort"
            )
        return _replace(
            rule,
            redirect=Redirect(
                scheme=rd.opt_text("scheme"),
                host=rd.opt_text("authority"),
                port=rd.opt_integer("port", low=1, high=65535),
                path=rd.opt_text("uri"),
                status=code,
                request_port=derive == "FROM_REQUEST_PORT",
                strip_port=derive == "FROM_PROTOCOL_DEFAULT",
            ),
            retry=None,
        )
    if r.has("directResponse"):
        dr = r.child("directResponse").only({"status", "body"})
        body = dr.child("body").only({"string"}, {"bytes": "binary bodies (use string)"})
        return _replace(
            rule,
            direct_status=dr.integer("status", low=200, high=599),
            direct_body=body.text("string", ""),
            retry=None,
        )
    backends = []
    for d in r.children("route"):
        d.only({"destination", "weight", "headers"})
        if d.has("headers"):
            raise d.error(
                "per-destination headers are not supported (set them on the route)", "headers"
            )
        backends.append(
            _destination(
                d.child("destination"),
                namespace,
                services,
                d.integer("weight", 0 if len(r.items("route")) > 1 else 100, low=0),
            )
        )
    if len(backends) == 1 and backends[0].weight == 0:
        backends[0] = _replace_backend(backends[0], 100)
    kept = tuple(b for b in backends if b.weight > 0)
    if not kept:
        raise r.error("every destination has weight 0", "route")
    return _replace(rule, backends=kept)


def _replace(rule: Rule, **changes: Any) -> Rule:
    return replace(rule, **changes)


def _replace_backend(b: BackendRef, weight: int) -> BackendRef:
    return replace(b, weight=weight)


def _destination(
    r: Reader, namespace: str, services: Mapping[str, ServiceInfo], weight: int
) -> BackendRef:
    r.only({"host", "subset", "port"})
    key = resolve_host(r.text("host"), namespace)
    info = services.get(key)
    port = r.child("port").only({"number"}).opt_integer("number", low=1, high=65535)
    problem = ""
    if info is None:
        problem = f"no service {key.split('/', 1)[1]}"
        port = port or 0
    elif port is None:
        # One port: that one; several: the request's own port (0, settled per service port).
        port = info.ports[0].port if len(info.ports) == 1 else 0
    elif not any(p.port == port for p in info.ports):
        problem = f"service {key} has no port {port}"
    return BackendRef(
        service=key, port=port, weight=weight, subset=r.text("subset", ""), problem=problem
    )


def _string_match(r: Reader, key: str) -> StringMatch:
    m = r.child(key).only({"exact", "prefix", "regex"})
    given = [k for k in ("exact", "prefix", "regex") if m.has(k)]
    if len(given) != 1:
        raise m.error("exactly one of exact, prefix and regex is required")
    kind = given[0]
    value = m.text(kind)
    if kind == "regex" and value != "*":  # "*": Istio's "present" (see _present)
        check_regex(m, "regex", value)
    return StringMatch(kind=StringKind(kind), value=value)


def _match(r: Reader) -> tuple[RequestMatch, int | None]:
    r.only(
        {
            "name",
            "uri",
            "scheme",
            "method",
            "authority",
            "headers",
            "port",
            "queryParams",
            "ignoreUriCase",
            "withoutHeaders",
            "sourceLabels",
            "sourceNamespace",
            "statPrefix",
            "gateways",
        },
    )
    path = None
    ignore_case = r.boolean("ignoreUriCase", False)
    if r.has("uri"):
        sm = _string_match(r, "uri")
        kind = {"exact": PathKind.EXACT, "prefix": PathKind.PREFIX, "regex": PathKind.REGEX}[
            sm.kind.value
        ]
        path = PathMatch(kind=kind, value=sm.value, ignore_case=ignore_case)
    headers: list[HeaderMatch] = []
    for where in ("headers", "withoutHeaders"):
        for key in r.child(where).raw:
            _check_header_name(r.child(where), key)
    for key in sorted(r.child("headers").raw, key=str.lower):
        sm = _string_match(r.child("headers"), key)
        headers.append(HeaderMatch(name=key.lower(), match=_present(sm)))
    for key in sorted(r.child("withoutHeaders").raw, key=str.lower):
        sm = _string_match(r.child("withoutHeaders"), key)
        present = _present(sm)
        # Istio: a missing header counts as "" (so it passes), except for a presence
        # match, where "" would count as present and a missing header would fail.
        headers.append(
            HeaderMatch(
                name=key.lower(), match=present, invert=True, missing_as_empty=present is not None
            )
        )
    method = None
    for field_name, header in (
        ("method", ":method"),
        ("authority", ":authority"),
        ("scheme", ":scheme"),
    ):
        if r.has(field_name):
            sm = _string_match(r, field_name)
            if field_name == "method" and sm.kind is StringKind.EXACT:
                method = sm.value
            else:
                headers.append(HeaderMatch(name=header, match=sm))
    query = [
        QueryMatch(name=key, match=_present(_string_match(r.child("queryParams"), key)))
        for key in sorted(r.child("queryParams").raw)
    ]
    # sourceLabels select the client: a waypoint does not apply such matches (Istio's rule).
    if r.has("sourceLabels") or r.has("sourceNamespace"):
        raise r.error(
            "matches on the client (sourceLabels, sourceNamespace) do not apply at a waypoint",
            "sourceLabels",
        )
    gateways = r.strings("gateways")
    if gateways and "mesh" not in gateways:
        raise r.error("a match for gateways other than mesh cannot apply at a waypoint", "gateways")
    port = r.opt_integer("port", low=1, high=65535)
    return RequestMatch(path=path, headers=tuple(headers), query=tuple(query), method=method), port


def _present(sm: StringMatch) -> StringMatch | None:
    """Istio: a regex of "*" means "present"."""
    return None if sm.kind is StringKind.REGEX and sm.value == "*" else sm


def _check_header_name(r: Reader, name: object, key: str | None = None) -> None:
    """A header name a request can carry: Envoy would take any other and never match it."""
    if isinstance(name, str) and name.startswith("@request.auth.claims"):
        raise r.error("not supported: matches on JWT claims", name)
    if not isinstance(name, str) or not _HEADER_NAME.match(name):
        raise r.error(f"{name!r} is not a valid header name", key or str(name))


def _header_ops(r: Reader) -> HeaderOps:
    r.only({"set", "add", "remove"})
    for key in ("set", "add"):
        for name in r.labels(key):
            _check_header_name(r.child(key), name)
    for i, name in enumerate(r.strings("remove")):
        _check_header_name(r, name, f"remove[{i}]")
    return HeaderOps(
        set=tuple(sorted((k.lower(), v) for k, v in r.labels("set").items())),
        add=tuple(sorted((k.lower(), v) for k, v in r.labels("add").items())),
        remove=tuple(n.lower() for n in r.strings("remove")),
    )


def _headers(r: Reader) -> tuple[HeaderOps, HeaderOps]:
    r.only({"request", "response"})
    return _header_ops(r.child("request")), _header_ops(r.child("response"))


def _retries(r: Reader) -> Retry | None:
    if not r.has("retries"):
        return DEFAULT_RETRY
    rr = r.child("retries").only(
        {
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "retryIgnorePreviousHosts",
        }
    )
    # Istio: retries without attempts (0, proto3's unset) disable retrying.
    attempts = rr.integer("attempts", 0, low=0)
    if attempts == 0:
        return None
    retry_on = DEFAULT_RETRY.retry_on
    codes: list[int] = []
    if rr.has("retryOn"):
        conditions = []
        for part in rr.text("retryOn").split(","):
            part = part.strip()
            if part.isdigit():
                codes.append(int(part))
            elif part in _RETRY_ON:
                conditions.append(part)
            elif part:
                raise rr.error(
                    f"{part!r} is not a retry condition ({', '.join(sorted(_RETRY_ON))})", "retryOn"
                )
        if codes and "retriable-status-codes" not in conditions:
            conditions.append("retriable-status-codes")
        retry_on = ",".join(conditions)
    return Retry(
        attempts=attempts,
        retry_on=retry_on,
        codes=tuple(codes),
        per_try_timeout_s=go_duration(rr, "perTryTimeout"),
        other_host=rr.boolean("retryIgnorePreviousHosts", True),
    )


def _percent(r: Reader, key: str) -> float:
    if not r.has(key):
        return 100.0
    return r.child(key).only({"value"}).number("value", low=0, high=100)


def _fault(r: Reader) -> Fault:
    r.only({"delay", "abort"})
    fault = Fault()
    if r.has("delay"):
        d = r.child("delay").only(
            {"fixedDelay", "percentage", "percent"}, {"exponentialDelay": "exponential delays"}
        )
        delay = go_duration(d, "fixedDelay")
        if delay is None:
            raise d.error("is required", "fixedDelay")
        pct = (
            float(d.integer("percent", low=0, high=100))
            if d.has("percent")
            else _percent(d, "percentage")
        )
        fault = Fault(delay_s=delay, delay_percent=pct)
    if r.has("abort"):
        a = r.child("abort").only(
            {"httpStatus", "grpcStatus", "percentage"}, {"http2Error": "HTTP/2 error aborts"}
        )
        status = a.opt_integer("httpStatus", low=200, high=599)
        grpc = a.opt_text("grpcStatus")
        if (status is None) == (grpc is None):
            raise a.error("exactly one of httpStatus and grpcStatus is required")
        fault = Fault(
            delay_s=fault.delay_s,
            delay_percent=fault.delay_percent,
            abort_status=status,
            abort_grpc_status=_GRPC_CODES.get(grpc or "") if grpc else None,
            abort_percent=_percent(a, "percentage"),
        )
        if grpc and fault.abort_grpc_status is None:
            raise a.error(f"{grpc!r} is not a gRPC status name", "grpcStatus")
    return fault


_GRPC_CODES = {
    name: i
    for i, name in enumerate(
        (
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        )
    )
}


def _mirrors(r: Reader, namespace: str, services: Mapping[str, ServiceInfo]) -> tuple[Mirror, ...]:
    out = []
    if r.has("mirror"):
        if r.has("mirrorPercentage"):
            pct = _percent(r, "mirrorPercentage")
        elif r.has("mirrorPercent"):
            pct = float(r.integer("mirrorPercent", low=0, high=100))
        else:
            pct = 100.0
        if pct > 0:
            out.append(
                Mirror(backend=_destination(r.child("mirror"), namespace, services, 1), percent=pct)
            )
    for m in r.children("mirrors"):
        m.only({"destination", "percentage"})
        pct = _percent(m, "percentage")
        if pct > 0:
            out.append(
                Mirror(
                    backend=_destination(m.child("destination"), namespace, services, 1),
                    percent=pct,
                )
            )
    return tuple(out)
