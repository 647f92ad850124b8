"""The waypoint's own model of its configuration: frozen values, ready for the hot path.

Converted from Envoy's resources at the edge (:mod:`waypoint.config.convert`),
with regular expressions compiled, durations in seconds and percentages in
parts per million, so that per-request code never touches protobuf.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import re2

if TYPE_CHECKING:  # rbac_model imports this module's matchers
    from waypoint.config.accesslog import AccessLogConfig
    from waypoint.config.jwt_model import JwtConfig
    from waypoint.config.rbac_model import Rbac
    from waypoint.config.stats import StatsConfig
    from waypoint.config.tracing import Tracing

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MILLION = 1_000_000
UINT32_MAX = 2**32 - 1


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


class StringKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    CONTAINS = "contains"
    REGEX = "safe_regex"


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatcher:
    kind: StringKind
    value: str
    ignore_case: bool = False
    regex: Any = None  # a compiled re2 pattern for REGEX (whole-string match)

    def matches(self, text: str) -> bool:
        kind = self.kind
        if kind is StringKind.REGEX:
            return self.regex.fullmatch(text) is not None
        if self.ignore_case:
            text, value = text.lower(), self.value.lower()
        else:
            value = self.value
        if kind is StringKind.EXACT:
            return text == value
        if kind is StringKind.PREFIX:
            return text.startswith(value)
        if kind is StringKind.SUFFIX:
            return text.endswith(value)
        return value in text


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMatcher:
    """``matcher`` None with ``present`` set: a presence test (``present_match``)."""

    name: str
    matcher: StringMatcher | None = None
    present: bool = True
    invert: bool = False
    missing_as_empty: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryMatcher:
    name: str
    matcher: StringMatcher | None = None  # None: present


class PathKind(enum.Enum):
    PREFIX = "prefix"
    PATH = "path"
    SEPARATED_PREFIX = "path_separated_prefix"
    REGEX = "safe_regex"


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteMatch:
    kind: PathKind
    value: str
    case_sensitive: bool = True
    regex: Any = None
    headers: tuple[HeaderMatcher, ...] = ()
    query: tuple[QueryMatcher, ...] = ()


class AppendAction(enum.Enum):
    APPEND_IF_EXISTS_OR_ADD = 0
    ADD_IF_ABSENT = 1
    OVERWRITE_IF_EXISTS_OR_ADD = 2
    OVERWRITE_IF_EXISTS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMutation:
    add: tuple[tuple[str, str, AppendAction], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


NO_MUTATION = HeaderMutation()


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    retry_on: frozenset[str]
    num_retries: int = 1
    status_codes: frozenset[int] = frozenset()
    per_try_timeout_s: float = 0.0
    base_interval_s: float = 0.025
    max_interval_s: float = 0.25
    previous_hosts: bool = False
    host_selection_attempts: int = 0  # extra draws to avoid hosts already tried


@dataclass(frozen=True, slots=True, kw_only=True)
class Mirror:
    cluster: str
    ppm: int = MILLION  # parts per million of requests mirrored


@dataclass(frozen=True, slots=True, kw_only=True)
class HashPolicy:
    header: str = ""
    cookie: str = ""
    cookie_ttl_s: float | None = None
    cookie_path: str = ""
    source_ip: bool = False
    query: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Forward:
    """Envoy's RouteAction: to a cluster or weighted clusters."""

    clusters: tuple[tuple[str, int], ...]  # (name, weight); one with weight 0 when unweighted
    total_weight: int = 0
    cluster_not_found_status: int = 503
    timeout_s: float = 15.0  # Envoy's default; 0 disables
    retry: RetryPolicy | None = None
    mirrors: tuple[Mirror, ...] = ()
    prefix_rewrite: str | None = None
    regex_rewrite: tuple[Any, str] | None = None  # (compiled pattern, substitution)
    host_rewrite: str | None = None
    hash_policies: tuple[HashPolicy, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Redirect:
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    prefix_rewrite: str | None = None
    regex_rewrite: tuple[Any, str] | None = None
    status: int = 301
    strip_query: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    delay_s: float | None = None
    delay_ppm: int = 0
    abort_status: int | None = None
    abort_grpc_status: int | None = None
    abort_ppm: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenBucket:
    """Envoy's token bucket: starts full, ``tokens_per_fill`` per ``fill_interval``."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalRateLimit:
    """Envoy's ``local_ratelimit`` filter config (the filter's or a route's)."""

    stat_prefix: str
    status: int = 429
    bucket: TokenBucket | None = None  # None: nothing is limited
    enabled_ppm: int = 0  # filter_enabled (unset: 0%, the filter does nothing)
    enforced_ppm: int = 0  # filter_enforced (unset: 0%, counted but never answered)
    response_headers: HeaderMutation = NO_MUTATION  # on the 429 only


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    name: str
    match: RouteMatch
    action: Forward | Redirect | DirectResponse
    request_headers: HeaderMutation = NO_MUTATION
    response_headers: HeaderMutation = NO_MUTATION
    fault: Fault | None = None
    ratelimit: LocalRateLimit | None = None  # typed_per_filter_config of local_ratelimit
    operation: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]


class LbPolicy(enum.Enum):
    ROUND_ROBIN = 0
    LEAST_REQUEST = 1
    RING_HASH = 2
    RANDOM = 3
    MAGLEV = 5
    CLUSTER_PROVIDED = 6  # ORIGINAL_DST clusters only: the host is the connection's own


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierConfig:
    consecutive_5xx: int = 5
    enforcing_consecutive_5xx: int = 100
    consecutive_gateway_failure: int = 5
    enforcing_consecutive_gateway_failure: int = 0
    interval_s: float = 10.0
    base_ejection_time_s: float = 30.0
    max_ejection_time_s: float = 300.0
    max_ejection_percent: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class OriginalDst:
    """How an ORIGINAL_DST cluster reaches the one address it sends to, the connection's
    own destination: over HBONE with this identity, or plain TCP (the cluster's metadata,
    as an EDS endpoint's says it of itself)."""

    hbone: bool = False
    identity: str = ""  # the SPIFFE ID the destination must present (HBONE)
    workload: str = ""  # Istio's "name;namespace;canonical;revision;cluster"

    def endpoint(self, ip: str, port: int) -> Endpoint:
        return Endpoint(
            ip=ip, port=port, hbone=self.hbone, identity=self.identity, workload=self.workload
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    name: str
    lb: LbPolicy = LbPolicy.ROUND_ROBIN
    choice_count: int = 2
    minimum_ring_size: int = 1024
    connect_timeout_s: float = 5.0
    thresholds: Thresholds = Thresholds()
    outlier: OutlierConfig | None = None
    healthy_panic_percent: float = 50.0
    http2: bool = False  # h2c to the endpoints (gRPC); else HTTP/1.1
    idle_timeout_s: float = 3600.0
    max_requests_per_connection: int = 0  # 0: unlimited
    metadata: Mapping[str, Any] = field(default_factory=_empty)
    original_dst: OriginalDst | None = None  # set: an ORIGINAL_DST cluster (no endpoints)


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    ip: str
    port: int
    healthy: bool = True
    hbone: bool = False  # reached over HBONE: ip:15008 with :authority ip:port
    identity: str = ""  # the SPIFFE ID it must present (HBONE)
    workload: str = ""  # Istio's "name;namespace;canonical;revision;cluster"
    weight: int = 1

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadAssignment:
    cluster: str
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpManager:
    """One HTTP connection manager. It has no stream idle timeout (a stream may idle
    forever): an HCM's ``stream_idle_timeout`` other than 0s (Istio's) is refused."""

    route_config: str
    stat_prefix: str = ""
    server_name: str = "envoy"
    overwrite_server: bool = True
    normalize_path: bool = False
    fault_filter: bool = False
    websocket: bool = False
    jwt: JwtConfig | None = None  # the JWT authentication filter (before the RBAC filters)
    rbac: tuple[Rbac, ...] = ()  # the HTTP RBAC filters, in filter order (before the router)
    # The local rate limit filter: first (before JWT and RBAC, where Istio's recipe puts
    # it) or last (just before the router, after the fault filter).
    ratelimit: LocalRateLimit | None = None
    ratelimit_first: bool = True
    tracing: Tracing | None = None  # the connection manager's tracing (None: off)
    access_logs: tuple[AccessLogConfig, ...] = ()  # the connection manager's access_log
    stats: StatsConfig | None = None  # an istio.stats filter (a Telemetry's metrics overrides)


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpProxy:
    cluster: str
    stat_prefix: str = ""
    stats: StatsConfig | None = None  # an istio.stats network filter (metrics overrides)


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterChain:
    name: str
    prefixes: tuple[IPNetwork, ...]
    port: int | None
    handler: HttpManager | TcpProxy
    rbac: tuple[Rbac, ...] = ()  # the network RBAC filters ahead of the handler, in order

    def matches(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        return not self.prefixes or any(ip in net for net in self.prefixes)

    def names_host(self, host: str) -> bool:
        """Whether one of the chain's prefixes is exactly ``host`` (a /32 or /128): the
        only destinations an ORIGINAL_DST cluster behind the chain may be sent to."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(
            net.prefixlen == net.max_prefixlen and net.network_address == ip
            for net in self.prefixes
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    name: str
    chains: tuple[FilterChain, ...]
    # The chains by the port they name (None: any port), for chain_for on every stream.
    by_port: Mapping[int | None, tuple[FilterChain, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        by_port: dict[int | None, list[FilterChain]] = {}
        for chain in self.chains:
            by_port.setdefault(chain.port, []).append(chain)
        index = MappingProxyType({k: tuple(v) for k, v in by_port.items()})
        object.__setattr__(self, "by_port", index)

    def chain_for(self, host: str, port: int) -> FilterChain | None:
        """The filter chain for a destination (the CONNECT authority), as Envoy picks
        one: first by port (the chains naming the port, if any, else those naming
        none), then the most specific destination prefix among those; no fall back
        to the chains of any port when the port's own do not take the address."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        candidates = self.by_port.get(port) or self.by_port.get(None, ())
        best: tuple[int, FilterChain] | None = None
        for chain in candidates:
            if not chain.matches(ip, port):
                continue
            length = max((n.prefixlen for n in chain.prefixes if ip in n), default=-1)
            if best is None or length > best[0]:
                best = (length, chain)
        return best[1] if best else None


def compile_regex(pattern: str) -> Any:
    """RE2, as Envoy: refuse what RE2 refuses."""
    return re2.compile(pattern)
