"""A per-service table of the mesh's L7 traffic, from the proxies' Prometheus metrics.

    meshlab exec shop/waypoint -- curl -s http://127.0.0.1:15020/stats/prometheus |
        python3 examples/observability/service_table.py

reads Prometheus' text exposition on stdin (a waypoint's ``/stats/prometheus``;
several scrapes may be concatenated, e.g. every waypoint's and, for the L4
view, every node's ztunnel ``/metrics``) and prints one row per
``destination_service`` that a waypoint reported (``reporter="waypoint"``):

* requests, the success rate (the share not answered 5xx, as Istio's
  dashboards count it), 4xx and 5xx;
* rate-limited (response flag ``RL`` or code 429) and denied (403, an
  authorization policy's "RBAC: access denied");
* p50 and p99 latency in ms, estimated from the buckets of
  ``istio_request_duration_milliseconds`` as Prometheus' ``histogram_quantile``
  does (linear interpolation within the bucket the rank falls in);
* gRPC messages received and sent, when any service has them.

With ztunnel's metrics in the input, a second table shows the L4 side: the
TCP connections the clients' ztunnels (``reporter="source"``) opened to each
service, the share of them in mutual TLS, and their bytes (Istio's
``istio_tcp_received_bytes_total`` is the request direction,
``istio_tcp_sent_bytes_total`` the response's).

The counters are totals since each proxy started (a scrape, not a rate).
Series from several scrapes add up, as ``sum by (destination_service)`` does.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "istio_requests_total"
DURATION_BUCKET = "istio_request_duration_milliseconds_bucket"
MESSAGES_IN = "istio_request_messages_total"
MESSAGES_OUT = "istio_response_messages_total"
TCP_OPENED = "istio_tcp_connections_opened_total"
TCP_SENT = "istio_tcp_sent_bytes_total"
TCP_RECEIVED = "istio_tcp_received_bytes_total"

NO_DATA = """\
no requests reported by a waypoint in the input (istio_requests_total{reporter="waypoint"}).
Is this a waypoint's :15020/stats/prometheus, and has traffic gone through it yet? e.g.
  meshlab exec shop/waypoint -- curl -s http://127.0.0.1:15020/stats/prometheus | \\
      python3 examples/observability/service_table.py"""


@dataclass
class ServiceStats:
    """What the waypoints reported for one destination_service."""

    requests: float = 0.0
    code_4xx: float = 0.0
    code_5xx: float = 0.0
    rate_limited: float = 0.0
    denied: float = 0.0
    messages_in: float = 0.0
    messages_out: float = 0.0
    # Upper bound (le) -> cumulative count, summed over the service's series.
    buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def success_rate(self) -> float:
        """The share of requests not answered 5xx (NaN without requests)."""
        if self.requests <= 0:
            return math.nan
        return (self.requests - self.code_5xx) / self.requests

    def quantile(self, q: float) -> float:
        return histogram_quantile(q, self.buckets.items())


@dataclass
class TcpStats:
    """What the clients' ztunnels reported for one destination_service."""

    connections: float = 0.0
    mtls_connections: float = 0.0
    sent_bytes: float = 0.0
    received_bytes: float = 0.0


@dataclass
class Table:
    services: dict[str, ServiceStats] = field(default_factory=dict)
    tcp: dict[str, TcpStats] = field(default_factory=dict)

    @property
    def has_grpc(self) -> bool:
        return any(s.messages_in or s.messages_out for s in self.services.values())


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """The q-quantile of a histogram's cumulative (upper bound, count) buckets, as
    Prometheus' histogram_quantile computes it: NaN without a +Inf bucket or without
    observations; within the bucket the rank falls in, linear interpolation between its
    bounds (the first bucket's lower bound is 0 when its upper bound is positive); a rank
    in the +Inf bucket gives the highest finite bound."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return math.nan
    # Counts are cumulative; a scrape torn between series can break that: force it, as
    # Prometheus' ensureMonotonic does.
    monotonic: list[tuple[float, float]] = []
    highest = 0.0
    for bound, count in ordered:
        highest = max(highest, count)
        monotonic.append((bound, highest))
    total = monotonic[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    # The first finite bucket whose count reaches the rank, else the +Inf bucket.
    b = next((i for i, (_, c) in enumerate(monotonic[:-1]) if c >= rank), len(monotonic) - 1)
    if b == len(monotonic) - 1:
        return monotonic[-2][0]
    end, count = monotonic[b]
    if b == 0 and end <= 0:
        return end
    start = 0.0
    if b > 0:
        start, below = monotonic[b - 1]
        count -= below
        rank -= below
    if count <= 0:
        return end
    return start + (end - start) * (rank / count)


def parse(text: str) -> Table:
    """The table's numbers from Prometheus text exposition (raises ValueError if the
    text is not that format)."""
    table = Table()

    def service(labels: dict[str, str]) -> ServiceStats:
        name = labels.get("destination_service") or "unknown"
        return table.services.setdefault(name, ServiceStats())

    def tcp(labels: dict[str, str]) -> TcpStats:
        name = labels.get("destination_service") or "unknown"
        return table.tcp.setdefault(name, TcpStats())

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, float(sample.value)
            if math.isnan(value):
                continue
            reporter = labels.get("reporter")
            if reporter == "waypoint":
                if sample.name == REQUESTS:
                    stats = service(labels)
                    code = labels.get("response_code", "")
                    flags = labels.get("response_flags", "-").split(",")
                    stats.requests += value
                    if code.startswith("4"):
                        stats.code_4xx += value
                    elif code.startswith("5"):
                        stats.code_5xx += value
                    if code == "429" or "RL" in flags:
                        stats.rate_limited += value
                    if code == "403":
                        stats.denied += value
                elif sample.name == DURATION_BUCKET and "le" in labels:
                    service(labels).buckets[float(labels["le"])] += value
                elif sample.name == MESSAGES_IN:
                    service(labels).messages_in += value
                elif sample.name == MESSAGES_OUT:
                    service(labels).messages_out += value
            elif reporter == "source":
                if sample.name == TCP_OPENED:
                    stats_tcp = tcp(labels)
                    stats_tcp.connections += value
                    if labels.get("connection_security_policy") == "mutual_tls":
                        stats_tcp.mtls_connections += value
                elif sample.name == TCP_SENT:
                    tcp(labels).sent_bytes += value
                elif sample.name == TCP_RECEIVED:
                    tcp(labels).received_bytes += value
    # A histogram's buckets alone (no requests counter) make no row.
    table.services = {k: v for k, v in table.services.items() if v.requests > 0}
    return table


def _count(value: float) -> str:
    return f"{value:.0f}"


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100.0 * value:.1f}%"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _order(name: str) -> tuple[bool, str]:
    return (name == "unknown", name)


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """Plain columns: the first left-aligned, the numbers right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_table(table: Table) -> str:
    """The table as text: aligned columns, no colours; the helpful message without data."""
    if not table.services:
        return NO_DATA
    header = ["SERVICE", "REQUESTS", "SUCCESS", "4XX", "5XX", "RATE-LIMITED", "DENIED"]
    header += ["P50 MS", "P99 MS"]
    grpc = table.has_grpc
    if grpc:
        header += ["GRPC MSGS IN", "GRPC MSGS OUT"]
    rows = []
    for name in sorted(table.services, key=_order):
        s = table.services[name]
        row = [name, _count(s.requests), _percent(s.success_rate), _count(s.code_4xx)]
        row += [_count(s.code_5xx), _count(s.rate_limited), _count(s.denied)]
        row += [_ms(s.quantile(0.5)), _ms(s.quantile(0.99))]
        if grpc:
            row += [_count(s.messages_in), _count(s.messages_out)]
        rows.append(row)
    lines = ["L7, as the waypoints saw it (totals since each proxy started):"]
    lines += _aligned(header, rows)
    if table.tcp:
        tcp_header = ["SERVICE", "CONNECTIONS", "MTLS", "REQUEST BYTES", "RESPONSE BYTES"]
        tcp_rows = []
        for name in sorted(table.tcp, key=_order):
            t = table.tcp[name]
            mtls = t.mtls_connections / t.connections if t.connections > 0 else math.nan
            tcp_rows.append(
                [
                    name,
                    _count(t.connections),
                    _percent(mtls),
                    _bytes(t.received_bytes),
                    _bytes(t.sent_bytes),
                ]
            )
        lines += ["", "L4, as the clients' ztunnels saw it (reporter=source):"]
        lines += _aligned(tcp_header, tcp_rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="One row per destination_service from a waypoint's (and optionally "
        "ztunnels') Prometheus metrics, read on stdin.",
        epilog="e.g. meshlab exec shop/waypoint -- curl -s "
        "http://127.0.0.1:15020/stats/prometheus | python3 %(prog)s",
    )
    parser.parse_args(argv)
    if sys.stdin.isatty():
        print("service_table.py reads Prometheus metrics on stdin; see --help", file=sys.stderr)
        return 2
    try:
        table = parse(sys.stdin.read())
    except ValueError as e:
        print(
            f"service_table.py: the input is not Prometheus text exposition: {e}", file=sys.stderr
        )
        return 2
    print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
