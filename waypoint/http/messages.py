"""Request and response heads, and the header rules Envoy applies as a proxy."""

from __future__ import annotations

import http
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Headers = list[tuple[str, str]]

# Removed from what is forwarded, both ways (Envoy's conn_manager_utility): they
# describe one hop, not the message. `upgrade` stays on an upgrade request.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}
)
# Envoy's internal headers, stripped from requests that do not come from its own.
ENVOY_INTERNAL = frozenset(
    {
        "x-envoy-retriable-status-codes",
        "x-envoy-retriable-header-names",
        "x-envoy-retry-on",
        "x-envoy-retry-grpc-on",
        "x-envoy-max-retries",
        "x-envoy-upstream-alt-stat-name",
        "x-envoy-upstream-rq-timeout-ms",
        "x-envoy-upstream-rq-per-try-timeout-ms",
        "x-envoy-upstream-rq-timeout-alt-response",
        "x-envoy-expected-rq-timeout-ms",
        "x-envoy-force-trace",
        "x-envoy-ip-tags",
        "x-envoy-original-url",
        "x-envoy-hedge-on-per-try-timeout",
        "x-envoy-internal",
    }
)


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str  # path and query, as the request line (or :path) has it
    authority: str
    scheme: str = "http"
    version: str = "1.1"  # "1.0", "1.1" or "2"
    headers: Headers = field(default_factory=list)  # lower-case names, no pseudo-headers, no host
    upgrade: str | None = None  # the protocol asked for (websocket), when an upgrade

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.headers.append((name, value))

    def remove(self, name: str) -> None:
        if any(k == name for k, _ in self.headers):
            self.headers[:] = [(k, v) for k, v in self.headers if k != name]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def is_grpc(self) -> bool:
        ct = self.get("content-type") or ""
        return ct.startswith("application/grpc")


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: Headers = field(default_factory=list)
    reason: str = ""

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.headers.append((name, value))

    def remove(self, name: str) -> None:
        if any(k == name for k, _ in self.headers):
            self.headers[:] = [(k, v) for k, v in self.headers if k != name]


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def without_hop_by_hop(
    headers: Iterable[tuple[str, str]], *, keep_upgrade: bool = False
) -> Headers:
    """Headers minus those of one hop, and minus any the Connection header names."""
    headers = list(headers)
    named: set[str] = set()
    for k, v in headers:
        if k == "connection":
            named.update(t.strip().lower() for t in v.split(","))
    drop = HOP_BY_HOP | named
    if keep_upgrade:
        drop = drop - {"upgrade", "connection"}
    out: Headers = []
    for k, v in headers:
        if k in drop:
            if k == "te" and v.strip().lower() == "trailers":
                out.append((k, v))  # Envoy keeps "te: trailers" (gRPC needs it)
            continue
        out.append((k, v))
    return out


def body_forbidden(method: str, status: int) -> bool:
    """A response that carries no body whatever its headers say (RFC 9112 section 6.3)."""
    return method == "HEAD" or status in (204, 304) or 100 <= status < 200


@dataclass(frozen=True, slots=True)
class LocalReply:
    """An answer of the waypoint's own (no route, overflow, timeout, ...), as Envoy words it.

    ``flag`` is Envoy's response flag for the access log (``NR``, ``UO``, ``UT``...),
    ``details`` its response code details.
    """

    status: int
    body: bytes = b""
    flag: str = "-"
    details: str = ""
    headers: Sequence[tuple[str, str]] = ()

    def head(self) -> ResponseHead:
        headers: Headers = list(self.headers)
        if self.body:
            headers.append(("content-type", "text/plain"))
        headers.append(("content-length", str(len(self.body))))
        return ResponseHead(status=self.status, headers=headers)


def no_route() -> LocalReply:
    return LocalReply(404, flag="NR", details="route_not_found")


def no_cluster(status: int) -> LocalReply:
    return LocalReply(status, flag="NC", details="cluster_not_found")


def no_healthy_upstream() -> LocalReply:
    return LocalReply(503, b"no healthy upstream", flag="UH", details="no_healthy_upstream")


def overflow() -> LocalReply:
    return LocalReply(
        503,
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
        flag="UO",
        details="upstream_reset_before_response_started{overflow}",
        headers=(("x-envoy-overloaded", "true"),),
    )


def upstream_timeout(per_try: bool = False) -> LocalReply:
    return LocalReply(
        504,
        b"upstream request timeout",
        flag="UT",
        details="upstream_per_try_timeout" if per_try else "upstream_response_timeout",
    )


def upstream_reset(reason: str, transport: str = "", retried: bool = False) -> LocalReply:
    """Envoy's 503 for an upstream that failed before answering."""
    text = "upstream connect error or disconnect/reset before headers. "
    if retried:
        text += "retried and the latest "
    text += f"reset reason: {reason}"
    if transport:
        text += f", transport failure reason: {transport}"
    flag = {
        "remote connection failure": "UF",
        "local connection failure": "UF",
        "connection timeout": "UF",
        "connection termination": "UC",
        "remote reset": "UR",
        "remote refused stream reset": "UR",
        "protocol error": "UPE",
        "overflow": "UO",
        "local reset": "LR",
    }.get(reason, "UF")
    status = 502 if reason == "protocol error" else 503
    details = f"upstream_reset_before_response_started{{{reason.replace(' ', '_')}}}"
    return LocalReply(status, text.encode(), flag=flag, details=details)


def direct(status: int, body: bytes) -> LocalReply:
    return LocalReply(status, body, details="direct_response")


def fault_abort(status: int) -> LocalReply:
    return LocalReply(status, b"fault filter abort", flag="FI", details="fault_filter_abort")
