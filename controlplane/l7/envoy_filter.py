"""Istio ``EnvoyFilter`` objects bound to a waypoint by ``targetRefs``: local rate limiting only.

Istio's local rate limit recipe
(https://istio.io/latest/docs/tasks/policy-enforcement/rate-limit/, "Local
rate limit") is how Istio users rate-limit at a waypoint today: an
EnvoyFilter (``networking.istio.io/v1alpha3``) with ``targetRefs`` (the
waypoint ``Gateway``, a ``Service``, or from the root namespace the
``GatewayClass`` ``istio-waypoint``, bound as AuthorizationPolicies are:
:mod:`controlplane.l7.authz`) whose ``configPatches`` are exactly:

* one ``applyTo: HTTP_FILTER`` patch, ``match`` with ``context``
  ``SIDECAR_INBOUND`` or ``ANY`` (or none: istiod patches a waypoint's
  listeners and routes in the ``SIDECAR_INBOUND`` context, so ``GATEWAY`` and
  ``SIDECAR_OUTBOUND`` would never apply) and
  ``listener.filterChain.filter.name: envoy.filters.network.http_connection_manager``,
  optionally with ``subFilter.name: envoy.filters.http.router``; ``patch``
  ``operation: INSERT_BEFORE`` (or ``INSERT_FIRST``) and ``value`` ``{name:
  envoy.filters.http.local_ratelimit, typed_config}``. Where istiod puts it
  (``envoyfilter/listener_patch.go`` patchHTTPFilters): ``INSERT_BEFORE``
  without a ``subFilter`` (the recipe) and ``INSERT_FIRST`` put it first in
  the chain, ahead of JWT and RBAC (so refused requests count too);
  ``INSERT_BEFORE`` the router puts it just before the router (after the
  fault filter);
* and, optionally, ``applyTo: HTTP_ROUTE`` patches, ``match.routeConfiguration
  .vhost`` with an optional ``name`` (``inbound|http|<port>``, istiod's and
  meshd's waypoint virtual host names) and an optional ``route`` (``name``,
  ``action: ANY``), ``operation: MERGE`` of ``{typed_per_filter_config:
  {envoy.filters.http.local_ratelimit: ...}}``: the matching routes' own
  limits (a token bucket each), which replace the filter's.

``typed_config`` is either ``@type: type.googleapis.com/udpa.type.v1.TypedStruct``
with ``type_url: ...local_ratelimit.v3.LocalRateLimit`` and ``value``, or
``@type: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit``
with the fields inline; meshd sends the typed message. Its fields: those our
waypoint enforces (:mod:`waypoint.config.ratelimit`): ``stat_prefix``,
``status``, ``token_bucket``, ``filter_enabled``, ``filter_enforced``,
``response_headers_to_add``.

Every other EnvoyFilter with targetRefs is refused, whole, and says why in its
``WaypointAccepted`` condition (reason ``Invalid``, naming the field): other
``applyTo``, operations, filters, matches, fields. None is ever silently
ignored. One with ``workloadSelector`` (or neither) is for sidecars and
gateways, not a waypoint: left alone. When two EnvoyFilters insert the filter
on the same chain, the oldest is in force there and the other says it is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as lrl_pb2
from google.protobuf import json_format

from controlplane.l7.authz import Target, has_target_refs, read_targets
from controlplane.l7.istio_object import created_of, generation_of
from controlplane.l7.reader import InvalidObject, Reader
from controlplane.l7.status import ObjectStatus, waypoint_accepted
from controlplane.state import L7Object

KIND = "EnvoyFilter"
_API_VERSIONS = ("networking.istio.io/v1alpha3",)
HTTP_LOCAL_RATELIMIT = "envoy.filters.http.local_ratelimit"
_HCM = "envoy.filters.network.http_connection_manager"
_ROUTER = "envoy.filters.http.router"
_TYPED_STRUCT = "type.googleapis.com/udpa.type.v1.TypedStruct"
_XDS_TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"
_LRL_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
_CONTEXTS = ("ANY", "SIDECAR_INBOUND")
_SUPPORTED = (
    "only Istio's local rate limit recipe is supported on a waypoint: an HTTP_FILTER patch "
    f"inserting {HTTP_LOCAL_RATELIMIT} (INSERT_BEFORE or INSERT_FIRST) and HTTP_ROUTE MERGE "
    "patches of its typed_per_filter_config"
)
_FIELDS = {
    "stat_prefix",
    "status",
    "token_bucket",
    "filter_enabled",
    "filter_enforced",
    "response_headers_to_add",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteLimit:
    """An HTTP_ROUTE patch: the routes it matches (None: any) get ``config``."""

    vhost: str | None
    route: str | None
    config: lrl_pb2.LocalRateLimit

    def matches(self, vhost: str, route: str) -> bool:
        return (self.vhost is None or self.vhost == vhost) and (
            self.route is None or self.route == route
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointRateLimit:
    namespace: str
    name: str
    targets: tuple[Target, ...]
    config: lrl_pb2.LocalRateLimit | None  # the HTTP_FILTER patch (None: routes only)
    first: bool = True  # first in the chain (else just before the router)
    routes: tuple[RouteLimit, ...] = ()
    generation: int = 0
    created: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_all(
    objects: Iterable[L7Object], root_namespace: str
) -> tuple[list[WaypointRateLimit], list[ObjectStatus]]:
    """The waypoints' EnvoyFilters, oldest first, and the statuses of those refused."""
    out, refused = [], []
    for obj in sorted(objects, key=lambda o: (created_of(o.raw), o.name, o.namespace)):
        if obj.kind != KIND or not has_target_refs(obj.raw):
            continue
        try:
            out.append(parse(obj, root_namespace))
        except InvalidObject as e:
            refused.append(
                _status(obj.namespace, obj.name, generation_of(obj.raw), False, "Invalid",
                        f"{e.path}: {e.reason}; {_SUPPORTED}; it is not in force anywhere")
            )  # fmt: skip
    return out, refused


def parse(obj: L7Object, root_namespace: str) -> WaypointRateLimit:
    """One EnvoyFilter with targetRefs; raises :class:`InvalidObject`."""
    r = Reader(obj.raw, KIND, f"{obj.namespace}/{obj.name}")
    if r.raw.get("kind") not in (None, KIND):
        raise r.error(f"must be {KIND}", "kind")
    api = r.raw.get("apiVersion", _API_VERSIONS[0])
    if api not in _API_VERSIONS:
        raise r.error(f"{api!r} is not {_API_VERSIONS[0]}", "apiVersion")
    spec = r.child("spec")
    spec.only(
        {"targetRef", "targetRefs", "configPatches"},
        {
            "workloadSelector": "cannot be combined with targetRefs (Istio refuses both)",
            "priority": "one EnvoyFilter per chain inserts the filter (the oldest)",
        },
    )
    targets = read_targets(r, obj.namespace, root_namespace)
    config: lrl_pb2.LocalRateLimit | None = None
    first = True
    routes = []
    patches = list(spec.children("configPatches"))
    if not patches:
        raise spec.error("needs configPatches", "configPatches")
    for p in patches:
        p.only({"applyTo", "match", "patch"})
        apply_to = p.text("applyTo", "")
        if apply_to == "HTTP_FILTER":
            if config is not None:
                raise p.error(f"only one HTTP_FILTER patch (inserting {HTTP_LOCAL_RATELIMIT})")
            config, first = _filter_patch(p)
        elif apply_to == "HTTP_ROUTE":
            routes.append(_route_patch(p))
        else:
            raise p.error(f"{apply_to or 'nothing'}: {_SUPPORTED}", "applyTo")
    return WaypointRateLimit(
        namespace=obj.namespace,
        name=obj.name,
        targets=targets,
        config=config,
        first=first,
        routes=tuple(routes),
        generation=generation_of(obj.raw),
        created=created_of(obj.raw),
    )


def _context(match: Reader) -> None:
    context = match.text("context", "ANY")
    if context not in _CONTEXTS:
        raise match.error(
            f"{context}: a waypoint is patched in the SIDECAR_INBOUND context (or ANY)",
            "context",
        )


def _filter_patch(p: Reader) -> tuple[lrl_pb2.LocalRateLimit, bool]:
    match = p.child("match")
    match.only({"context", "listener"})
    _context(match)
    listener = match.child("listener")
    listener.only({"filterChain"})
    chain = listener.child("filterChain")
    chain.only({"filter"})
    flt = chain.child("filter")
    flt.only({"name", "subFilter"})
    if flt.text("name", "") != _HCM:
        raise flt.error(f"must be {_HCM}", "name")
    sub = None
    if flt.has("subFilter"):
        sf = flt.child("subFilter")
        sf.only({"name"})
        sub = sf.text("name")
        if sub != _ROUTER:
            raise sf.error(f"only {_ROUTER} (to insert before the router)", "name")
    patch = p.child("patch")
    patch.only({"operation", "value"})
    operation = patch.text("operation", "")
    if operation == "INSERT_FIRST":
        first = True  # istiod puts it first whatever the subFilter
    elif operation == "INSERT_BEFORE":
        first = sub is None  # without a subFilter, istiod adds it at the beginning
    else:
        raise patch.error(
            f"{operation or 'nothing'}: only INSERT_BEFORE or INSERT_FIRST", "operation"
        )
    value = patch.child("value")
    value.only({"name", "typed_config"})
    if value.text("name", "") != HTTP_LOCAL_RATELIMIT:
        raise value.error(f"{_SUPPORTED}", "name")
    return _typed(value.child("typed_config"), per_route=False), first


def _route_patch(p: Reader) -> RouteLimit:
    match = p.child("match")
    match.only({"context", "routeConfiguration"})
    _context(match)
    rc = match.child("routeConfiguration")
    rc.only({"vhost"})
    vhost = rc.child("vhost")
    vhost.only({"name", "route"})
    route_name = None
    if vhost.has("route"):
        route = vhost.child("route")
        route.only({"name", "action"})
        if route.text("action", "ANY") != "ANY":
            raise route.error("only ANY", "action")
        route_name = route.opt_text("name")
    patch = p.child("patch")
    patch.only({"operation", "value"})
    if patch.text("operation", "") != "MERGE":
        raise patch.error("only MERGE (of typed_per_filter_config)", "operation")
    value = patch.child("value")
    value.only({"typed_per_filter_config"})
    per_filter = value.child("typed_per_filter_config")
    per_filter.only({HTTP_LOCAL_RATELIMIT})
    if not per_filter.has(HTTP_LOCAL_RATELIMIT):
        raise per_filter.error(f"needs {HTTP_LOCAL_RATELIMIT}")
    return RouteLimit(
        vhost=vhost.opt_text("name"),
        route=route_name,
        config=_typed(per_filter.child(HTTP_LOCAL_RATELIMIT), per_route=True),
    )


def _typed(r: Reader, *, per_route: bool) -> lrl_pb2.LocalRateLimit:
    kind = r.text("@type", "")
    body: Mapping[str, Any]
    if kind in (_TYPED_STRUCT, _XDS_TYPED_STRUCT):
        r.only({"@type", "type_url", "value"})
        if r.text("type_url", "") != _LRL_TYPE:
            raise r.error(f"must be {_LRL_TYPE}", "type_url")
        body = r.child("value").raw
        at = r.child("value")
    elif kind == _LRL_TYPE:
        body = {k: v for k, v in r.raw.items() if k != "@type"}
        at = r
    else:
        raise r.error(f"{kind or 'nothing'}: must be {_TYPED_STRUCT} or {_LRL_TYPE}", "@type")
    out = lrl_pb2.LocalRateLimit()
    try:
        json_format.ParseDict(dict(body), out)
    except json_format.ParseError as e:
        raise at.error(f"not a LocalRateLimit: {e}") from e
    for fd, _ in out.ListFields():
        if fd.name not in _FIELDS:
            raise at.error(
                f"not supported by the waypoint (it enforces {', '.join(sorted(_FIELDS))})",
                fd.name,
            )
    if not out.stat_prefix:
        raise at.error("is required", "stat_prefix")
    if out.HasField("token_bucket"):
        tb = out.token_bucket
        if tb.max_tokens < 1:
            raise at.error("must be at least 1", "token_bucket.max_tokens")
        if tb.HasField("tokens_per_fill") and tb.tokens_per_fill.value < 1:
            raise at.error("must be at least 1", "token_bucket.tokens_per_fill")
        if tb.fill_interval.seconds + tb.fill_interval.nanos / 1e9 < 0.05:
            raise at.error("must be at least 50ms (Envoy's minimum)", "token_bucket.fill_interval")
    elif per_route:
        raise at.error("a route's local rate limit needs a token_bucket (Envoy's rule)")
    for i, h in enumerate(out.response_headers_to_add):
        if "%" in h.header.value:
            raise at.error("header formatters (%...%) are not supported",
                           f"response_headers_to_add[{i}].header.value")  # fmt: skip
        for fd, _ in h.ListFields():
            if fd.name not in ("header", "append", "append_action"):
                raise at.error("not supported", f"response_headers_to_add[{i}].{fd.name}")
        for fd, _ in h.header.ListFields():
            if fd.name not in ("key", "value"):
                raise at.error("not supported", f"response_headers_to_add[{i}].header.{fd.name}")
    for name in ("filter_enabled", "filter_enforced"):
        if out.HasField(name):
            for fd, _ in getattr(out, name).ListFields():
                if fd.name not in ("runtime_key", "default_value"):
                    raise at.error("not supported", f"{name}.{fd.name}")
    return out


def status_of(f: WaypointRateLimit, bound: Sequence[str], shadowed: Sequence[str]) -> ObjectStatus:
    """The ``WaypointAccepted`` condition: where it is in force, or why not."""
    if not bound:
        if shadowed:
            return _status(f.namespace, f.name, f.generation, False, "Conflicted",
                           f"an older EnvoyFilter inserts {HTTP_LOCAL_RATELIMIT} on "
                           f"{', '.join(shadowed)}: only one is in force per chain")  # fmt: skip
        targets = ", ".join(str(t) for t in f.targets)
        return _status(f.namespace, f.name, f.generation, False,
                       "TargetNotFound", f"no waypoint serves {targets}")  # fmt: skip
    message = f"local rate limit bound to {', '.join(bound)}"
    if shadowed:
        message += (f"; not on {', '.join(shadowed)}, where an older EnvoyFilter inserts "
                    f"{HTTP_LOCAL_RATELIMIT}")  # fmt: skip
    return _status(f.namespace, f.name, f.generation, True, "Accepted", message)


_status = partial(waypoint_accepted, KIND)  # namespace, name, generation, ok, reason, message
