"""Gateway API objects as users write them: waypoint Gateways, HTTPRoutes and GRPCRoutes.

``parse_http_route`` and ``parse_grpc_route`` check an object as the API
server's CRD validation would, plus what we do not implement (refused with
the field's path, never ignored), and return a :class:`RouteSpec` whose
references are not resolved yet: which services exist is the business of
:mod:`controlplane.l7.bind`. ``parse_gateway`` reads a Gateway of class
``istio-waypoint`` into a :class:`~controlplane.state.WaypointInfo`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.l7.ir import (
    NO_HEADER_OPS,
    HeaderMatch,
    HeaderOps,
    PathKind,
    PathMatch,
    QueryMatch,
    Redirect,
    RequestMatch,
    Rewrite,
    StringKind,
    StringMatch,
)
from controlplane.l7.reader import InvalidObject, Reader, gep_duration, object_name
from controlplane.state import (
    WAYPOINT_CLASS,
    WAYPOINT_FOR,
    WAYPOINT_FOR_VALUES,
    WaypointInfo,
    WaypointListener,
    frozen_labels,
)

GATEWAY_GROUP = "gateway.networking.k8s.io"
_API_VERSIONS = (f"{GATEWAY_GROUP}/v1", f"{GATEWAY_GROUP}/v1beta1", f"{GATEWAY_GROUP}/v1alpha2")
# RFC 7230 token characters: what a header name may hold.
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_REDIRECT_CODES = (301, 302, 303, 307, 308)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParentRef:
    group: str
    kind: str
    namespace: str
    name: str
    port: int | None = None
    section: str | None = None

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.kind} {self.namespace}/{self.name}{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendSpec:
    group: str
    kind: str
    namespace: str
    name: str
    port: int | None
    weight: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorSpec:
    backend: BackendSpec
    percent: float = 100.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrySpec:
    attempts: int | None = None
    codes: tuple[int, ...] = ()
    backoff_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleSpec:
    index: int
    name: str
    matches: tuple[RequestMatch, ...]
    backends: tuple[BackendSpec, ...] = ()
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[MirrorSpec, ...] = ()
    timeout_s: float | None = None
    backend_timeout_s: float | None = None
    retry: RetrySpec | None = None
    # False: the rule has no matches (its one match is the API's default). Istio
    # orders such rules after every rule with a match, whatever their paths.
    has_matches: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteSpec:
    """An HTTPRoute or GRPCRoute, checked but not yet resolved against services."""

    kind: str
    namespace: str
    name: str
    parents: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[RuleSpec, ...]
    created: str = ""  # metadata.creationTimestamp (RFC 3339), for precedence
    generation: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _check_api(r: Reader, kind: str) -> None:
    if r.raw.get("kind") not in (None, kind):
        raise r.error(f"must be {kind}", "kind")
    api = r.raw.get("apiVersion", _API_VERSIONS[0])
    if api not in _API_VERSIONS:
        raise r.error(f"{api!r} is not one of {', '.join(_API_VERSIONS)}", "apiVersion")


def _meta(obj: Mapping[str, Any], kind: str) -> tuple[str, str, str, int]:
    namespace, name = object_name(obj, kind)
    meta = obj.get("metadata") or {}
    created = meta.get("creationTimestamp") or ""
    generation = meta.get("generation") or 0
    return namespace, name, str(created), int(generation) if isinstance(generation, int) else 0


# ---------------------------------------------------------------- Gateway


def is_waypoint(obj: Mapping[str, Any]) -> bool:
    spec = obj.get("spec") or {}
    return isinstance(spec, Mapping) and spec.get("gatewayClassName") == WAYPOINT_CLASS


def parse_gateway(obj: Mapping[str, Any]) -> WaypointInfo:
    """A Gateway of class istio-waypoint. A listener problem is recorded, not raised:
    the Gateway then exists but is not Accepted, and what binds to it fails closed."""
    namespace, name, created, generation = _meta(obj, "Gateway")
    top = Reader(obj, "Gateway", f"{namespace}/{name}")
    _check_api(top, "Gateway")
    meta = top.child("metadata")
    labels = meta.labels("labels")
    spec = top.child("spec").only(
        {"gatewayClassName", "listeners", "addresses", "infrastructure"},
        {"backendTLS": "TLS to backends", "allowedListeners": "listener sets"},
    )
    if spec.text("gatewayClassName") != WAYPOINT_CLASS:
        raise spec.error(f"not a waypoint (class {WAYPOINT_CLASS})", "gatewayClassName")
    listeners = []
    problem = ""
    for lr in spec.children("listeners", 64):
        lr.only({"name", "port", "protocol", "allowedRoutes", "hostname", "tls"})
        allowed = lr.child("allowedRoutes").only({"namespaces", "kinds"})
        ns = allowed.child("namespaces").only({"from", "selector"})
        origin = ns.one_of("from", ("Same", "All", "Selector"), "Same")
        selector = ns.child("selector").only(
            {"matchLabels"}, {"matchExpressions": "use matchLabels"}
        )
        listeners.append(
            WaypointListener(
                name=lr.text("name"),
                port=lr.integer("port", low=1, high=65535),
                protocol=lr.text("protocol"),
                allowed_from=origin,
                allowed_selector=frozen_labels(selector.labels("matchLabels")),
            )
        )
    if not any(ln.protocol == "HBONE" and ln.port == 15008 for ln in listeners):
        problem = (
            "a waypoint needs a listener with protocol HBONE on port 15008 "
            "(name: mesh, port: 15008, protocol: HBONE)"
        )
    waypoint_for = labels.get(WAYPOINT_FOR, "service")
    if waypoint_for not in WAYPOINT_FOR_VALUES:
        problem = problem or (
            f"label {WAYPOINT_FOR}={waypoint_for!r} is not one of {', '.join(WAYPOINT_FOR_VALUES)}"
        )
    address = None
    status = obj.get("status") or {}
    for entry in (status.get("addresses") or []) if isinstance(status, Mapping) else []:
        if isinstance(entry, Mapping) and entry.get("type", "IPAddress") == "IPAddress":
            address = str(entry.get("value") or "") or None
            break
    return WaypointInfo(
        name=name,
        namespace=namespace,
        address=address,
        waypoint_for=waypoint_for,
        listeners=tuple(listeners),
        problem=problem,
        labels=frozen_labels(labels),
        generation=generation,
        created=created,
    )


# ---------------------------------------------------------------- routes


def parse_http_route(obj: Mapping[str, Any]) -> RouteSpec:
    """One HTTPRoute (gateway.networking.k8s.io/v1)."""
    return _parse_route(obj, "HTTPRoute")


def parse_grpc_route(obj: Mapping[str, Any]) -> RouteSpec:
    """One GRPCRoute: its method matches become path matches, as Istio does."""
    return _parse_route(obj, "GRPCRoute")


def _parse_route(obj: Mapping[str, Any], kind: str) -> RouteSpec:
    namespace, name, created, generation = _meta(obj, kind)
    top = Reader(obj, kind, f"{namespace}/{name}")
    _check_api(top, kind)
    spec = top.child("spec").only({"parentRefs", "hostnames", "rules"})
    parents = tuple(_parent(p, namespace) for p in spec.children("parentRefs", 32))
    if not parents:
        raise spec.error("at least one parentRef is required (the Service it routes)", "parentRefs")
    hostnames = spec.strings("hostnames")
    for i, h in enumerate(hostnames):
        if not _HOSTNAME.match(h):
            raise spec.error(f"{h!r} is not a valid hostname", f"hostnames[{i}]")
    rules = tuple(_rule(r, i, kind, namespace) for i, r in enumerate(spec.children("rules", 16)))
    if not rules:
        # The API's default: one rule matching every request, with no backends.
        rules = (RuleSpec(index=0, name="", matches=(_default_match(kind),), has_matches=False),)
    names = [r.name for r in rules if r.name]
    if len(names) != len(set(names)):
        raise spec.error("rule names must be unique", "rules")
    return RouteSpec(
        kind=kind,
        namespace=namespace,
        name=name,
        parents=parents,
        hostnames=hostnames,
        rules=rules,
        created=created,
        generation=generation,
    )


def _default_match(kind: str) -> RequestMatch:
    if kind == "HTTPRoute":
        return RequestMatch(path=PathMatch(kind=PathKind.SEGMENT_PREFIX, value="/"))
    return RequestMatch()


def _parent(r: Reader, namespace: str) -> ParentRef:
    r.only({"group", "kind", "namespace", "name", "sectionName", "port"})
    return ParentRef(
        group=r.text("group", GATEWAY_GROUP),
        kind=r.text("kind", "Gateway"),
        namespace=r.text("namespace", namespace),
        name=r.text("name"),
        port=r.opt_integer("port", low=1, high=65535),
        section=r.opt_text("sectionName"),
    )


def _rule(r: Reader, index: int, kind: str, namespace: str) -> RuleSpec:
    r.only(
        {"name", "matches", "filters", "backendRefs", "timeouts", "retry"},
        {"sessionPersistence": "session persistence (use a DestinationRule consistentHash)"},
    )
    if kind == "GRPCRoute" and (r.has("timeouts") or r.has("retry")):
        raise r.error("GRPCRoute rules have no timeouts or retry", "timeouts")
    matches = tuple(
        _http_match(m) if kind == "HTTPRoute" else _grpc_match(m) for m in r.children("matches", 64)
    )
    has_matches = bool(matches)
    matches = matches or (_default_match(kind),)
    ops = _Filters(kind)
    for f in r.children("filters", 16):
        ops.read(f, namespace)
    backends = tuple(_backend(b, namespace) for b in r.children("backendRefs", 16))
    timeouts = r.child("timeouts").only({"request", "backendRequest"})
    timeout = gep_duration(timeouts, "request")
    backend_timeout = gep_duration(timeouts, "backendRequest")
    if timeout and backend_timeout and backend_timeout > timeout:
        raise timeouts.error("backendRequest must not be longer than request", "backendRequest")
    retry = None
    if r.has("retry"):
        rr = r.child("retry").only({"codes", "attempts", "backoff"})
        codes = []
        for i, c in enumerate(rr.items("codes")):
            if isinstance(c, bool) or not isinstance(c, int) or not 400 <= c <= 599:
                raise rr.error(f"{c!r} is not an HTTP status code 400-599", f"codes[{i}]")
            codes.append(c)
        retry = RetrySpec(
            attempts=rr.opt_integer("attempts", low=0),
            codes=tuple(codes),
            backoff_s=gep_duration(rr, "backoff"),
        )
    if ops.redirect is not None and backends:
        raise r.error("a rule with a RequestRedirect filter cannot have backendRefs", "backendRefs")
    for what, op in (("ReplacePrefixMatch", ops.redirect), ("ReplacePrefixMatch", ops.rewrite)):
        if op is not None and op.prefix is not None:
            if not has_matches:  # the CRD's rule: the prefix to replace must be written
                raise r.error(f"{what} needs a match with a PathPrefix path", "matches")
            for i, m in enumerate(matches):
                if m.path is None or m.path.kind is not PathKind.SEGMENT_PREFIX:
                    raise r.error(
                        f"{what} needs every match to have a PathPrefix path", f"matches[{i}]"
                    )
    return RuleSpec(
        index=index,
        name=r.text("name", ""),
        matches=matches,
        backends=backends,
        request_headers=ops.request,
        response_headers=ops.response,
        redirect=ops.redirect,
        rewrite=ops.rewrite,
        mirrors=tuple(ops.mirrors),
        timeout_s=timeout,
        backend_timeout_s=backend_timeout,
        retry=retry,
        has_matches=has_matches,
    )


def _string(r: Reader, what: str) -> StringMatch:
    kind = r.one_of("type", ("Exact", "RegularExpression"), "Exact")
    value = r.text("value")
    if kind == "RegularExpression":
        check_regex(r, "value", value)
        return StringMatch(kind=StringKind.REGEX, value=value)
    return StringMatch(kind=StringKind.EXACT, value=value)


def check_regex(r: Reader, key: str, pattern: str) -> None:
    """RE2 syntax, as Envoy compiles it; a pattern RE2 refuses is refused here, not by Envoy."""
    import re2  # google-re2: Envoy's regex engine

    try:
        re2.compile(pattern)
    except re2.error as e:
        raise r.error(f"{pattern!r} is not an RE2 regular expression: {e}", key) from e


def _header_name(r: Reader, key: str = "name") -> str:
    name = r.text(key)
    if not _HEADER_NAME.match(name):
        raise r.error(f"{name!r} is not a valid header name", key)
    return name.lower()


def _http_match(r: Reader) -> RequestMatch:
    r.only({"path", "headers", "queryParams", "method"})
    # The CRD's default: a match without a path matches the path prefix "/".
    path = PathMatch(kind=PathKind.SEGMENT_PREFIX, value="/")
    if r.has("path"):
        pr = r.child("path").only({"type", "value"})
        kind = pr.one_of("type", ("Exact", "PathPrefix", "RegularExpression"), "PathPrefix")
        value = pr.text("value", "/")
        if kind == "RegularExpression":
            check_regex(pr, "value", value)
            path = PathMatch(kind=PathKind.REGEX, value=value)
        else:
            if not value.startswith("/"):
                raise pr.error(f"{value!r} must start with '/'", "value")
            if any(
                bad in value for bad in ("//", "/./", "/../", "#", "%2f", "%2F")
            ) or value.endswith(("/..", "/.")):
                raise pr.error(f"{value!r} must be a normalised path", "value")
            path = PathMatch(
                kind=PathKind.EXACT if kind == "Exact" else PathKind.SEGMENT_PREFIX, value=value
            )
    headers = []
    seen: set[str] = set()
    for h in r.children("headers", 16):
        h.only({"type", "name", "value"})
        name = _header_name(h)
        if name in seen:  # the spec: only the first of equal names counts
            continue
        seen.add(name)
        headers.append(HeaderMatch(name=name, match=_string(h, "header")))
    query = []
    seen_q: set[str] = set()
    for q in r.children("queryParams", 16):
        q.only({"type", "name", "value"})
        name = q.text("name")
        if name in seen_q:
            continue
        seen_q.add(name)
        query.append(QueryMatch(name=name, match=_string(q, "query")))
    method = r.opt_text("method")
    if method is not None and method not in _METHODS:
        raise r.error(f"{method!r} is not one of {', '.join(_METHODS)}", "method")
    return RequestMatch(path=path, headers=tuple(headers), query=tuple(query), method=method)


_GRPC_NAME = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$")


def _grpc_match(r: Reader) -> RequestMatch:
    """Istio's conversion: service and method -> exact path ``/svc/method``; only
    service -> prefix ``/svc/``; only method -> regex ``/[^/]+/method``."""
    r.only({"method", "headers"})
    path = None
    if r.has("method"):
        mr = r.child("method").only({"type", "service", "method"})
        kind = mr.one_of("type", ("Exact", "RegularExpression"), "Exact")
        service = mr.opt_text("service")
        method = mr.opt_text("method")
        if service is None and method is None:
            raise mr.error("one of service and method is required")
        if kind == "Exact":
            for key, value in (("service", service), ("method", method)):
                if value is not None and not _GRPC_NAME.match(value):
                    raise mr.error(f"{value!r} is not a gRPC name", key)
            if service and method:
                path = PathMatch(kind=PathKind.EXACT, value=f"/{service}/{method}")
            elif service:
                path = PathMatch(kind=PathKind.SEGMENT_PREFIX, value=f"/{service}")
            else:
                path = PathMatch(kind=PathKind.REGEX, value=f"/[^/]+/{re.escape(method or '')}")
        else:
            for key, value in (("service", service), ("method", method)):
                if value is not None:
                    check_regex(mr, key, value)
            # Istio's forms (service only: "/<svc>/.+"), each pattern in a group of its
            # own: Istio pastes them bare, so "a|b" as a service would match "/a".
            svc = f"(?:{service})" if service is not None else "[^/]+"
            name = f"(?:{method})" if method is not None else ".+"
            path = PathMatch(kind=PathKind.REGEX, value=f"/{svc}/{name}")
    headers = []
    seen: set[str] = set()
    for h in r.children("headers", 16):
        h.only({"type", "name", "value"})
        name = _header_name(h)
        if name in seen:  # the spec: only the first of equal names counts
            continue
        seen.add(name)
        headers.append(HeaderMatch(name=name, match=_string(h, "header")))
    return RequestMatch(path=path, headers=tuple(headers))


def _backend(r: Reader, namespace: str, *, weighted: bool = True) -> BackendSpec:
    r.only(
        {"group", "kind", "namespace", "name", "port", "weight"},
        {"filters": "filters on a backendRef (put them on the rule)"},
    )
    kind = r.text("kind", "Service")
    group = r.text("group", "")
    port = r.opt_integer("port", low=1, high=65535)
    if kind == "Service" and group == "" and port is None:
        raise r.error("is required for a Service backend", "port")
    return BackendSpec(
        group=group,
        kind=kind,
        namespace=r.text("namespace", namespace),
        name=r.text("name"),
        port=port,
        weight=r.integer("weight", 1, low=0, high=1_000_000) if weighted else 1,
    )


# Each filter type's configuration field (URLRewrite's is "urlRewrite").
_FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
}


class _Filters:
    """A rule's filters, folded into the IR's operations (each type at most once)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.request = HeaderOps()
        self.response = HeaderOps()
        self.redirect: Redirect | None = None
        self.rewrite: Rewrite | None = None
        self.mirrors: list[MirrorSpec] = []
        self.seen: set[str] = set()

    def read(self, f: Reader, namespace: str) -> None:
        allowed = ["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror"]
        if self.kind == "HTTPRoute":
            allowed += ["RequestRedirect", "URLRewrite"]
        ftype = f.text("type")
        if ftype in ("ExtensionRef", "CORS", "ExternalAuth"):
            raise f.error(f"filter {ftype} is not supported by this waypoint", "type")
        if ftype not in allowed:
            raise f.error(f"{ftype!r} is not a {self.kind} filter ({', '.join(allowed)})", "type")
        if ftype in self.seen and ftype != "RequestMirror":
            raise f.error(f"filter {ftype} may appear only once in a rule", "type")
        self.seen.add(ftype)
        key = _FILTER_FIELDS[ftype]
        f.only({"type", key})
        body = f.child(key)
        if ftype == "RequestHeaderModifier":
            self.request = _header_ops(body)
        elif ftype == "ResponseHeaderModifier":
            self.response = _header_ops(body)
        elif ftype == "RequestMirror":
            self.mirrors.append(_mirror(body, namespace))
        elif ftype == "RequestRedirect":
            if "URLRewrite" in self.seen:
                raise f.error("RequestRedirect and URLRewrite cannot be combined", "type")
            self.redirect = _redirect(body)
        elif ftype == "URLRewrite":
            if "RequestRedirect" in self.seen:
                raise f.error("RequestRedirect and URLRewrite cannot be combined", "type")
            self.rewrite = _rewrite(body)


def _header_ops(r: Reader) -> HeaderOps:
    r.only({"set", "add", "remove"})
    pairs: dict[str, list[tuple[str, str]]] = {}
    for key in ("set", "add"):
        pairs[key] = []
        names: set[str] = set()  # the CRD: names unique within each list
        for h in r.children(key, 16):
            h.only({"name", "value"})
            name = _header_name(h)
            if name in names:
                raise h.error(f"header {name!r} appears twice in {key}", "name")
            names.add(name)
            pairs[key].append((name, h.text("value")))
    remove = []
    for i, name in enumerate(r.strings("remove")):
        if not _HEADER_NAME.match(name):
            raise r.error(f"{name!r} is not a valid header name", f"remove[{i}]")
        remove.append(name.lower())
    return HeaderOps(set=tuple(pairs["set"]), add=tuple(pairs["add"]), remove=tuple(remove))


def _mirror(r: Reader, namespace: str) -> MirrorSpec:
    r.only({"backendRef", "percent", "fraction"})
    backend = _backend(r.child("backendRef"), namespace, weighted=False)
    percent = 100.0
    if r.has("percent") and r.has("fraction"):
        raise r.error("give percent or fraction, not both", "fraction")
    if r.has("percent"):
        percent = float(r.integer("percent", low=0, high=100))
    elif r.has("fraction"):
        fr = r.child("fraction").only({"numerator", "denominator"})
        numerator = fr.integer("numerator", low=0)
        denominator = fr.integer("denominator", 100, low=1)
        if numerator > denominator:
            raise fr.error("numerator must not exceed denominator", "numerator")
        percent = 100.0 * numerator / denominator
    return MirrorSpec(backend=backend, percent=percent)


def _path_modifier(r: Reader) -> tuple[str | None, str | None]:
    pr = r.child("path").only({"type", "replaceFullPath", "replacePrefixMatch"})
    kind = pr.one_of("type", ("ReplaceFullPath", "ReplacePrefixMatch"))
    if kind == "ReplaceFullPath":
        value = pr.text("replaceFullPath")
        if not value.startswith("/"):
            raise pr.error(f"{value!r} must start with '/'", "replaceFullPath")
        return value, None
    value = pr.text("replacePrefixMatch")
    if value and not value.startswith("/"):  # "" is the spec's "strip the prefix"
        raise pr.error(f"{value!r} must start with '/'", "replacePrefixMatch")
    return None, value


def _redirect(r: Reader) -> Redirect:
    r.only({"scheme", "hostname", "path", "port", "statusCode"})
    scheme = r.opt_text("scheme")
    if scheme is not None and scheme not in ("http", "https"):
        raise r.error(f"{scheme!r} is not http or https", "scheme")
    host = r.opt_text("hostname")
    if host is not None and not _HOSTNAME.match(host):
        raise r.error(f"{host!r} is not a valid hostname", "hostname")
    code = r.integer("statusCode", 302)
    if code not in _REDIRECT_CODES:
        raise r.error(f"{code} is not a redirect status ({_REDIRECT_CODES})", "statusCode")
    path, prefix = _path_modifier(r) if r.has("path") else (None, None)
    port = r.opt_integer("port", low=1, high=65535)
    return Redirect(
        scheme=scheme,
        host=host,
        port=port,
        path=path,
        prefix=prefix,
        status=code,
        request_port=scheme is None and port is None,
        strip_port=scheme is not None and port is None,
    )


def _rewrite(r: Reader) -> Rewrite:
    r.only({"hostname", "path"})
    host = r.opt_text("hostname")
    if host is not None and not _HOSTNAME.match(host):
        raise r.error(f"{host!r} is not a valid hostname", "hostname")
    path, prefix = _path_modifier(r) if r.has("path") else (None, None)
    return Rewrite(host=host, path=path, prefix=prefix)


def route_kind(obj: Mapping[str, Any]) -> str:
    kind = obj.get("kind")
    if kind not in ("HTTPRoute", "GRPCRoute"):
        raise InvalidObject(str(kind), "?", "kind", "must be HTTPRoute or GRPCRoute")
    return str(kind)
