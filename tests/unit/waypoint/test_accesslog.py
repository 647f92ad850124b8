"""Envoy's access logging: HCM ``access_log`` conversion, format strings, filters, sinks.

The Envoy differential (tests/interop/test_envoy_waypoint_accesslog.py) checks
the same operators against a real Envoy; here every operator, the edge cases
and the refusals, without processes.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from envoy.config.accesslog.v3 import accesslog_pb2
from google.protobuf import json_format

from mesh.accesslog_formats import ISTIO_JSON_FORMAT, ISTIO_TEXT_FORMAT
from waypoint.accesslog import (
    AccessLogEntry,
    AccessLogger,
    Formatter,
    Sink,
    compile_text,
    istio_formatter,
    loggers,
    passes,
)
from waypoint.config import accesslog as c
from waypoint.config.checks import Unsupported
from waypoint.records import RequestRecord

FILE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
STDOUT = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
STDERR = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog"
# istio pilot/pkg/model/telemetry_logging.go EnvoyTextLogFormat
ISTIO_TEXT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% '
    '%PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% '
    "%RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% '
    '%DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" '
    '"%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" '
    "%UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% "
    "%DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"
)
START = 1764816291.123456  # 2025-12-04T02:44:51.123456Z


def served(**kw: Any) -> RequestRecord:
    fields: dict[str, Any] = dict(
        start=START,
        method="GET",
        path="/items/1?x=1",
        protocol="HTTP/1.1",
        authority="reviews.shop:9080",
        status=200,
        details="via_upstream",
        bytes_received=3,
        bytes_sent=120,
        duration_ms=12.9,
        upstream_service_ms=10.7,
        upstream_host="10.1.0.7:9080",
        cluster="inbound-vip|9080|http|reviews.shop.svc.cluster.local",
        route="shop.r.0",
        attempts=2,
        user_agent="curl/8.5.0",
        request_id="7d1b3c1e-0000-4000-8000-000000000001",
        forwarded_for="203.0.113.7",
        info={
            "authority": "10.96.0.20:9080",
            "peer": "10.0.0.9:40000",
            "peer_identity": "spiffe://cluster.local/ns/shop/sa/frontend",
        },
    )
    fields.update(kw)
    return RequestRecord(**fields)


def fmt(text: str, entry: AccessLogEntry | RequestRecord, *, omit: bool = False) -> str:
    if isinstance(entry, RequestRecord):
        entry = AccessLogEntry(entry)
    return compile_text(text, omit_empty_values=omit).format(entry)


# ---------------------------------------------------------------- parsing


def test_a_format_is_literal_pieces_and_commands() -> None:
    parsed = c.parse_format("a %REQ(X-A?X-B):5% 100%% %START_TIME(%s)%", "w")
    assert parsed.pieces == (
        "a ",
        c.Command("REQ", "x-a", "x-b", 5),
        " 100% ",
        c.Command("START_TIME", "%s"),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("%NOPE%", "%NOPE% is not supported"),
        ("%DYNAMIC_METADATA(istio:x)%", "%DYNAMIC_METADATA%"),
        ("%CEL(request.path)%", "%CEL%"),
        ("%FILTER_STATE(k:PLAIN)%", "%FILTER_STATE%"),
        ("50% off", "no valid command at position 2"),
        ("%REQ%", "%REQ% requires a parameter"),
        ("%DURATION(x)%", "%DURATION% takes no parameters"),
        ("%BYTES_SENT:3%", "%BYTES_SENT% does not take a length"),
        ("%REQ(A?B?C)%", "only one alternative header"),
        ("%GRPC_STATUS(LOUD)%", "CAMEL_STRING, SNAKE_STRING or NUMBER"),
        ("%RESPONSE_CODE_DETAILS(X)%", "ALLOW_WHITESPACES"),
    ],
)
def test_what_is_not_supported_is_refused_at_config_time(text: str, message: str) -> None:
    with pytest.raises(Unsupported, match=r"^where: ") as e:
        c.parse_format(text, "where")
    assert message in str(e.value)


# ---------------------------------------------------------------- operators


def test_every_request_level_operator() -> None:
    entry = AccessLogEntry(
        served(),
        request_headers=[("User-Agent", "curl/8.5.0"), ("x-forwarded-for", "203.0.113.7")],
        response_headers=[("x-envoy-upstream-service-time", "10"), ("x-resp", "r")],
        response_trailers=[("x-trailer", "t")],
        downstream_local_address="10.96.0.20:9080",
        downstream_remote_address="10.0.0.9:40000",
        requested_server_name="outbound_.9080_._.reviews",
        upstream_local_address="10.1.0.2:51000",
        upstream_transport_failure_reason="",
        connection_termination_details="closed",
        request_duration_ms=1.9,
        response_duration_ms=11.2,
    )
    expected = {
        "%REQ(:METHOD)%": "GET",
        "%REQ(:PATH)%": "/items/1?x=1",
        "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%": "/items/1?x=1",
        "%REQ(:AUTHORITY)%": "reviews.shop:9080",
        "%REQ(user-agent)%": "curl/8.5.0",
        "%REQ(USER-AGENT):4%": "curl",
        "%REQ(X-NONE?USER-AGENT):2%": "cu",
        "%REQ(X-REQUEST-ID)%": "7d1b3c1e-0000-4000-8000-000000000001",
        "%REQ(X-NONE)%": "-",
        "%RESP(X-RESP)%": "r",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%": "10",
        "%TRAILER(X-TRAILER)%": "t",
        "%TRAILER(X-NONE)%": "-",
        "%RESPONSE_CODE%": "200",
        "%RESPONSE_CODE_DETAILS%": "via_upstream",
        "%RESPONSE_FLAGS%": "-",
        "%RESPONSE_FLAGS_LONG%": "-",
        "%BYTES_RECEIVED%": "3",
        "%BYTES_SENT%": "120",
        "%DURATION%": "12",  # whole milliseconds, truncated as Envoy's
        "%REQUEST_DURATION%": "1",
        "%RESPONSE_DURATION%": "11",
        "%PROTOCOL%": "HTTP/1.1",
        "%UPSTREAM_HOST%": "10.1.0.7:9080",
        "%UPSTREAM_CLUSTER%": "inbound-vip|9080|http|reviews.shop.svc.cluster.local",
        "%UPSTREAM_CLUSTER_RAW%": "inbound-vip|9080|http|reviews.shop.svc.cluster.local",
        "%UPSTREAM_LOCAL_ADDRESS%": "10.1.0.2:51000",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%": "-",
        "%DOWNSTREAM_LOCAL_ADDRESS%": "10.96.0.20:9080",
        "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%": "10.96.0.20",
        "%DOWNSTREAM_REMOTE_ADDRESS%": "10.0.0.9:40000",
        "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%": "10.0.0.9",
        "%DOWNSTREAM_PEER_URI_SAN%": "spiffe://cluster.local/ns/shop/sa/frontend",
        "%REQUESTED_SERVER_NAME%": "outbound_.9080_._.reviews",
        "%ROUTE_NAME%": "shop.r.0",
        "%CONNECTION_TERMINATION_DETAILS%": "closed",
        "%UPSTREAM_REQUEST_ATTEMPT_COUNT%": "2",
        "%GRPC_STATUS%": "-",  # not a gRPC request
        "%GRPC_STATUS_NUMBER%": "-",
        "%HOSTNAME%": socket.gethostname(),
        "%%": "%",
        "%START_TIME%": "2025-12-04T02:44:51.123Z",
    }
    line = "\x1f".join(expected)
    assert fmt(line, entry).split("\x1f") == list(expected.values())


def test_what_is_not_there_is_a_dash_or_empty_with_omit_empty_values() -> None:
    empty = RequestRecord(start=START)
    text = (
        "%REQ(:METHOD)%|%REQ(USER-AGENT)%|%RESP(X-A)%|%RESPONSE_CODE_DETAILS%|%UPSTREAM_HOST%|"
        "%UPSTREAM_CLUSTER%|%ROUTE_NAME%|%DOWNSTREAM_REMOTE_ADDRESS%|%DOWNSTREAM_PEER_URI_SAN%|"
        "%REQUEST_DURATION%|%RESPONSE_DURATION%|%REQUESTED_SERVER_NAME%|%RESPONSE_CODE%|"
        "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"
    )
    assert fmt(text, empty) == "-|-|-|-|-|-|-|-|-|-|-|-|0|0"
    assert fmt(text, empty, omit=True) == "||||||||||||0|0"


def test_start_time_with_a_format() -> None:
    rec = served()
    cases = {
        "%START_TIME(%Y/%m/%d %H:%M:%S)%": "2025/12/04 02:44:51",
        "%START_TIME(%s)%": "1764816291",
        "%START_TIME(%3f)%": "123",
        "%START_TIME(%6f)%": "123456",
        "%START_TIME(%9f)%": "123456000",
        "%START_TIME(%f)%": "123456000",
        "%START_TIME(%1f)%": "1",
        "%START_TIME(%H:%M:%E3S)%": "02:44:51.123",
        "%START_TIME(%E*S)%": "51.123456",
        "%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%": "2025-12-04T02:44:51.123Z",
        "%START_TIME(%%s literal)%": "%s literal",
    }
    for text, want in cases.items():
        assert fmt(text, rec) == want, text


def test_response_code_details_has_no_whitespace_unless_allowed() -> None:
    rec = served(details="upstream_reset_before_response_started{connection failure}")
    assert fmt("%RESPONSE_CODE_DETAILS%", rec) == (
        "upstream_reset_before_response_started{connection_failure}"
    )
    assert fmt("%RESPONSE_CODE_DETAILS(ALLOW_WHITESPACES)%", rec) == (
        "upstream_reset_before_response_started{connection failure}"
    )
    reason = AccessLogEntry(served(), upstream_transport_failure_reason="TLS error: 268435581")
    assert fmt("%UPSTREAM_TRANSPORT_FAILURE_REASON%", reason) == "TLS_error:_268435581"


def test_response_flags_short_and_long() -> None:
    rec = served(status=503, flags="UF,URX")
    assert fmt("%RESPONSE_FLAGS% %RESPONSE_FLAGS_LONG%", rec) == (
        "UF,URX UpstreamConnectionFailureUpstreamRetryLimitExceeded"
    )


def test_grpc_status_from_trailers_headers_or_the_http_status() -> None:
    grpc = [("content-type", "application/grpc")]
    text = "%GRPC_STATUS% %GRPC_STATUS(NUMBER)% %GRPC_STATUS(SNAKE_STRING)% %GRPC_STATUS_NUMBER%"
    trailers = AccessLogEntry(
        served(),
        request_headers=grpc,
        response_headers=[],
        response_trailers=[("grpc-status", "5")],
    )
    assert fmt(text, trailers) == "NotFound 5 NOT_FOUND 5"
    headers = AccessLogEntry(
        served(), request_headers=grpc, response_headers=[("grpc-status", "0")]
    )
    assert fmt(text, headers) == "OK 0 OK 0"
    inferred = AccessLogEntry(served(status=503), request_headers=grpc, response_headers=[])
    assert fmt(text, inferred) == "Unavailable 14 UNAVAILABLE 14"
    custom = AccessLogEntry(
        served(), request_headers=grpc, response_trailers=[("grpc-status", "42")]
    )
    assert fmt("%GRPC_STATUS%", custom) == "42"
    recorded = AccessLogEntry(served(grpc_status="7"), request_headers=grpc)
    assert fmt("%GRPC_STATUS%", recorded) == "PermissionDenied"


def test_the_downstream_remote_address_is_the_last_forwarded_for_as_envoy_s() -> None:
    """HCM without use_remote_address, no trusted hops: the last XFF address, port 0."""
    rec = served(forwarded_for="198.51.100.1, 203.0.113.7")
    assert fmt("%DOWNSTREAM_REMOTE_ADDRESS%", rec) == "203.0.113.7:0"
    v6 = AccessLogEntry(served(), request_headers=[("x-forwarded-for", "2001:db8::1")])
    assert fmt("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", v6) == (
        "[2001:db8::1]:0 2001:db8::1"
    )
    garbage = served(forwarded_for="unknown")
    assert fmt("%DOWNSTREAM_REMOTE_ADDRESS%", garbage) == "10.0.0.9:40000"
    given = AccessLogEntry(served(), downstream_remote_address="[::1]:5")
    assert fmt("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", given) == "::1"


def test_envoy_s_default_format() -> None:
    assert fmt(c.DEFAULT_FORMAT, served()) == (
        '[2025-12-04T02:44:51.123Z] "GET /items/1?x=1 HTTP/1.1" 200 - 3 120 12 10 '
        '"203.0.113.7" "curl/8.5.0" "7d1b3c1e-0000-4000-8000-000000000001" '
        '"reviews.shop:9080" "10.1.0.7:9080"\n'
    )


@pytest.mark.parametrize(
    "rec",
    [
        served(duration_ms=12.25, upstream_service_ms=10.2, forwarded_for=""),
        served(
            status=404,
            flags="NR",
            details="route_not_found",
            upstream_host="",
            cluster="",
            route="",
            upstream_service_ms=None,
            user_agent="",
            forwarded_for="",
            attempts=0,
            duration_ms=0.4,
        ),
        served(
            status=503,
            flags="UF,URX",
            details="upstream_reset_before_response_started",
            duration_ms=30.0,
            upstream_service_ms=None,
            forwarded_for="",
        ),
        served(
            protocol="HTTP/2", info={}, duration_ms=1.1, upstream_service_ms=0.3, forwarded_for=""
        ),
    ],
    ids=["ok", "no-route", "failed", "h2-no-info"],
)
def test_istio_s_text_format_is_the_waypoint_s_own_line(rec: RequestRecord) -> None:
    """The --access-log line is Istio's format string (mesh.accesslog_formats), compiled."""
    assert fmt(ISTIO_TEXT, rec) == istio_formatter().format(AccessLogEntry(rec))
    assert ISTIO_TEXT == ISTIO_TEXT_FORMAT


def test_the_line_has_envoy_s_semantics() -> None:
    """Envoy truncates the milliseconds and, without use_remote_address, takes the last
    x-forwarded-for address (port 0) as the downstream remote address."""
    rec = served(duration_ms=12.9, upstream_service_ms=10.7, forwarded_for="203.0.113.7")
    ours = fmt(ISTIO_TEXT, rec)
    assert ' 3 120 12 10 "203.0.113.7" ' in ours
    assert " 10.96.0.20:9080 203.0.113.7:0 - shop.r.0\n" in ours


def test_the_json_line_has_istio_s_fields() -> None:
    line = istio_formatter(as_json=True).format(AccessLogEntry(served()))
    doc = json.loads(line)
    assert list(doc) == sorted(k for k, _ in ISTIO_JSON_FORMAT)
    assert isinstance(doc["response_code"], int) and isinstance(doc["duration"], int)


# ---------------------------------------------------------------- JSON


def json_formatter(doc: dict[str, Any], omit: bool = False) -> Formatter:
    f = accesslog_pb2.AccessLog()
    json_format.ParseDict(
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": STDOUT,
                "log_format": {"json_format": doc, "omit_empty_values": omit},
            },
        },
        f,
    )
    (config,) = c.access_logs([f], "hcm")
    return Formatter(config.format)


JSON_DOC = {
    "code": "%RESPONSE_CODE%",
    "sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "grpc": "%GRPC_STATUS(NUMBER)%",
    "method": "%REQ(:METHOD)%",
    "missing": "%REQ(X-NONE)%",
    "sni": "%REQUESTED_SERVER_NAME%",
    "line": "%REQ(:METHOD)% %RESPONSE_CODE% %REQ(X-NONE)%",
    "literal": "waypoint",
    "number": 1.5,
    "integer": 3,
    "nested": {"flags": "%RESPONSE_FLAGS%", "none": "%UPSTREAM_LOCAL_ADDRESS%"},
    "list": ["%ROUTE_NAME%", "%REQ(X-NONE)%", 2],
}


def test_json_keeps_types_and_writes_null_for_what_is_not_there() -> None:
    line = json_formatter(JSON_DOC).format(AccessLogEntry(served()))
    assert line.endswith("}\n") and "\n" not in line[:-1]
    assert line.startswith('{"attempts":2,"code":200,')  # compact, keys sorted as Envoy's
    assert json.loads(line) == {
        "code": 200,
        "sent": 120,
        "duration": 12,
        "attempts": 2,
        "grpc": None,
        "method": "GET",
        "missing": None,
        "sni": None,
        "line": "GET 200 -",
        "literal": "waypoint",
        "number": 1.5,
        "integer": 3,
        "nested": {"flags": "-", "none": None},
        "list": ["shop.r.0", None, 2],
    }


def test_json_omit_empty_values_drops_what_is_not_there() -> None:
    line = json_formatter(JSON_DOC, omit=True).format(AccessLogEntry(served()))
    doc = json.loads(line)
    assert "missing" not in doc and "sni" not in doc and "grpc" not in doc
    assert doc["line"] == "GET 200 "
    assert doc["nested"] == {"flags": "-"}
    assert doc["list"] == ["shop.r.0", 2]


def test_json_refuses_booleans() -> None:
    with pytest.raises(Unsupported, match=r"json_format\.flag: only strings"):
        json_formatter({"flag": True})


# ---------------------------------------------------------------- filters


def log_filter(doc: dict[str, Any]) -> c.LogFilter:
    return c.log_filter(json_format.ParseDict(doc, accesslog_pb2.AccessLogFilter()), "f")


def status(op: str, value: int) -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {"op": op, "value": {"default_value": value}}}}


@pytest.mark.parametrize(
    ("op", "value", "passing"),
    [
        ("GE", 400, [404, 503]),
        ("LE", 200, [0, 200]),
        ("EQ", 404, [404]),
        ("NE", 200, [0, 404, 503]),
    ],
)
def test_status_code_filter(op: str, value: int, passing: list[int]) -> None:
    f = log_filter(
        {
            "status_code_filter": {
                "comparison": {"op": op, "value": {"default_value": value, "runtime_key": "rk"}}
            }
        }
    )
    got = [s for s in (0, 200, 404, 503) if passes(f, AccessLogEntry(served(status=s)))]
    assert got == passing


def test_duration_response_flag_and_or_filters() -> None:
    slow = log_filter(
        {"duration_filter": {"comparison": {"op": "GE", "value": {"default_value": 100}}}}
    )
    assert passes(slow, AccessLogEntry(served(duration_ms=100.2)))
    assert not passes(slow, AccessLogEntry(served(duration_ms=99.9)))
    any_flag = log_filter({"response_flag_filter": {}})
    uf = log_filter({"response_flag_filter": {"flags": ["UF", "UH"]}})
    assert not passes(any_flag, AccessLogEntry(served()))
    assert passes(any_flag, AccessLogEntry(served(flags="NR")))
    assert passes(uf, AccessLogEntry(served(flags="UF,URX")))
    assert not passes(uf, AccessLogEntry(served(flags="NR")))
    both = log_filter(
        {"and_filter": {"filters": [status("GE", 500), {"response_flag_filter": {}}]}}
    )
    either = log_filter(
        {"or_filter": {"filters": [status("EQ", 404), {"not_health_check_filter": {}}]}}
    )
    assert passes(both, AccessLogEntry(served(status=503, flags="UF")))
    assert not passes(both, AccessLogEntry(served(status=503)))
    assert passes(either, AccessLogEntry(served()))


def test_header_filter() -> None:
    present = log_filter({"header_filter": {"header": {"name": "X-Debug"}}})
    exact = log_filter(
        {"header_filter": {"header": {"name": "user-agent", "string_match": {"prefix": "curl"}}}}
    )
    inverted = log_filter(
        {
            "header_filter": {
                "header": {
                    "name": ":method",
                    "string_match": {"exact": "GET"},
                    "invert_match": True,
                }
            }
        }
    )
    debug = AccessLogEntry(served(), request_headers=[("X-Debug", "1")])
    assert passes(present, debug) and not passes(present, AccessLogEntry(served()))
    assert passes(exact, AccessLogEntry(served()))
    assert not passes(exact, AccessLogEntry(served(user_agent="Mozilla/5.0")))
    assert not passes(inverted, AccessLogEntry(served()))
    assert passes(inverted, AccessLogEntry(served(method="POST")))


def test_grpc_status_filter() -> None:
    f = log_filter({"grpc_status_filter": {"statuses": ["NOT_FOUND", "UNAVAILABLE"]}})
    excluded = log_filter({"grpc_status_filter": {"statuses": ["OK"], "exclude": True}})
    not_found = AccessLogEntry(served(), response_trailers=[("grpc-status", "5")])
    ok = AccessLogEntry(served(), response_trailers=[("grpc-status", "0")])
    assert passes(f, not_found) and not passes(f, ok)
    assert passes(f, AccessLogEntry(served(status=503), response_headers=[]))
    assert passes(excluded, not_found) and not passes(excluded, ok)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"runtime_filter": {"runtime_key": "k"}}, "f.runtime_filter"),
        ({"traceable_filter": {}}, "f.traceable_filter"),
        (
            {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel"}},
            "f.extension_filter",
        ),
        ({"metadata_filter": {}}, "f.metadata_filter"),
        ({"response_flag_filter": {"flags": ["ZZ"]}}, "f.response_flag_filter.flags"),
        (
            {
                "and_filter": {
                    "filters": [
                        {"runtime_filter": {"runtime_key": "k"}},
                        {"not_health_check_filter": {}},
                    ]
                }
            },
            "f.and_filter.filters[0].runtime_filter",
        ),
        ({}, "f: an access log filter needs a filter"),
    ],
)
def test_unsupported_filters_are_refused_naming_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(Unsupported) as e:
        log_filter(doc)
    assert str(e.value).startswith(field)


# ---------------------------------------------------------------- loggers and sinks


def convert(*docs: dict[str, Any]) -> tuple[c.AccessLogConfig, ...]:
    return c.access_logs([json_format.ParseDict(d, accesslog_pb2.AccessLog()) for d in docs], "hcm")


def test_file_stdout_and_stderr_loggers() -> None:
    file_default, file_text, file_old, out, err = convert(
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {"@type": FILE, "path": "/tmp/a.log"},
        },
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": FILE,
                "path": "/dev/stdout",
                "log_format": {
                    "text_format_source": {"inline_string": "%RESPONSE_CODE%\n"},
                    "content_type": "text/plain",
                },
            },
        },
        {
            "typed_config": {
                "@type": FILE,
                "path": "/p",
                "log_format": {"text_format": "%PROTOCOL%"},
            }
        },
        {"name": "envoy.access_loggers.stdout", "typed_config": {"@type": STDOUT}},
        {"name": "envoy.access_loggers.stderr", "typed_config": {"@type": STDERR}},
    )
    assert (file_default.path, file_default.format) == ("/tmp/a.log", c.default_format())
    assert file_text.path == "/dev/stdout" and file_text.name == "envoy.access_loggers.file"
    assert Formatter(file_text.format).format(AccessLogEntry(served())) == "200\n"
    assert Formatter(file_old.format).format(AccessLogEntry(served())) == "HTTP/1.1"
    assert (out.path, out.format) == ("/dev/stdout", c.default_format())
    assert err.path == "/dev/stderr"


@pytest.mark.parametrize(
    ("typed", "field"),
    [
        ({"@type": FILE}, "hcm.access_log[0].typed_config.path: is required"),
        (
            {"@type": FILE, "path": "/p", "json_format": {}},
            "hcm.access_log[0].typed_config.json_format",
        ),
        (
            {"@type": FILE, "path": "/p", "log_format": {"text_format_source": {"filename": "/f"}}},
            "hcm.access_log[0].typed_config.log_format.text_format_source.filename",
        ),
        (
            {"@type": FILE, "path": "/p", "log_format": {"text_format": "%X_Y%"}},
            "hcm.access_log[0].typed_config.log_format.text_format: command operator %X_Y%",
        ),
        (
            {
                "@type": FILE,
                "path": "/p",
                "log_format": {
                    "text_format": "x",
                    "formatters": [{"name": "envoy.formatter.req_without_query"}],
                },
            },
            "hcm.access_log[0].typed_config.log_format.formatters",
        ),
        (
            {
                "@type": "type.googleapis.com/"
                "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
            },
            "hcm.access_log[0].typed_config: access logger",
        ),
    ],
)
def test_unsupported_loggers_are_refused_naming_the_field(
    typed: dict[str, Any], field: str
) -> None:
    doc = {"name": "x", "typed_config": typed}
    try:
        msg = accesslog_pb2.AccessLog()
        json_format.ParseDict(doc, msg)
    except json_format.ParseError:  # a type the protobuf registry does not hold
        msg = accesslog_pb2.AccessLog(name="x")
        msg.typed_config.type_url = typed["@type"]
    with pytest.raises(Unsupported) as e:
        c.access_logs([msg], "hcm")
    assert str(e.value).startswith(field)


def test_a_file_sink_appends_whole_lines(tmp_path: Path) -> None:
    (config,) = convert(
        {
            "typed_config": {
                "@type": FILE,
                "path": str(tmp_path / "access.log"),
                "log_format": {
                    "text_format_source": {"inline_string": "%RESPONSE_CODE% %ROUTE_NAME%\n"}
                },
            },
            "filter": status("GE", 400),
        }
    )
    (tmp_path / "access.log").write_text("before\n")
    logger = AccessLogger(config, Sink(config.path))
    logger.log(AccessLogEntry(served()))
    logger.log(AccessLogEntry(served(status=404, route="")))
    logger.sink.close()
    assert (tmp_path / "access.log").read_text() == "before\n404 -\n"
    assert (logger.sink.lines, logger.sink.errors) == (1, 0)


def test_stdout_and_stderr_sinks(capsys: pytest.CaptureFixture[str]) -> None:
    out, err = convert({"typed_config": {"@type": STDOUT}}, {"typed_config": {"@type": STDERR}})
    AccessLogger(out, Sink(out.path)).log(AccessLogEntry(served()))
    AccessLogger(err, Sink(err.path)).log(AccessLogEntry(served(status=503)))
    captured = capsys.readouterr()
    assert captured.out.startswith("[2025-12-04T02:44:51.123Z] ") and " 200 " in captured.out
    assert " 503 " in captured.err


def test_a_failed_write_is_counted_never_raised(tmp_path: Path) -> None:
    (config,) = convert(
        {"typed_config": {"@type": FILE, "path": str(tmp_path / "no" / "such.log")}}
    )
    logger = AccessLogger(config, Sink(config.path))
    logger.log(AccessLogEntry(served()))
    logger.log(AccessLogEntry(served()))
    assert (logger.sink.errors, logger.sink.lines) == (2, 0)
    (tmp_path / "no").mkdir()
    logger.log(AccessLogEntry(served()))  # reopened on the next line
    logger.sink.close()
    assert logger.sink.lines == 1 and (tmp_path / "no" / "such.log").read_text().count("\n") == 1


def test_a_broken_entry_does_not_fail_the_request(tmp_path: Path) -> None:
    (config,) = convert({"typed_config": {"@type": FILE, "path": str(tmp_path / "a.log")}})
    logger = AccessLogger(config, Sink(config.path))
    logger.log(AccessLogEntry(served(start="not a time")))
    logger.sink.close()
    assert logger.sink.errors == 1


def test_loggers_are_bound_once_per_config() -> None:
    configs = convert({"typed_config": {"@type": STDOUT}}, {"typed_config": {"@type": STDERR}})
    first = loggers(configs)
    again = loggers(
        convert({"typed_config": {"@type": STDOUT}}, {"typed_config": {"@type": STDERR}})
    )
    assert first == again and first[0].sink is again[0].sink
    assert first[0].sink is not first[1].sink
