"""Envoy's RouteConfiguration -> the waypoint's route model (see :mod:`waypoint.config.convert`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import string_pb2

from waypoint.config import model as m
from waypoint.config import ratelimit
from waypoint.config.checks import Unsupported, only, ppm, regex, seconds, unpack

FAULT = "envoy.filters.http.fault"


def route_config(msg: route_pb2.RouteConfiguration) -> m.RouteConfig:
    where = f"RouteConfiguration {msg.name}"
    only(msg, {"name", "virtual_hosts", "validate_clusters"}, where)
    vhosts = []
    for i, vh in enumerate(msg.virtual_hosts):
        vw = f"{where}.virtual_hosts[{i}]"
        only(vh, {"name", "domains", "routes"}, vw)
        vhosts.append(
            m.VirtualHost(
                name=vh.name,
                domains=tuple(d.lower() for d in vh.domains),
                routes=tuple(_route(r, f"{vw}.routes[{j}]") for j, r in enumerate(vh.routes)),
            )
        )
    return m.RouteConfig(name=msg.name, virtual_hosts=tuple(vhosts))


def string_matcher(s: string_pb2.StringMatcher, where: str) -> m.StringMatcher:
    """Envoy's StringMatcher (``ignore_case`` has no effect on ``safe_regex``, as in Envoy)."""
    only(s, {"exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"}, where)
    kind = s.WhichOneof("match_pattern")
    if kind is None:
        raise Unsupported(f"{where}: a string matcher needs a pattern")
    if kind == "safe_regex":
        only(s.safe_regex, {"regex"}, f"{where}.safe_regex")
        return m.StringMatcher(
            kind=m.StringKind.REGEX,
            value=s.safe_regex.regex,
            regex=regex(s.safe_regex.regex, where),
        )
    return m.StringMatcher(
        kind=m.StringKind(kind), value=getattr(s, kind), ignore_case=s.ignore_case
    )


def header_matcher(h: rc.HeaderMatcher, where: str) -> m.HeaderMatcher:
    """Envoy's HeaderMatcher: a string match or a presence test (also when no specifier)."""
    only(
        h,
        {
            "name",
            "string_match",
            "present_match",
            "invert_match",
            "treat_missing_header_as_empty",
        },
        where,
    )
    which = h.WhichOneof("header_match_specifier")
    matcher = (
        string_matcher(h.string_match, f"{where}.string_match") if which == "string_match" else None
    )
    return m.HeaderMatcher(
        name=h.name.lower(),
        matcher=matcher,
        # No specifier: a presence match (Envoy's rule).
        present=h.present_match if which == "present_match" else True,
        invert=h.invert_match,
        missing_as_empty=h.treat_missing_header_as_empty,
    )


def _match(r: rc.RouteMatch, where: str) -> m.RouteMatch:
    only(
        r,
        {
            "prefix",
            "path",
            "safe_regex",
            "path_separated_prefix",
            "case_sensitive",
            "headers",
            "query_parameters",
        },
        where,
    )
    kind = r.WhichOneof("path_specifier")
    if kind is None:
        raise Unsupported(f"{where}: a route match needs a path specifier")
    headers = [header_matcher(h, f"{where}.headers[{i}]") for i, h in enumerate(r.headers)]
    query = []
    for i, q in enumerate(r.query_parameters):
        qw = f"{where}.query_parameters[{i}]"
        only(q, {"name", "string_match", "present_match"}, qw)
        matcher = None
        if q.HasField("string_match"):
            matcher = string_matcher(q.string_match, f"{qw}.string_match")
        query.append(m.QueryMatcher(name=q.name, matcher=matcher))
    value = getattr(r, kind).regex if kind == "safe_regex" else getattr(r, kind)
    compiled = None
    if kind == "safe_regex":
        only(r.safe_regex, {"regex"}, f"{where}.safe_regex")
        compiled = regex(value, f"{where}.safe_regex")
    case = r.case_sensitive.value if r.HasField("case_sensitive") else True
    if kind == "path_separated_prefix" and (value.endswith("/") or not value.startswith("/")):
        raise Unsupported(f"{where}.path_separated_prefix: must start and must not end with '/'")
    return m.RouteMatch(
        kind=m.PathKind(kind),
        value=value,
        case_sensitive=case,
        regex=compiled,
        headers=tuple(headers),
        query=tuple(query),
    )


_OPTION = base_pb2.HeaderValueOption
_APPEND = {
    _OPTION.APPEND_IF_EXISTS_OR_ADD: m.AppendAction.APPEND_IF_EXISTS_OR_ADD,
    _OPTION.ADD_IF_ABSENT: m.AppendAction.ADD_IF_ABSENT,
    _OPTION.OVERWRITE_IF_EXISTS_OR_ADD: m.AppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    _OPTION.OVERWRITE_IF_EXISTS: m.AppendAction.OVERWRITE_IF_EXISTS,
}


def _mutation(
    add: Iterable[base_pb2.HeaderValueOption], remove: Iterable[str], where: str
) -> m.HeaderMutation:
    out = []
    for i, o in enumerate(add):
        ow = f"{where}[{i}]"
        only(o, {"header", "append_action"}, ow)
        only(o.header, {"key", "value"}, f"{ow}.header")
        if "%" in o.header.value:
            raise Unsupported(f"{ow}.header.value: header formatters (%...%) are not supported")
        out.append((o.header.key.lower(), o.header.value, _APPEND[o.append_action]))
    return m.HeaderMutation(add=tuple(out), remove=tuple(n.lower() for n in remove))


def _retry(p: rc.RetryPolicy, where: str) -> m.RetryPolicy:
    only(
        p,
        {
            "retry_on",
            "num_retries",
            "retriable_status_codes",
            "per_try_timeout",
            "retry_back_off",
            "retry_host_predicate",
            "host_selection_retry_max_attempts",
        },
        where,
    )
    previous = False
    for i, pred in enumerate(p.retry_host_predicate):
        pw = f"{where}.retry_host_predicate[{i}]"
        only(pred, {"name", "typed_config"}, pw)
        only(unpack(pred.typed_config, previous_hosts_pb2.PreviousHostsPredicate, pw), (), pw)
        previous = True
    base = seconds(p.retry_back_off.base_interval) if p.HasField("retry_back_off") else 0.025
    maximum = (
        seconds(p.retry_back_off.max_interval)
        if p.retry_back_off.HasField("max_interval")
        else 10 * base
    )
    known = {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
    conditions = frozenset(c.strip() for c in p.retry_on.split(",") if c.strip())
    unknown = conditions - known
    if unknown:
        raise Unsupported(f"{where}.retry_on: {', '.join(sorted(unknown))} not supported")
    return m.RetryPolicy(
        retry_on=conditions,
        num_retries=p.num_retries.value if p.HasField("num_retries") else 1,
        status_codes=frozenset(p.retriable_status_codes),
        per_try_timeout_s=seconds(p.per_try_timeout),
        base_interval_s=base,
        max_interval_s=maximum,
        previous_hosts=previous,
        host_selection_attempts=p.host_selection_retry_max_attempts,
    )


def _hash(h: Any, where: str) -> m.HashPolicy:
    only(h, {"header", "cookie", "connection_properties", "query_parameter"}, where)
    kind = h.WhichOneof("policy_specifier")
    if kind == "header":
        only(h.header, {"header_name"}, f"{where}.header")
        return m.HashPolicy(header=h.header.header_name.lower())
    if kind == "cookie":
        only(h.cookie, {"name", "ttl", "path"}, f"{where}.cookie")
        return m.HashPolicy(
            cookie=h.cookie.name,
            cookie_path=h.cookie.path,
            cookie_ttl_s=seconds(h.cookie.ttl) if h.cookie.HasField("ttl") else None,
        )
    if kind == "connection_properties":
        return m.HashPolicy(source_ip=h.connection_properties.source_ip)
    if kind == "query_parameter":
        return m.HashPolicy(query=h.query_parameter.name)
    raise Unsupported(f"{where}: a hash policy needs a specifier")


def _rewrite(action: Any, where: str) -> tuple[Any, str] | None:
    if not action.HasField("regex_rewrite"):
        return None
    rr = action.regex_rewrite
    only(rr, {"pattern", "substitution"}, f"{where}.regex_rewrite")
    only(rr.pattern, {"regex"}, f"{where}.regex_rewrite.pattern")
    return (regex(rr.pattern.regex, f"{where}.regex_rewrite"), rr.substitution)


def _forward(a: rc.RouteAction, where: str) -> m.Forward:
    only(
        a,
        {
            "cluster",
            "weighted_clusters",
            "cluster_not_found_response_code",
            "timeout",
            "retry_policy",
            "request_mirror_policies",
            "prefix_rewrite",
            "regex_rewrite",
            "host_rewrite_literal",
            "hash_policy",
        },
        where,
    )
    kind = a.WhichOneof("cluster_specifier")
    if kind == "cluster":
        clusters: tuple[tuple[str, int], ...] = ((a.cluster, 0),)
        total = 0
    elif kind == "weighted_clusters":
        only(a.weighted_clusters, {"clusters"}, f"{where}.weighted_clusters")
        items = []
        for i, c in enumerate(a.weighted_clusters.clusters):
            only(c, {"name", "weight"}, f"{where}.weighted_clusters.clusters[{i}]")
            items.append((c.name, c.weight.value))
        clusters = tuple(items)
        total = sum(w for _, w in clusters)
        if total <= 0:
            raise Unsupported(f"{where}.weighted_clusters: the weights must add up to more than 0")
    else:
        raise Unsupported(f"{where}: only cluster and weighted_clusters are supported")
    not_found = {
        rc.RouteAction.SERVICE_UNAVAILABLE: 503,
        rc.RouteAction.NOT_FOUND: 404,
        rc.RouteAction.INTERNAL_SERVER_ERROR: 500,
    }[a.cluster_not_found_response_code]
    mirrors = []
    for i, mp in enumerate(a.request_mirror_policies):
        mw = f"{where}.request_mirror_policies[{i}]"
        only(mp, {"cluster", "runtime_fraction", "trace_sampled"}, mw)
        only(mp.runtime_fraction, {"default_value"}, f"{mw}.runtime_fraction")
        share = (
            ppm(mp.runtime_fraction.default_value) if mp.HasField("runtime_fraction") else m.MILLION
        )
        mirrors.append(m.Mirror(cluster=mp.cluster, ppm=share))
    return m.Forward(
        clusters=clusters,
        total_weight=total,
        cluster_not_found_status=not_found,
        timeout_s=seconds(a.timeout) if a.HasField("timeout") else 15.0,
        retry=_retry(a.retry_policy, f"{where}.retry_policy")
        if a.HasField("retry_policy")
        else None,
        mirrors=tuple(mirrors),
        prefix_rewrite=a.prefix_rewrite or None,
        regex_rewrite=_rewrite(a, where),
        host_rewrite=a.host_rewrite_literal or None,
        hash_policies=tuple(
            _hash(h, f"{where}.hash_policy[{i}]") for i, h in enumerate(a.hash_policy)
        ),
    )


_REDIRECT_CODES = {
    rc.RedirectAction.MOVED_PERMANENTLY: 301,
    rc.RedirectAction.FOUND: 302,
    rc.RedirectAction.SEE_OTHER: 303,
    rc.RedirectAction.TEMPORARY_REDIRECT: 307,
    rc.RedirectAction.PERMANENT_REDIRECT: 308,
}


def _redirect(r: rc.RedirectAction, where: str) -> m.Redirect:
    only(
        r,
        {
            "scheme_redirect",
            "https_redirect",
            "host_redirect",
            "port_redirect",
            "path_redirect",
            "prefix_rewrite",
            "regex_rewrite",
            "response_code",
            "strip_query",
        },
        where,
    )
    return m.Redirect(
        scheme="https" if r.https_redirect else (r.scheme_redirect or None),
        host=r.host_redirect or None,
        port=r.port_redirect or None,
        path=r.path_redirect if r.WhichOneof("path_rewrite_specifier") == "path_redirect" else None,
        prefix_rewrite=r.prefix_rewrite
        if r.WhichOneof("path_rewrite_specifier") == "prefix_rewrite"
        else None,
        regex_rewrite=_rewrite(r, where),
        status=_REDIRECT_CODES[r.response_code],
        strip_query=r.strip_query,
    )


def _fault(f: fault_pb2.HTTPFault, where: str) -> m.Fault:
    only(f, {"delay", "abort"}, where)
    delay_s, delay_ppm = None, 0
    if f.HasField("delay"):
        only(f.delay, {"fixed_delay", "percentage"}, f"{where}.delay")
        if not f.delay.HasField("fixed_delay"):
            raise Unsupported(f"{where}.delay: only fixed delays")
        delay_s, delay_ppm = seconds(f.delay.fixed_delay), ppm(f.delay.percentage)
    status = grpc = None
    abort_ppm = 0
    if f.HasField("abort"):
        only(f.abort, {"http_status", "grpc_status", "percentage"}, f"{where}.abort")
        kind = f.abort.WhichOneof("error_type")
        if kind == "http_status":
            status = f.abort.http_status
        elif kind == "grpc_status":
            grpc = f.abort.grpc_status
        else:
            raise Unsupported(f"{where}.abort: needs http_status or grpc_status")
        abort_ppm = ppm(f.abort.percentage)
    return m.Fault(
        delay_s=delay_s,
        delay_ppm=delay_ppm,
        abort_status=status,
        abort_grpc_status=grpc,
        abort_ppm=abort_ppm,
    )


def _route(r: rc.Route, where: str) -> m.Route:
    only(
        r,
        {
            "name",
            "match",
            "route",
            "redirect",
            "direct_response",
            "decorator",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "typed_per_filter_config",
        },
        where,
    )
    kind = r.WhichOneof("action")
    action: m.Forward | m.Redirect | m.DirectResponse
    if kind == "route":
        action = _forward(r.route, f"{where}.route")
    elif kind == "redirect":
        action = _redirect(r.redirect, f"{where}.redirect")
    elif kind == "direct_response":
        only(r.direct_response, {"status", "body"}, f"{where}.direct_response")
        only(r.direct_response.body, {"inline_string"}, f"{where}.direct_response.body")
        action = m.DirectResponse(
            status=r.direct_response.status, body=r.direct_response.body.inline_string.encode()
        )
    else:
        raise Unsupported(f"{where}: action {kind} is not supported")
    fault = None
    limit = None
    for name, packed in r.typed_per_filter_config.items():
        if name == ratelimit.HTTP_LOCAL_RATELIMIT:
            limit = ratelimit.per_route(packed, f"{where}.typed_per_filter_config[{name}]")
            continue
        if name != FAULT:
            raise Unsupported(f"{where}.typed_per_filter_config[{name}]: not supported")
        fault = _fault(
            unpack(packed, fault_pb2.HTTPFault, f"{where}.typed_per_filter_config"),
            f"{where}.typed_per_filter_config[{name}]",
        )
    only(r.decorator, {"operation"}, f"{where}.decorator")
    return m.Route(
        name=r.name,
        match=_match(r.match, f"{where}.match"),
        action=action,
        request_headers=_mutation(
            r.request_headers_to_add, r.request_headers_to_remove, f"{where}.request_headers_to_add"
        ),
        response_headers=_mutation(
            r.response_headers_to_add,
            r.response_headers_to_remove,
            f"{where}.response_headers_to_add",
        ),
        fault=fault,
        ratelimit=limit,
        operation=r.decorator.operation,
    )
