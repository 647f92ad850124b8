"""The internal form of L7 configuration, whatever API it was written in.

HTTPRoute, GRPCRoute and VirtualService rules all become :class:`Rule` values
grouped per service port (:class:`PortRoutes`); DestinationRules become
:class:`TrafficPolicy` values per service, port and subset. As in Istio
(which turns Gateway API routes into VirtualServices internally), one form
serves both APIs, so the translation to Envoy is written once.

Every value is frozen; durations are seconds (``float``), ``None`` meaning
"not set" where the difference matters (a route timeout of 0 disables it,
``None`` leaves Istio's default).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


class Protocol(enum.Enum):
    """What a service port carries, as Istio decides it (appProtocol, then the port name)."""

    HTTP = "http"
    HTTP2 = "http2"  # h2c to the backend; gRPC too
    GRPC = "grpc"
    TCP = "tcp"

    @property
    def is_http(self) -> bool:
        return self is not Protocol.TCP


class StringKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    REGEX = "regex"  # RE2, whole-string match
    CONTAINS = "contains"


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatch:
    kind: StringKind
    value: str
    ignore_case: bool = False


class PathKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"  # plain string prefix (VirtualService uri.prefix)
    SEGMENT_PREFIX = "segment_prefix"  # HTTPRoute PathPrefix: whole path segments
    REGEX = "regex"


@dataclass(frozen=True, slots=True, kw_only=True)
class PathMatch:
    kind: PathKind
    value: str
    ignore_case: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMatch:
    """``match`` None: the header must be present (or, inverted, absent)."""

    name: str  # lower case; ":method" and ":authority" are pseudo-headers
    match: StringMatch | None = None
    invert: bool = False
    # VirtualService withoutHeaders: a missing header is matched as "" (so it passes).
    missing_as_empty: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryMatch:
    name: str
    match: StringMatch | None = None  # None: present


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestMatch:
    """All of its parts must hold; an empty match matches every request."""

    path: PathMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendRef:
    """A service port (and optional subset) traffic may go to.

    ``problem`` is set when the reference cannot be used (no such service or
    port): the share of requests it would have taken is answered with 500,
    as the Gateway API asks. ``service`` is empty when the reference is not to a
    Service at all (an unsupported kind).
    """

    service: str  # the service's xDS name: namespace/hostname
    port: int
    weight: int = 1
    subset: str = ""
    problem: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


NO_HEADER_OPS = HeaderOps()


@dataclass(frozen=True, slots=True, kw_only=True)
class Redirect:
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    # Exactly one of these, or neither (keep the path).
    path: str | None = None  # replace the whole path
    prefix: str | None = None  # replace the matched prefix
    status: int = 302
    # Neither a port nor a scheme: the redirect keeps the port the request came
    # to (HTTPRoute; VirtualService derivePort FROM_REQUEST_PORT). Either way a
    # port that is the scheme's well-known one (80, 443) is left out.
    request_port: bool = False
    # The port is the scheme's default (VirtualService FROM_PROTOCOL_DEFAULT).
    strip_port: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Rewrite:
    host: str | None = None
    path: str | None = None  # replace the whole path
    prefix: str | None = None  # replace the matched prefix
    # VirtualService uriRegexRewrite: RE2 pattern and substitution (\1 groups).
    regex: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Mirror:
    backend: BackendRef
    percent: float = 100.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """Envoy's retry policy as Istio writes it."""

    attempts: int = 2
    retry_on: str = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    codes: tuple[int, ...] = ()
    per_try_timeout_s: float | None = None
    backoff_base_s: float | None = None
    # previous_hosts: a retry goes to another endpoint when there is one.
    other_host: bool = True


DEFAULT_RETRY = Retry()


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    delay_s: float | None = None
    delay_percent: float = 100.0
    abort_status: int | None = None
    abort_grpc_status: int | None = None
    abort_percent: float = 100.0


@dataclass(frozen=True, slots=True, kw_only=True)
class HashPolicy:
    """A consistent-hash key: one of header, cookie, source IP or query parameter."""

    header: str = ""
    cookie: str = ""
    cookie_ttl_s: float | None = None
    cookie_path: str = ""
    source_ip: bool = False
    query: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One route: its matches (any may match), then where and how the request goes.

    Exactly one action: ``backends`` (forward), ``redirect`` or
    ``direct_status`` (a local answer, e.g. 500 for a rule whose backends are
    all unusable).
    """

    name: str
    origin: str  # the object and rule it came from, for status and `explain`
    matches: tuple[RequestMatch, ...] = (RequestMatch(),)
    backends: tuple[BackendRef, ...] = ()
    redirect: Redirect | None = None
    direct_status: int | None = None
    direct_body: str = ""
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    rewrite: Rewrite | None = None
    timeout_s: float | None = None  # None: Istio's default (none); 0: none either
    retry: Retry | None = DEFAULT_RETRY  # None: no retries
    mirrors: tuple[Mirror, ...] = ()
    fault: Fault | None = None
    # The operation name of spans, as Istio sets it.
    operation: str = ""
    # VirtualService match.port: the rule applies to requests on this port only.
    port: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PortRoutes:
    """What a waypoint does with requests to one service port."""

    service: str  # namespace/hostname
    port: int
    protocol: Protocol
    rules: tuple[Rule, ...]
    # Where the rules came from: "default" (no route attached), "HTTPRoute",
    # "GRPCRoute", "VirtualService" (or "TCPRoute" for TCP ports).
    source: str = "default"
    # TCP ports: the backend(s) of the connection.
    tcp_backends: tuple[BackendRef, ...] = ()


class LbPolicy(enum.Enum):
    LEAST_REQUEST = "LEAST_REQUEST"
    ROUND_ROBIN = "ROUND_ROBIN"
    RANDOM = "RANDOM"
    RING_HASH = "RING_HASH"
    MAGLEV = "MAGLEV"


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitBreakers:
    """None: unlimited (Istio's default, UINT32_MAX in Envoy)."""

    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_retries: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    # None: not written, Envoy's default (5, enforced) applies, as in Istio; 0: off.
    consecutive_5xx: int | None = None
    consecutive_gateway_errors: int | None = None
    interval_s: float = 10.0
    base_ejection_time_s: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficPolicy:
    """A DestinationRule's settings for one service port (and subset)."""

    lb: LbPolicy = LbPolicy.LEAST_REQUEST
    hash_policy: HashPolicy | None = None
    minimum_ring_size: int | None = None
    breakers: CircuitBreakers = CircuitBreakers()
    outlier: OutlierDetection | None = None
    connect_timeout_s: float = 10.0  # Istio's default
    idle_timeout_s: float | None = None
    max_requests_per_connection: int | None = None
    origin: str = ""


DEFAULT_POLICY = TrafficPolicy()

# A DestinationRule's trafficPolicy sections, and the TrafficPolicy fields each one sets.
SECTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "loadBalancer": ("lb", "hash_policy", "minimum_ring_size"),
        "connectionPool": (
            "breakers",
            "connect_timeout_s",
            "idle_timeout_s",
            "max_requests_per_connection",
        ),
        "outlierDetection": ("outlier",),
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Subset:
    name: str
    labels: Mapping[str, str] = field(default_factory=_empty)
    policy: TrafficPolicy | None = None  # None: the service's
    # The sections (keys of SECTIONS) the subset's policy writes; the others are the
    # service's (Istio's MergeSubsetTrafficPolicy).
    sections: frozenset[str] = frozenset(SECTIONS)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePolicy:
    """Everything a DestinationRule says about one service."""

    service: str
    default: TrafficPolicy = DEFAULT_POLICY
    ports: Mapping[int, TrafficPolicy] = field(default_factory=lambda: MappingProxyType({}))
    subsets: tuple[Subset, ...] = ()
    origin: str = ""

    def for_port(self, port: int, subset: str = "") -> TrafficPolicy:
        """portLevelSettings replace the service's policy whole; then each section a
        subset's own policy writes replaces that section."""
        base = self.ports.get(port, self.default)
        chosen = self.subset(subset) if subset else None
        if chosen is None or chosen.policy is None or not chosen.sections:
            return base
        policy = chosen.policy
        changes = {f: getattr(policy, f) for s in chosen.sections for f in SECTIONS[s]}
        return replace(base, origin=policy.origin, **changes)

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)
