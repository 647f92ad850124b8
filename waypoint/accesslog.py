"""Envoy's access logging for the waypoint: format strings bound once, one line per request.

:mod:`waypoint.config.accesslog` turns an HCM's ``access_log`` into
:class:`~waypoint.config.accesslog.AccessLogConfig` values (format strings
parsed, unknown commands refused); here each becomes an :class:`AccessLogger`:
its format bound once into literal pieces and one function per command, its
filter, its sink. Per request the router hands each logger an
:class:`AccessLogEntry` (the :class:`~waypoint.records.RequestRecord`, the
downstream request headers, the response headers and trailers, and what the
record does not hold, each optional).

Envoy's semantics: a value that is not there is ``-`` in text (``""`` with
``omit_empty_values``); in JSON a value that is one command alone keeps its type
(numbers for RESPONSE_CODE, BYTES_*, *DURATION, UPSTREAM_REQUEST_ATTEMPT_COUNT,
GRPC_STATUS(NUMBER)) and is ``null`` when not there (left out with
``omit_empty_values``); anything else is a string; one object a line, compact,
keys sorted (Envoy 1.40 writes them sorted whatever ``sort_properties``). Durations are whole
milliseconds, truncated. ``%START_TIME%`` is UTC ``%Y-%m-%dT%H:%M:%E3SZ``;
``%START_TIME(FMT)%`` is strftime with Envoy's ``%f``/``%Nf`` (fraction digits),
``%E#S``/``%E*S`` and ``%s``. A line is written whole; writing never raises into
the request path (failures are counted in :attr:`Sink.errors`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from mesh.accesslog_formats import ISTIO_JSON_FORMAT, ISTIO_TEXT_FORMAT
from waypoint.config import accesslog as c
from waypoint.match import RequestView, header_matches
from waypoint.records import RequestRecord

log = logging.getLogger("waypoint.accesslog")
Value = str | int | None
Bound = Callable[["AccessLogEntry"], Value]
HeaderList = Sequence[tuple[str, str]]

# fmt: off
GRPC_NAMES = (
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
)
GRPC_SNAKE = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)
# fmt: on
# Envoy's Grpc::Utility::httpToGrpcStatus, for a response without grpc-status.
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def _by_name(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Each header's first value by its lower case name (what Envoy's formatter reads)."""
    found: dict[str, str] = {}
    for k, v in headers:
        found.setdefault(k.lower(), v)
    return found


@dataclass(slots=True)
class AccessLogEntry:
    """What one access log line reads.

    ``request_headers``: the downstream request's headers as the router left them
    (pseudo-headers ``:path``/``:authority`` given here win over the record's, so
    pass the rewritten ones with ``x-envoy-original-path``, as Envoy logs them);
    ``None``: made from the record (user-agent, x-forwarded-for, x-request-id).
    ``response_headers`` ``None``: ``x-envoy-upstream-service-time`` from the record.
    """

    record: RequestRecord
    request_headers: HeaderList | None = None
    response_headers: HeaderList | None = None
    response_trailers: HeaderList = ()
    scheme: str | None = None
    # Not in RequestRecord; ``None`` falls back on record.info (addresses, peer) or "-".
    downstream_local_address: str | None = None
    downstream_remote_address: str | None = None
    downstream_peer_uri_san: str | None = None
    requested_server_name: str | None = None
    upstream_local_address: str | None = None
    upstream_transport_failure_reason: str | None = None
    connection_termination_details: str | None = None
    upstream_cluster_observability_name: str | None = None
    request_duration_ms: float | None = None
    response_duration_ms: float | None = None
    _request: dict[str, str] | None = field(default=None, init=False, repr=False)
    _response: dict[str, str] | None = field(default=None, init=False, repr=False)
    _trailers: dict[str, str] | None = field(default=None, init=False, repr=False)

    def headers(self) -> list[tuple[str, str]]:
        """The request headers as given, else what the record keeps of them."""
        if self.request_headers is not None:
            return list(self.request_headers)
        rec = self.record
        made = (("user-agent", rec.user_agent), ("x-forwarded-for", rec.forwarded_for))
        return [(k, v) for k, v in made if v]

    def request_header(self, name: str) -> str | None:
        if self._request is None:
            rec = self.record
            found = _by_name(self.headers())
            for k, v in (
                (":method", rec.method),
                (":path", rec.path),
                (":authority", rec.authority),
                (":scheme", self.scheme or ""),
                ("x-request-id", rec.request_id),  # Envoy's request headers carry the one made
            ):
                if v:
                    found.setdefault(k, v)
            self._request = found
        return self._request.get(name)

    def response_header(self, name: str) -> str | None:
        if self._response is None:
            rec = self.record
            if self.response_headers is not None:
                self._response = _by_name(self.response_headers)
            elif rec.upstream_service_ms is not None:
                # What the router sends: whole milliseconds, truncated.
                self._response = {
                    "x-envoy-upstream-service-time": str(int(rec.upstream_service_ms))
                }
            else:
                self._response = {}
            if rec.status:
                self._response.setdefault(":status", str(rec.status))
        return self._response.get(name)

    def trailer(self, name: str) -> str | None:
        if self._trailers is None:
            self._trailers = _by_name(self.response_trailers)
        return self._trailers.get(name)

    def grpc_status(self) -> int | None:
        """Envoy's Grpc::Common::getGrpcStatus: trailers, headers, else from the HTTP status."""
        for raw in (self.trailer("grpc-status"), self.response_header("grpc-status")):
            if raw is not None and raw.isdigit():
                return int(raw)
        if self.response_headers is None and self.record.grpc_status.isdigit():
            return int(self.record.grpc_status)
        status = self.record.status
        return _HTTP_TO_GRPC.get(status, 2) if status else None

    def remote_address(self) -> str | None:
        """As Envoy's HCM without ``use_remote_address``: the last ``x-forwarded-for``
        address (port 0) when it is an IP, else the connection's peer."""
        if self.downstream_remote_address:
            return self.downstream_remote_address
        xff = self.request_header("x-forwarded-for")
        if xff:
            try:
                ip = ipaddress.ip_address(xff.rsplit(",", 1)[-1].strip())
            except ValueError:
                pass
            else:
                return f"[{ip}]:0" if ip.version == 6 else f"{ip}:0"
        return self.info("peer")

    def info(self, key: str) -> str | None:
        value = self.record.info.get(key)
        return str(value) if value else None


# ---------------------------------------------------------------- commands


def _opt(value: str | None) -> str | None:
    return value or None


def _without_port(address: str | None) -> str | None:
    if not address:
        return None
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def _ms(value: float | None) -> int | None:
    return None if value is None else int(value)


def _start_time(arg: str) -> Bound:
    if not arg:

        def default(e: AccessLogEntry) -> Value:
            t = datetime.fromtimestamp(e.record.start, UTC)
            return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"

        return default
    parts = _time_parts(arg)

    def custom(e: AccessLogEntry) -> Value:
        t = datetime.fromtimestamp(e.record.start, UTC)
        nanos = f"{t.microsecond * 1000:09d}"
        out = []
        for kind, text in parts:
            if kind == "strftime":
                out.append(t.strftime(text))
            elif kind == "frac":
                out.append(nanos[: int(text)])
            elif kind == "epoch":
                out.append(str(int(e.record.start)))
            elif kind == "secs":
                frac = nanos[: int(text)] if text != "*" else nanos.rstrip("0")
                out.append(f"{t.second:02d}" + (f".{frac}" if frac else ""))
        return "".join(out)

    return custom


_TIME = re.compile(
    r"(?P<frac>%(?P<n>[1-9])?f)|(?P<epoch>%s)|(?P<secs>%E(?P<p>[0-9*])S)|(?P<strftime>%.|[^%]+|%)"
)


def _time_parts(fmt: str) -> list[tuple[str, str]]:
    """strftime text split around Envoy's (absl's) own specifiers, once."""
    parts: list[tuple[str, str]] = []
    for m in _TIME.finditer(fmt):
        kind = m.lastgroup or "strftime"
        text = {"frac": m.group("n") or "9", "secs": m.group("p"), "epoch": ""}.get(kind)
        if text is None:
            text = "%%" if m.group(0) == "%" else m.group(0)
            if parts and parts[-1][0] == "strftime":
                text = parts.pop()[1] + text
        parts.append((kind, text))
    return parts


def _header(get: Callable[[AccessLogEntry, str], str | None], cmd: c.Command) -> Bound:
    main, alt, limit = cmd.arg, cmd.alt, cmd.max_length

    def header(e: AccessLogEntry) -> Value:
        value = get(e, main)
        if value is None and alt:
            value = get(e, alt)
        if value is not None and limit is not None:
            value = value[:limit]
        return value

    return header


def _grpc(style: str) -> Bound:
    def grpc(e: AccessLogEntry) -> Value:
        req = e.request_header("content-type") or ""
        if not req.startswith("application/grpc"):
            return None
        status = e.grpc_status()
        if status is None:
            return None
        if style == "NUMBER":
            return status
        names = GRPC_SNAKE if style == "SNAKE_STRING" else GRPC_NAMES
        return names[status] if 0 <= status < len(names) else str(status)

    return grpc


def _flags_long(e: AccessLogEntry) -> Value:
    flags = e.record.flags
    if not flags or flags == "-":
        return "-"
    return "".join(c.LONG_FLAGS.get(f, f) for f in flags.split(","))


_WHITESPACE = str.maketrans({ch: "_" for ch in " \t\n\r\v\f"})


def _details(allow_whitespace: bool) -> Bound:
    def details(e: AccessLogEntry) -> Value:
        d = e.record.details
        if not d:
            return None
        return d if allow_whitespace else d.translate(_WHITESPACE)

    return details


def _failure_reason(e: AccessLogEntry) -> Value:
    reason = e.upstream_transport_failure_reason
    return reason.replace(" ", "_") if reason else None


_HOSTNAME = socket.gethostname() or None

_SIMPLE: dict[str, Bound] = {
    "RESPONSE_CODE": lambda e: e.record.status,
    "RESPONSE_FLAGS": lambda e: e.record.flags or "-",
    "RESPONSE_FLAGS_LONG": _flags_long,
    "BYTES_RECEIVED": lambda e: e.record.bytes_received,
    "BYTES_SENT": lambda e: e.record.bytes_sent,
    "DURATION": lambda e: int(e.record.duration_ms),
    "REQUEST_DURATION": lambda e: _ms(e.request_duration_ms),
    "RESPONSE_DURATION": lambda e: _ms(e.response_duration_ms),
    "PROTOCOL": lambda e: _opt(e.record.protocol),
    "UPSTREAM_HOST": lambda e: _opt(e.record.upstream_host),
    "UPSTREAM_CLUSTER": lambda e: e.upstream_cluster_observability_name or _opt(e.record.cluster),
    "UPSTREAM_CLUSTER_RAW": lambda e: _opt(e.record.cluster),
    "UPSTREAM_LOCAL_ADDRESS": lambda e: _opt(e.upstream_local_address),
    "UPSTREAM_TRANSPORT_FAILURE_REASON": _failure_reason,
    "DOWNSTREAM_LOCAL_ADDRESS": lambda e: e.downstream_local_address or e.info("authority"),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda e: _without_port(
        e.downstream_local_address or e.info("authority")
    ),
    "DOWNSTREAM_REMOTE_ADDRESS": AccessLogEntry.remote_address,
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda e: _without_port(e.remote_address()),
    "DOWNSTREAM_PEER_URI_SAN": lambda e: e.downstream_peer_uri_san or e.info("peer_identity"),
    "REQUESTED_SERVER_NAME": lambda e: _opt(e.requested_server_name),
    "ROUTE_NAME": lambda e: _opt(e.record.route),
    "CONNECTION_TERMINATION_DETAILS": lambda e: _opt(e.connection_termination_details),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": lambda e: e.record.attempts,
    "GRPC_STATUS_NUMBER": _grpc("NUMBER"),
    "HOSTNAME": lambda e: _HOSTNAME,
}


def bind(cmd: c.Command) -> Bound:
    """The function that evaluates one command for an entry (``None``: not there)."""
    name = cmd.name
    if name == "START_TIME":
        return _start_time(cmd.arg)
    if name == "REQ":
        return _header(AccessLogEntry.request_header, cmd)
    if name == "RESP":
        return _header(AccessLogEntry.response_header, cmd)
    if name == "TRAILER":
        return _header(AccessLogEntry.trailer, cmd)
    if name == "GRPC_STATUS":
        return _grpc(cmd.arg or "CAMEL_STRING")
    if name == "RESPONSE_CODE_DETAILS":
        return _details(cmd.arg == "ALLOW_WHITESPACES")
    return _SIMPLE[name]


# ---------------------------------------------------------------- formatters

Render = Callable[[AccessLogEntry], str]


def _text(fmt: c.FormatString, empty: str) -> Render:
    parts: list[str | Bound] = [p if isinstance(p, str) else bind(p) for p in fmt.pieces]
    if len(parts) == 1 and isinstance(parts[0], str):
        literal = parts[0]
        return lambda e: literal

    def render(e: AccessLogEntry) -> str:
        out = []
        for p in parts:
            if isinstance(p, str):
                out.append(p)
            else:
                v = p(e)
                out.append(empty if v is None else v if isinstance(v, str) else str(v))
        return "".join(out)

    return render


_Json = Callable[[AccessLogEntry], Any]
_OMIT = object()


def _key(item: tuple[str, c.JsonNode]) -> str:
    return item[0]


def _json_node(node: c.JsonNode, omit: bool) -> _Json:
    if isinstance(node, float):
        number: Any = int(node) if node.is_integer() else node
        return lambda e: number
    if isinstance(node, c.FormatString):
        pieces = node.pieces
        if len(pieces) == 1 and isinstance(pieces[0], c.Command):
            typed = bind(pieces[0])
            if omit:
                return lambda e: _OMIT if (v := typed(e)) is None else v
            return typed
        return _text(node, "" if omit else "-")
    if isinstance(node, c.JsonList):
        items = [_json_node(x, omit) for x in node.items]
        return lambda e: [v for f in items if (v := f(e)) is not _OMIT]
    # Keys sorted, sort_properties or not: what Envoy 1.40 writes (an xDS Struct is a map).
    bound = [(k, _json_node(v, omit)) for k, v in sorted(node.fields, key=_key)]
    return lambda e: {k: v for k, f in bound if (v := f(e)) is not _OMIT}


class Formatter:
    """A log format bound once; :meth:`format` makes the line (with its newline, if any)."""

    def __init__(self, fmt: c.LogFormat) -> None:
        self.config = fmt
        if isinstance(fmt, c.TextFormat):
            self._render: Render = _text(fmt.format, "" if fmt.omit_empty_values else "-")
        else:
            node = _json_node(fmt.struct, fmt.omit_empty_values)
            dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
            self._render = lambda e: dumps(node(e)) + "\n"

    def format(self, entry: AccessLogEntry) -> str:
        return self._render(entry)


def compile_text(text: str, *, omit_empty_values: bool = False) -> Formatter:
    """A text format string, parsed and bound (raises Unsupported for what is not supported)."""
    return Formatter(c.TextFormat(c.parse_format(text, "format"), omit_empty_values))


def istio_formatter(as_json: bool = False) -> Formatter:
    """Istio's default line (text), or its JSON fields: the waypoint's ``--access-log``."""
    if not as_json:
        return compile_text(ISTIO_TEXT_FORMAT)
    fields = tuple((k, c.parse_format(v, k)) for k, v in ISTIO_JSON_FORMAT)
    return Formatter(c.JsonFormat(c.JsonStruct(fields)))


# ---------------------------------------------------------------- filters


def _compare(op: str, actual: int, value: int) -> bool:
    if op == c.Op.EQ:
        return actual == value
    if op == c.Op.GE:
        return actual >= value
    if op == c.Op.LE:
        return actual <= value
    return actual != value


def passes(f: c.LogFilter | None, e: AccessLogEntry) -> bool:
    """Envoy's AccessLog::Filter::evaluate."""
    if f is None or isinstance(f, c.NotHealthCheckFilter):
        return True
    if isinstance(f, c.StatusCodeFilter):
        return _compare(f.op, e.record.status, f.value)
    if isinstance(f, c.DurationFilter):
        return _compare(f.op, int(e.record.duration_ms), f.value_ms)
    if isinstance(f, c.ResponseFlagFilter):
        flags = e.record.flags
        if not flags or flags == "-":
            return False
        return not f.flags or any(x in f.flags for x in flags.split(","))
    if isinstance(f, c.GrpcStatusFilter):
        status = e.grpc_status()
        found = (2 if status is None else status) in f.statuses
        return found != f.exclude
    if isinstance(f, c.HeaderFilter):
        return header_matches(_request_view(e), f.header)
    if isinstance(f, c.AndFilter):
        return all(passes(x, e) for x in f.filters)
    return any(passes(x, e) for x in f.filters)


def _request_view(e: AccessLogEntry) -> RequestView:
    """The entry's request headers as the route matcher sees a request."""
    rec = e.record
    headers = [(k.lower(), v) for k, v in e.headers()]
    if rec.request_id and not any(k == "x-request-id" for k, _ in headers):
        headers.append(("x-request-id", rec.request_id))
    scheme = e.scheme or "http"
    return RequestView(rec.method, rec.path, rec.authority, scheme, headers)


# ---------------------------------------------------------------- sinks


class Sink:
    """Where one path's lines go: stdout, stderr, or a file opened for append."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.errors = 0
        self.lines = 0
        self._file: IO[str] | None = None
        self._lock = threading.Lock()

    def _stream(self) -> IO[str]:
        if self.path == c.STDOUT:
            return sys.stdout
        if self.path == c.STDERR:
            return sys.stderr
        if self._file is None:
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        return self._file

    def write(self, line: str) -> None:
        """Never raises: a failed write is counted, and a file is reopened on the next line."""
        try:
            with self._lock:
                stream = self._stream()
                stream.write(line)
                if stream is not self._file:
                    stream.flush()
            self.lines += 1
        except (OSError, ValueError) as e:
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                log.warning(
                    "waypoint: access log %s: %s (%d failed writes)", self.path, e, self.errors
                )
            self.close()

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


_SINKS: dict[str, Sink] = {}


def sink_for(path: str) -> Sink:
    """One sink per path, shared by every logger writing there."""
    s = _SINKS.get(path)
    if s is None:
        s = _SINKS[path] = Sink(path)
    return s


def close_all() -> None:
    """Close every file the access logs opened (the waypoint's drain; tests); a later
    line opens its file again."""
    for sink in _SINKS.values():
        sink.close()
    _SINKS.clear()
    _LOGGERS.clear()


class AccessLogger:
    """One HCM ``access_log`` entry, ready: filter, bound format, sink."""

    def __init__(self, config: c.AccessLogConfig, sink: Sink | None = None) -> None:
        self.config = config
        self.filter = config.filter
        self.formatter = Formatter(config.format)
        self.sink = sink if sink is not None else sink_for(config.path)

    def log(self, entry: AccessLogEntry) -> None:
        """Filter, format, write; never raises into the request path."""
        try:
            if passes(self.filter, entry):
                self.sink.write(self.formatter.format(entry))
        except Exception:  # a bug here must not fail the request
            self.sink.errors += 1
            log.exception("waypoint: access log %s failed", self.config.name or self.config.path)


_LOGGERS: dict[c.AccessLogConfig, AccessLogger] = {}


def loggers(configs: Iterable[c.AccessLogConfig]) -> tuple[AccessLogger, ...]:
    """The loggers of an HCM's configs, bound once per distinct config (cached by value)."""
    out = []
    for config in configs:
        try:
            found = _LOGGERS.get(config)
        except TypeError:  # an unhashable part (a compiled regex): bind it anew
            out.append(AccessLogger(config))
            continue
        if found is None:
            if len(_LOGGERS) > 256:
                _LOGGERS.clear()
            found = _LOGGERS[config] = AccessLogger(config)
        out.append(found)
    return tuple(out)
