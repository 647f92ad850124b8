"""What one request did: the record the router keeps, the telemetry reads.

The router fills one :class:`RequestRecord` per request as it goes (route,
cluster, attempts, response flags, upstream timings) and hands it to its
``on_record`` callback when the request ends; :mod:`waypoint.telemetry` turns
it into Istio's metrics and the access-log line. Kept apart from the router so
that telemetry depends on the record alone, not on the router's machinery.

Bytes are kept two ways: ``bytes_received``/``bytes_sent`` are body bytes
(Envoy's ``%BYTES_RECEIVED%``/``%BYTES_SENT%``, the access log's), and
``head_bytes_received``/``head_bytes_sent`` the size of the heads on the
downstream wire, which Istio's ``istio_request_bytes``/``istio_response_bytes``
add (they observe wire bytes). A gRPC request (by its content type, as
Envoy's ``grpc_stats`` decides) gets two :class:`~waypoint.grpc_messages.MessageCounter`
the router feeds with the body chunks as they pass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from waypoint.grpc_messages import MessageCounter, is_grpc
from waypoint.http.exchange import Exchange
from waypoint.http.messages import Headers


@dataclass(slots=True)
class RequestRecord:
    """What one request did, for the access log and the metrics."""

    start: float
    method: str = ""
    path: str = ""
    protocol: str = "HTTP/1.1"
    authority: str = ""
    status: int = 0
    flags: str = "-"
    details: str = ""
    bytes_received: int = 0
    bytes_sent: int = 0
    duration_ms: float = 0.0
    upstream_service_ms: float | None = None
    upstream_host: str = ""
    upstream_workload: str = ""
    upstream_identity: str = ""  # the SPIFFE ID the endpoint presents (destination_principal)
    cluster: str = ""
    route: str = ""
    attempts: int = 0
    user_agent: str = ""
    request_id: str = ""
    forwarded_for: str = ""
    grpc_status: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    grpc: bool = False
    request_messages: MessageCounter | None = None
    response_messages: MessageCounter | None = None
    head_bytes_received: int = 0
    head_bytes_sent: int = 0
    operation: str = ""  # the route's decorator operation (the span's name)
    trace: Any = None  # its waypoint.tracing.Trace when the connection manager traces
    stats: Any = None  # the chain's istio.stats overrides (waypoint.config.stats), if any
    request_headers: Sequence[tuple[str, str]] = ()  # as they went upstream (overrides)

    def opened(self, exchange: Exchange) -> None:
        """The request as it arrived (before the path is normalised)."""
        head = exchange.head
        self.method, self.path, self.authority = head.method, head.target, head.authority
        self.protocol = exchange.protocol
        self.info = exchange.info
        if is_grpc(head.get("content-type")):
            self.grpc = True
            self.request_messages = MessageCounter()
            self.response_messages = MessageCounter()

    def saw_headers(self, headers: Headers, request_id: str) -> None:
        """The headers the access log shows, once the connection manager cleaned them."""
        self.request_id = request_id
        self.user_agent = next((v for k, v in headers if k == "user-agent"), "")
        self.forwarded_for = next((v for k, v in headers if k == "x-forwarded-for"), "")

    def closed(self, exchange: Exchange) -> None:
        """The request is over: its duration, bytes both ways, and the status sent."""
        self.duration_ms = (time.time() - self.start) * 1000
        self.bytes_received = exchange.body.received
        self.bytes_sent = exchange.response_bytes
        self.head_bytes_received = exchange.request_head_bytes
        self.head_bytes_sent = exchange.response_head_bytes
        self.status = self.status or exchange.status
