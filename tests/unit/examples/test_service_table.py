"""examples/observability/service_table.py: its parsing, quantiles and table."""

from __future__ import annotations

import importlib.util
import io
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "examples" / "observability" / "service_table.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("service_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


st = _load()

WP = (
    'reporter="waypoint",destination_service="{svc}",'
    'response_code="{code}",response_flags="{flags}"'
)


def requests(svc: str, code: str, value: float, flags: str = "-") -> str:
    labels = WP.format(svc=svc, code=code, flags=flags)
    return f"istio_requests_total{{{labels}}} {value}\n"


def buckets(svc: str, code: str, counts: dict[str, float]) -> str:
    labels = WP.format(svc=svc, code=code, flags="-")
    return "".join(
        f'istio_request_duration_milliseconds_bucket{{{labels},le="{le}"}} {n}\n'
        for le, n in counts.items()
    )


V1 = "reviews-v1.shop.svc.cluster.local"
REVIEWS = "reviews.shop.svc.cluster.local"
GRPC = "greeter.shop.svc.cluster.local"

WAYPOINT = (
    "# HELP istio_requests_total Requests served\n"
    "# TYPE istio_requests_total counter\n"
    + requests(V1, "200", 90)
    + requests(V1, "503", 10, flags="UF")
    + requests(REVIEWS, "403", 3)
    + requests(REVIEWS, "429", 12, flags="RL")
    + requests(REVIEWS, "404", 1, flags="NR")
    + 'istio_requests_total{reporter="source",destination_service="x",response_code="500"} 7\n'
    + "# TYPE istio_request_duration_milliseconds histogram\n"
    + buckets(V1, "200", {"1.0": 0, "5.0": 60, "10.0": 90, "+Inf": 90})
    + buckets(V1, "503", {"1.0": 10, "5.0": 10, "10.0": 10, "+Inf": 10})
    + buckets(REVIEWS, "403", {"1.0": 3, "5.0": 3, "10.0": 3, "+Inf": 3})
)

GRPC_WAYPOINT = (
    "# TYPE istio_requests_total counter\n"
    + requests(GRPC, "200", 4)
    + "# TYPE istio_request_messages_total counter\n"
    + f'istio_request_messages_total{{reporter="waypoint",destination_service="{GRPC}"}} 8\n'
    + "# TYPE istio_response_messages_total counter\n"
    + f'istio_response_messages_total{{reporter="waypoint",destination_service="{GRPC}"}} 12\n'
)

ZTUNNEL = (
    "# TYPE istio_tcp_connections_opened_total counter\n"
    f'istio_tcp_connections_opened_total{{reporter="source",destination_service="{REVIEWS}",'
    'connection_security_policy="mutual_tls"} 30\n'
    f'istio_tcp_connections_opened_total{{reporter="destination",destination_service="{REVIEWS}",'
    'connection_security_policy="mutual_tls"} 99\n'
    "# TYPE istio_tcp_sent_bytes_total counter\n"
    f'istio_tcp_sent_bytes_total{{reporter="source",destination_service="{REVIEWS}"}} 2048\n'
    "# TYPE istio_tcp_received_bytes_total counter\n"
    f'istio_tcp_received_bytes_total{{reporter="source",destination_service="{REVIEWS}"}} 100\n'
)


# Prometheus' own results for these buckets (histogram_quantile).
@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.5, 1.0),  # the rank is the first bucket's count: its upper bound
        (0.75, 3.0),  # halfway through (1, 5]
        (0.99, 4.92),
        (0.0, 0.0),
    ],
)
def test_quantiles_interpolate_within_the_bucket(q: float, expected: float) -> None:
    got = st.histogram_quantile(q, [(5.0, 20), (math.inf, 20), (1.0, 10)])  # any order
    assert got == pytest.approx(expected)


def test_quantile_edge_cases_are_prometheus_ones() -> None:
    # A rank in the +Inf bucket: the highest finite bound.
    assert st.histogram_quantile(0.9, [(1.0, 10), (math.inf, 20)]) == 1.0
    # No +Inf bucket, a single bucket, no observations: NaN.
    assert math.isnan(st.histogram_quantile(0.5, [(1.0, 10), (5.0, 20)]))
    assert math.isnan(st.histogram_quantile(0.5, [(math.inf, 20)]))
    assert math.isnan(st.histogram_quantile(0.5, [(1.0, 0), (math.inf, 0)]))
    assert st.histogram_quantile(-0.1, [(1.0, 1), (math.inf, 1)]) == -math.inf
    assert st.histogram_quantile(1.1, [(1.0, 1), (math.inf, 1)]) == math.inf
    # Counts that go down (a torn scrape) are made monotonic first.
    assert st.histogram_quantile(0.75, [(1.0, 10), (2.0, 4), (4.0, 20), (math.inf, 20)]) == 3.0


def test_parse_counts_per_destination_service_from_the_waypoint_only() -> None:
    table = st.parse(WAYPOINT)
    assert set(table.services) == {V1, REVIEWS}  # reporter="source" is not a waypoint's
    v1 = table.services[V1]
    assert (v1.requests, v1.code_4xx, v1.code_5xx, v1.rate_limited, v1.denied) == (100, 0, 10, 0, 0)
    assert v1.success_rate == pytest.approx(0.9)
    # 90 under 10 ms, 10 more (the 503s) under 1 ms: p50 halfway through (1, 5].
    assert v1.quantile(0.5) == pytest.approx(1 + 4 * (50 - 10) / 60)
    reviews = table.services[REVIEWS]
    assert (reviews.requests, reviews.code_4xx, reviews.rate_limited, reviews.denied) == (
        16,
        16,
        12,
        3,
    )
    assert reviews.success_rate == 1.0  # 4xx are not failures of the service
    assert not table.has_grpc and not table.tcp


def test_scrapes_concatenated_add_up_and_ztunnel_gives_the_l4_side() -> None:
    table = st.parse(WAYPOINT + WAYPOINT + ZTUNNEL)
    assert table.services[V1].requests == 200
    assert table.services[V1].quantile(0.5) == pytest.approx(1 + 4 * (50 - 10) / 60)
    (name,) = table.tcp
    tcp = table.tcp[name]
    assert name == REVIEWS
    assert (tcp.connections, tcp.mtls_connections, tcp.sent_bytes, tcp.received_bytes) == (
        30,
        30,
        2048,
        100,
    )


def test_rate_limited_by_flag_or_code() -> None:
    table = st.parse(
        "# TYPE istio_requests_total counter\n"
        + requests(REVIEWS, "429", 2)  # a 429 without the flag (e.g. from the backend)
        + requests(REVIEWS, "503", 1, flags="RL")  # the flag with another code
    )
    assert table.services[REVIEWS].rate_limited == 3


def test_the_table_is_plain_aligned_columns() -> None:
    text = st.format_table(st.parse(WAYPOINT + ZTUNNEL))
    assert "\x1b" not in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("SERVICE"))
    l7 = lines[header : header + 3]
    assert l7[0].split() == [
        "SERVICE", "REQUESTS", "SUCCESS", "4XX", "5XX", "RATE-LIMITED", "DENIED", "P50", "MS",
        "P99", "MS",
    ]  # fmt: skip
    # Numbers are right-aligned under their headers (the service names vary in length).
    assert len({len(line) for line in l7}) == 1, l7
    assert l7[1].split() == [V1, "100", "90.0%", "0", "10", "0", "0", "3.7", "9.8"]
    assert l7[2].split() == [REVIEWS, "16", "100.0%", "16", "0", "12", "3", "0.5", "1.0"]
    assert "GRPC" not in text
    assert any(line.split()[:3] == [REVIEWS, "30", "100.0%"] for line in lines[header + 3 :])
    assert "2.0 KiB" in text and "100 B" in text


def test_grpc_columns_appear_with_grpc_traffic() -> None:
    text = st.format_table(st.parse(WAYPOINT + GRPC_WAYPOINT))
    header, *rows = [line for line in text.splitlines() if line.startswith(("SERVICE", "greeter"))]
    assert header.split()[-6:] == ["GRPC", "MSGS", "IN", "GRPC", "MSGS", "OUT"]
    (greeter,) = rows
    assert greeter.split()[-2:] == ["8", "12"]


def test_unknown_service_sorts_last() -> None:
    text = st.format_table(st.parse(requests("unknown", "404", 1) + requests(V1, "200", 1)))
    rows = [line.split()[0] for line in text.splitlines()[2:]]
    assert rows == [V1, "unknown"]


def test_no_data_says_what_to_feed_it(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO(ZTUNNEL))
    monkeypatch.setattr(sys, "stdout", out)
    assert st.main([]) == 0
    assert "no requests reported by a waypoint" in out.getvalue()
    assert "15020/stats/prometheus" in out.getvalue()


def test_input_that_is_not_prometheus_text_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("<html>not metrics</html>\n"))
    assert st.main([]) == 2
    assert "not Prometheus text exposition" in capsys.readouterr().err
