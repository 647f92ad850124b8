"""Why one request goes where it goes, decided with the waypoint's own code on its own config.

``explain(config, "GET http://reviews:9080/x -H user-agent:iPhone", namespace="shop")``
walks what the router would do: the destination's filter chain, the route
configuration, the first route that matches (and why the ones before it did
not), the action (cluster weights, redirect location, direct answer), the
rewrites and header changes, the retry and timeout in force, and the
endpoints the load balancer would choose among. Pure: the caller brings
the config (a live ``/config_dump`` or a saved one).
"""

from __future__ import annotations

import ipaddress
import random
import shlex
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from waypoint import explain_filters as ef
from waypoint.config.model import (
    DirectResponse,
    Forward,
    HeaderMatcher,
    HttpManager,
    Redirect,
    Route,
    RouteMatch,
    TcpProxy,
)
from waypoint.config.snapshot import WaypointConfig
from waypoint.explain_filters import FilterStep
from waypoint.headers import mutate, redirect_location, rewrite_path
from waypoint.http.messages import RequestHead
from waypoint.match import (
    RequestView,
    header_matches,
    normalize_path,
    path_matches,
    route_matches,
    select_virtual_host,
)
from waypoint.upstream.lb import new_balancer, stable_hash

CLUSTER_DOMAIN = "svc.cluster.local"


class ExplainError(ValueError):
    """The request or the destination cannot be explained; the message says why."""


@dataclass
class Explanation:
    request: dict[str, Any]
    steps: list[str] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=dict)
    filters: list[dict[str, Any]] = field(default_factory=list)  # each filter, in order
    unless: list[dict[str, Any]] = field(default_factory=list)  # who may answer instead

    def to_dict(self) -> dict[str, Any]:
        return {
            "request": self.request,
            "steps": self.steps,
            "filters": self.filters,
            "verdict": self.verdict,
        }

    def add(self, steps: list[FilterStep]) -> dict[str, Any] | None:
        """Filters' steps; the verdict of the one that stopped the request, if one did."""
        for step in steps:
            self.steps.append(step.text)
            self.filters.append(step.detail)
            if step.unless is not None:
                self.unless.append(step.unless)
            if step.verdict is not None:
                self.verdict = step.verdict
                return step.verdict
        return None

    def text(self) -> str:
        lines = [f"{self.request['method']} {self.request['url']}"]
        lines += [f"  {i}. {s}" for i, s in enumerate(self.steps, 1)]
        return "\n".join(lines)


def parse_request(text: str) -> tuple[str, str, list[tuple[str, str]]]:
    """``METHOD URL [-H name:value]...`` (curl's -H) -> (method, url, headers)."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ExplainError(f"cannot split {text!r}: {e}") from e
    if len(words) < 2:
        raise ExplainError("give METHOD URL [-H name:value]..., e.g. 'GET http://reviews:9080/'")
    method, url, rest = words[0].upper(), words[1], words[2:]
    headers = []
    while rest:
        flag = rest.pop(0)
        if flag not in ("-H", "--header") or not rest:
            raise ExplainError(f"{flag!r}: only -H name:value may follow the URL")
        name, sep, value = rest.pop(0).partition(":")
        if not sep:
            raise ExplainError(f"-H wants name:value, got {name!r}")
        headers.append((name.strip().lower(), value.strip()))
    return method, url, headers


def _chain_for(config: WaypointConfig, host: str, port: int, namespace: str) -> Any:
    listener = config.listeners.get("waypoint")
    if listener is None:
        raise ExplainError("the waypoint has no listener yet: is it connected to meshd?")
    try:
        ipaddress.ip_address(host)
        chain = listener.chain_for(host, port)
        if chain is None:
            raise ExplainError(f"{host}:{port} is not a destination of this waypoint")
        return chain
    except ValueError:
        pass
    candidates = [host, f"{host}.{namespace}.{CLUSTER_DOMAIN}", f"{host}.{CLUSTER_DOMAIN}"]
    for chain in listener.chains:
        name, _, chain_port = chain.name.rpartition(":")
        if name in candidates and chain_port == str(port):
            return chain
    known = ", ".join(sorted(c.name for c in listener.chains)) or "none"
    raise ExplainError(f"{host}:{port} is not a service of this waypoint (it serves: {known})")


def _describe_match(m: RouteMatch) -> str:
    parts = [f"{m.kind.value} {m.value!r}" + ("" if m.case_sensitive else " (any case)")]
    for h in m.headers:
        parts.append(_describe_header(h))
    for q in m.query:
        parts.append(
            f"query {q.name}"
            + (f" {q.matcher.kind.value} {q.matcher.value!r}" if q.matcher else " present")
        )
    return ", ".join(parts)


def _describe_header(h: HeaderMatcher) -> str:
    if h.matcher is None:
        what = "present" if h.present else "absent"
    else:
        what = f"{h.matcher.kind.value} {h.matcher.value!r}"
    return f"header {h.name} {'not ' if h.invert else ''}{what}"


def _why_not(m: RouteMatch, view: RequestView) -> str:
    if not path_matches(m, view.path_only):
        return f"the path {view.path_only!r} is not {m.kind.value} {m.value!r}"
    for h in m.headers:
        if not header_matches(view, h):
            return f"{_describe_header(h)} does not hold"
    query = view.query()
    for q in m.query:
        if q.name not in query:
            return f"no query parameter {q.name}"
        if q.matcher is not None and not q.matcher.matches(query[q.name]):
            return f"query {q.name}={query[q.name]!r} is not {q.matcher.value!r}"
    return "it matches"


def explain(
    config: WaypointConfig,
    request: str,
    *,
    namespace: str = "default",
    health: dict[str, dict[str, Any]] | None = None,
    peer_identity: str = "",
    source_ip: str | None = None,
    now: float | None = None,
) -> Explanation:
    """``peer_identity``: the HBONE peer's SPIFFE ID ("" none); ``source_ip`` the
    downstream address; ``now`` the time tokens are checked at (None: now)."""
    out = _explain(
        config,
        request,
        namespace=namespace,
        health=health or {},
        peer_identity=ef.spiffe_id(peer_identity),
        source_ip=source_ip,
        now=now,
    )
    if out.unless:
        out.verdict["unless"] = out.unless
    return out


def _explain(
    config: WaypointConfig,
    request: str,
    *,
    namespace: str,
    health: dict[str, dict[str, Any]],
    peer_identity: str,
    source_ip: str | None,
    now: float | None,
) -> Explanation:
    method, url, headers = parse_request(request)
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname:
        raise ExplainError(f"{url!r} has no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    out = Explanation(request={"method": method, "url": url, "headers": dict(headers)})
    chain = _chain_for(config, parts.hostname, port, namespace)
    out.steps.append(f"destination {parts.hostname}:{port} -> filter chain {chain.name}")
    try:
        conn = ef.connection(chain, parts.hostname, port, peer_identity, source_ip)
    except ValueError as e:
        raise ExplainError(str(e)) from e
    said, out.request["connection"] = ef.assumed(conn)
    handler = chain.handler
    secured = bool(chain.rbac) or (
        isinstance(handler, HttpManager) and (bool(handler.rbac) or handler.jwt is not None)
    )
    if secured or peer_identity or source_ip:
        out.steps.append(said)
    if out.add(ef.network_rbac(chain, conn)) is not None:
        return out
    if isinstance(handler, TcpProxy):
        out.steps.append(
            f"a TCP port: the connection is relayed to cluster {handler.cluster} (no HTTP routing)"
        )
        out.verdict = {"kind": "tcp", "cluster": handler.cluster}
        return out
    assert isinstance(handler, HttpManager)
    routes = config.routes.get(handler.route_config)
    if routes is None:
        raise ExplainError(f"route configuration {handler.route_config} not received yet")
    # As curl sends it: the URL's host[:port] as written (no port when it is the default).
    authority = (
        next((v for k, v in headers if k == "host"), None) or parts.netloc.rpartition("@")[2]
    )
    if handler.normalize_path:
        target = normalize_path(target)
    head = RequestHead(
        method=method,
        target=target,
        authority=authority,
        scheme="http",
        headers=[(k, v) for k, v in headers if k != "host"],
    )
    walk = ef.before_route(handler, routes, head, conn, now)
    if out.add(walk.steps) is not None:
        return out
    # What the router selects the route on: the request as the filters left it.
    view = ef.view_after(walk)
    target = walk.head.target
    vhost = select_virtual_host(routes, authority)
    if vhost is None:
        out.steps.append(f"no virtual host of {routes.name} takes {authority}: 404")
        out.verdict = {"kind": "local", "status": 404, "flag": "NR"}
        return out
    chosen: Route | None = None
    for route in vhost.routes:
        if route_matches(route.match, view):
            chosen = route
            break
        out.steps.append(
            f"route {route.name} ({_describe_match(route.match)}): "
            f"no, {_why_not(route.match, view)}"
        )
    if chosen is None:
        out.steps.append("no route matches: the waypoint answers 404 (NR)")
        out.verdict = {"kind": "local", "status": 404, "flag": "NR"}
        return out
    out.steps.append(f"route {chosen.name} matches ({_describe_match(chosen.match)})")
    if out.add(ef.after_route(handler, chosen)) is not None:
        return out
    action = chosen.action
    if isinstance(action, Redirect):
        location = redirect_location(action, chosen.match, authority, target, "http")
        out.steps.append(f"redirect {action.status} to {location}")
        out.verdict = {"kind": "redirect", "status": action.status, "location": location}
        return out
    if isinstance(action, DirectResponse):
        out.steps.append(
            f"answered by the waypoint: {action.status}"
            + (f" {action.body!r}" if action.body else "")
        )
        out.verdict = {"kind": "direct", "status": action.status}
        return out
    assert isinstance(action, Forward)
    return _forward(out, config, chosen, action, target, authority, view, health)


def _forward(
    out: Explanation,
    config: WaypointConfig,
    route: Route,
    action: Forward,
    target: str,
    authority: str,
    view: RequestView,
    health: dict[str, dict[str, Any]],
) -> Explanation:
    total = action.total_weight
    if len(action.clusters) == 1:
        out.steps.append(f"to cluster {action.clusters[0][0]}")
    else:
        shares = ", ".join(f"{name} {100.0 * w / total:.1f} %" for name, w in action.clusters)
        out.steps.append(f"weighted: {shares} (a random draw per request)")
    new_target = rewrite_path(target, route.match, action.prefix_rewrite, action.regex_rewrite)
    if new_target != target:
        out.steps.append(f"path rewritten {target!r} -> {new_target!r}")
    if action.host_rewrite:
        out.steps.append(f"host rewritten to {action.host_rewrite}")
    before = list(view.headers)
    after = mutate(list(before), route.request_headers)
    if after != before:
        out.steps.append(f"request headers: {dict(before)} -> {dict(after)}")
    if route.response_headers:
        out.steps.append(
            f"response headers changed: add {[a[:2] for a in route.response_headers.add]}, "
            f"remove {list(route.response_headers.remove)}"
        )
    retry = action.retry
    out.steps.append(
        (
            f"retries: {retry.num_retries} on {','.join(sorted(retry.retry_on))}"
            + (f" codes {sorted(retry.status_codes)}" if retry.status_codes else "")
            if retry
            else "no retries"
        )
        + (f"; timeout {action.timeout_s:g}s" if action.timeout_s else "; no timeout")
    )
    picks = []
    for name, _ in action.clusters:
        cluster = config.clusters.get(name)
        if cluster is None:
            out.steps.append(
                f"cluster {name} does not exist: its share is answered "
                f"{action.cluster_not_found_status} (NC)"
            )
            continue
        assignment = config.endpoints.get(name)
        endpoints = assignment.endpoints if assignment is not None else ()
        balancer = new_balancer(cluster, endpoints, random.Random(0))
        for host in balancer.hosts:
            status = health.get(name, {}).get(host.address, {})
            host.ejected = bool(status.get("ejected"))
            host.active = int(status.get("active", 0))
        candidates = balancer.candidates()
        key = None
        for policy in action.hash_policies:
            value = dict(view.headers).get(policy.header) if policy.header else None
            if value:
                key = stable_hash(value)
        listed = (
            ", ".join(
                h.address
                + (" (HBONE)" if h.endpoint.hbone else "")
                + ("" if h.healthy else " [unhealthy]")
                for h in balancer.hosts
            )
            or "none"
        )
        if not candidates:
            out.steps.append(
                f"cluster {name} ({cluster.lb.name}): endpoints {listed}; none healthy: 503 (UH)"
            )
            continue
        if key is not None:
            pick = balancer.choose(random.Random(0), hash_key=key)
            assert pick is not None
            out.steps.append(
                f"cluster {name} ({cluster.lb.name}): by hash, endpoint {pick.address}"
            )
            picks.append(pick.address)
        else:
            out.steps.append(
                f"cluster {name} ({cluster.lb.name}): one of "
                f"{', '.join(h.address for h in candidates)} (all: {listed})"
            )
            picks += [h.address for h in candidates]
    out.verdict = {
        "kind": "forward",
        "clusters": {n: w for n, w in action.clusters},
        "endpoints": picks,
        "path": new_target,
        "authority": action.host_rewrite or authority,
        "route": route.name,
    }
    return out
