"""What one request did: the record the router keeps, the telemetry reads.

The router fills one :class:`RequestRecord` per request as it goes (route,
cluster, attempts, response flags, upstream timings) and hands it to its
``on_record`` callback when the request ends; :mod:`waypoint.telemetry` turns
it into Istio's metrics and the access-log line. Kept apart from the router so
that telemetry depends on the record alone, not on the router's machinery.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

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
    cluster: str = ""
    route: str = ""
    attempts: int = 0
    user_agent: str = ""
    request_id: str = ""
    forwarded_for: str = ""
    grpc_status: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def opened(self, exchange: Exchange) -> None:
        """The request as it arrived (before the path is normalised)."""
        head = exchange.head
        self.method, self.path, self.authority = head.method, head.target, head.authority
        self.protocol = exchange.protocol
        self.info = exchange.info

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
        self.status = self.status or exchange.status
