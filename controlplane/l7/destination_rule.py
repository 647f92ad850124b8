"""Istio's DestinationRule as users write it: a :class:`~controlplane.l7.ir.ServicePolicy`.

The traffic policy of a service (load balancing, connection pool, outlier
detection), per port (a port-level entry replaces the top-level policy whole)
and per subset (pods selected by labels). What a waypoint does not do (TLS
origination, locality load balancing, slow start, ...) is refused with the
field's path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from controlplane.l7.ir import (
    SECTIONS,
    CircuitBreakers,
    HashPolicy,
    LbPolicy,
    OutlierDetection,
    ServicePolicy,
    Subset,
    TrafficPolicy,
)
from controlplane.l7.istio_object import check_api, resolve_host
from controlplane.l7.reader import Reader, go_duration, object_name


def parse_destination_rule(obj: Mapping[str, Any]) -> ServicePolicy | None:
    namespace, name = object_name(obj, "DestinationRule")
    full = f"{namespace}/{name}"
    top = Reader(obj, "DestinationRule", full)
    check_api(top, "DestinationRule")
    spec = top.child("spec").only(
        {"host", "trafficPolicy", "subsets", "exportTo"},
        {"workloadSelector": "workload selectors (a waypoint applies rules per service)"},
    )
    host = spec.text("host")
    if "*" in host:
        raise spec.error(f"wildcard host {host!r} is not supported by waypoints", "host")
    key = resolve_host(host, namespace)
    default = _traffic_policy(spec.child("trafficPolicy"), full, with_ports=True)
    ports: dict[int, TrafficPolicy] = {}
    for pl in spec.child("trafficPolicy").children("portLevelSettings"):
        pl.only({"port", "loadBalancer", "connectionPool", "outlierDetection", "tls"})
        number = pl.child("port").only({"number"}).integer("number", low=1, high=65535)
        # Istio: a port-level entry replaces the top-level policy whole.
        ports[number] = _traffic_policy(pl, full, with_ports=False, extra=frozenset({"port"}))
    subsets = []
    for s in spec.children("subsets"):
        s.only({"name", "labels", "trafficPolicy"})
        policy = (
            _traffic_policy(s.child("trafficPolicy"), full, with_ports=False)
            if s.has("trafficPolicy")
            else None
        )
        written = frozenset(k for k in SECTIONS if s.child("trafficPolicy").has(k))
        subsets.append(
            Subset(
                name=s.text("name"),
                labels=MappingProxyType(s.labels("labels")),
                policy=policy,
                sections=written,
            )
        )
    names = [s.name for s in subsets]
    if len(names) != len(set(names)):
        raise spec.error("subset names must be unique", "subsets")
    return ServicePolicy(
        service=key,
        default=default,
        ports=MappingProxyType(ports),
        subsets=tuple(subsets),
        origin=full,
    )


def _traffic_policy(
    r: Reader, origin: str, *, with_ports: bool, extra: frozenset[str] = frozenset()
) -> TrafficPolicy:
    """A trafficPolicy; ``extra``: keys of the caller's (a portLevelSettings entry's port)."""
    allowed = {"loadBalancer", "connectionPool", "outlierDetection", "tls", *extra}
    if with_ports:
        allowed.add("portLevelSettings")
    r.only(
        allowed,
        {"tunnel": "tunnels", "proxyProtocol": "PROXY protocol", "retryBudget": "retry budgets"},
    )
    if r.has("tls"):
        mode = r.child("tls").raw.get("mode", "DISABLE")
        if mode not in ("DISABLE", "ISTIO_MUTUAL"):
            raise r.error(
                f"TLS origination (mode {mode}) is not supported by waypoints", "tls.mode"
            )
    policy = TrafficPolicy(origin=origin)
    if r.has("loadBalancer"):
        lb = r.child("loadBalancer").only(
            {"simple", "consistentHash"},
            {
                "localityLbSetting": "locality load balancing",
                "warmupDurationSecs": "slow start",
                "warmup": "slow start",
            },
        )
        if lb.has("simple") and lb.has("consistentHash"):
            raise lb.error("give simple or consistentHash, not both")
        if lb.has("simple"):
            simple = lb.one_of(
                "simple",
                ("LEAST_REQUEST", "LEAST_CONN", "ROUND_ROBIN", "RANDOM", "UNSPECIFIED"),
                None,
            )
            chosen = {"LEAST_CONN": "LEAST_REQUEST", "UNSPECIFIED": "LEAST_REQUEST"}.get(
                simple, simple
            )
            policy = _with(policy, lb=LbPolicy(chosen))
        elif lb.has("consistentHash"):
            ch = lb.child("consistentHash").only(
                {
                    "httpHeaderName",
                    "httpCookie",
                    "useSourceIp",
                    "httpQueryParameterName",
                    "ringHash",
                    "maglev",
                    "minimumRingSize",
                }
            )
            keys = [
                k
                for k in ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
                if ch.has(k) and ch.raw[k] is not False  # useSourceIp: false says nothing
            ]
            if len(keys) != 1:
                raise ch.error(
                    "exactly one of httpHeaderName, httpCookie, useSourceIp and "
                    "httpQueryParameterName is required"
                )
            hp = HashPolicy()
            if keys[0] == "httpHeaderName":
                hp = HashPolicy(header=ch.text("httpHeaderName").lower())
            elif keys[0] == "httpCookie":
                ck = ch.child("httpCookie").only({"name", "path", "ttl"})
                hp = HashPolicy(
                    cookie=ck.text("name"),
                    cookie_path=ck.text("path", ""),
                    cookie_ttl_s=go_duration(ck, "ttl"),
                )
            elif keys[0] == "useSourceIp":
                hp = HashPolicy(source_ip=ch.boolean("useSourceIp"))
            else:
                hp = HashPolicy(query=ch.text("httpQueryParameterName"))
            ch.child("maglev").only(set(), {"tableSize": "maglev table sizes (Envoy's 65537)"})
            kind = LbPolicy.MAGLEV if ch.has("maglev") else LbPolicy.RING_HASH
            ring = ch.child("ringHash").only({"minimumRingSize"}).opt_integer(
                "minimumRingSize", low=1
            ) or ch.opt_integer("minimumRingSize", low=1)
            policy = _with(
                policy,
                lb=kind,
                hash_policy=hp,
                minimum_ring_size=ring or (1024 if kind is LbPolicy.RING_HASH else None),
            )
    if r.has("connectionPool"):
        cp = r.child("connectionPool").only({"tcp", "http"})
        tcp = cp.child("tcp").only(
            {"maxConnections", "connectTimeout", "idleTimeout"},
            {
                "tcpKeepalive": "TCP keepalive settings",
                "maxConnectionDuration": "maximum connection durations",
            },
        )
        http = cp.child("http").only(
            {
                "http1MaxPendingRequests",
                "http2MaxRequests",
                "maxRequestsPerConnection",
                "maxRetries",
                "idleTimeout",
                "h2UpgradePolicy",
                "useClientProtocol",
            },
            {"maxConcurrentStreams": "HTTP/2 stream limits"},
        )
        # The waypoint speaks the port's protocol upstream (HTTP/1.1 for an http
        # port, never upgraded): Istio's defaults. Asking for anything else is refused
        # rather than quietly not done. DEFAULT is the mesh's h2UpgradePolicy, whose
        # default (we read no MeshConfig) is DO_NOT_UPGRADE.
        if http.has("h2UpgradePolicy"):
            upgrade = http.one_of("h2UpgradePolicy", ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"))
            if upgrade == "UPGRADE":
                raise http.error(
                    "not supported: UPGRADE (HTTP/1.1 requests go upstream as HTTP/1.1; "
                    "declare the port http2 or grpc to speak HTTP/2 to it)",
                    "h2UpgradePolicy",
                )
        if http.has("useClientProtocol") and http.boolean("useClientProtocol"):
            raise http.error(
                "not supported: true (the port's declared protocol is spoken upstream, "
                "whatever the client's)",
                "useClientProtocol",
            )

        def positive(reader: Reader, key: str) -> int | None:
            value = reader.opt_integer(key, low=0)
            return value if value else None  # Istio: 0 means unset

        policy = _with(
            policy,
            breakers=CircuitBreakers(
                max_connections=positive(tcp, "maxConnections"),
                max_pending_requests=positive(http, "http1MaxPendingRequests"),
                max_requests=positive(http, "http2MaxRequests"),
                max_retries=positive(http, "maxRetries"),
            ),
            connect_timeout_s=go_duration(tcp, "connectTimeout") or 10.0,
            idle_timeout_s=go_duration(http, "idleTimeout") or go_duration(tcp, "idleTimeout"),
            max_requests_per_connection=positive(http, "maxRequestsPerConnection"),
        )
    if r.has("outlierDetection"):
        od = r.child("outlierDetection").only(
            {
                "consecutive5xxErrors",
                "consecutiveGatewayErrors",
                "interval",
                "baseEjectionTime",
                "maxEjectionPercent",
                "minHealthPercent",
                "consecutiveErrors",
            },
            {
                "splitExternalLocalOriginErrors": "local-origin error accounting",
                "consecutiveLocalOriginFailures": "local-origin error accounting",
            },
        )
        # Unset: Envoy's default (5) applies, as Istio leaves it; 0 turns it off.
        consecutive = od.opt_integer("consecutive5xxErrors", low=0)
        if consecutive is None and od.has("consecutiveErrors"):
            consecutive = od.integer("consecutiveErrors", low=0)
        policy = _with(
            policy,
            outlier=OutlierDetection(
                consecutive_5xx=consecutive,
                consecutive_gateway_errors=od.opt_integer("consecutiveGatewayErrors", low=0)
                or None,
                interval_s=go_duration(od, "interval") or 10.0,
                base_ejection_time_s=go_duration(od, "baseEjectionTime") or 30.0,
                max_ejection_percent=od.opt_integer("maxEjectionPercent", low=0, high=100) or 10,
                min_health_percent=od.opt_integer("minHealthPercent", low=0, high=100) or 0,
            ),
        )
    return policy


def _with(policy: TrafficPolicy, **changes: Any) -> TrafficPolicy:
    return replace(policy, **changes)
