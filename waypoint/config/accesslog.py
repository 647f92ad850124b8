"""Envoy's HCM ``access_log`` entries -> the waypoint's access log model.

``envoy.config.accesslog.v3.AccessLog`` as istiod writes it for the Telemetry
API and meshConfig (``accessLogFile``, ``accessLogFormat``,
``accessLogEncoding``): a ``FileAccessLog`` (``envoy.access_loggers.file``),
``StdoutAccessLog`` or ``StderrAccessLog`` whose ``log_format`` is a
``SubstitutionFormatString``: ``text_format_source.inline_string`` (or
``inline_bytes``), the deprecated ``text_format``, or ``json_format`` (a Struct of
format strings, numbers, nested Structs and lists), with ``omit_empty_values``
and ``json_format_options.sort_properties`` (kept; keys are written sorted either
way, as Envoy 1.40 does); ``content_type`` is ignored; the deprecated
``FileAccessLog.format`` string too. No
format is Envoy's default format. The logger is picked by the ``typed_config``
type, as Envoy does (the ``name`` is free).

Format strings are parsed here, at config time, into literal pieces and
:class:`Command` values, with Envoy's syntax rules (``%%`` is a ``%``; a command
is ``%NAME%``, ``%NAME(ARG)%`` or ``%NAME(ARG):LEN%``; the length only on
``REQ``/``RESP``/``TRAILER``); a command this waypoint does not evaluate is
refused, so a request never meets one. :mod:`waypoint.accesslog` binds them.

Filters: ``status_code_filter`` and ``duration_filter`` (the comparison's
``default_value``: no runtime layer here), ``response_flag_filter``,
``grpc_status_filter``, ``header_filter``, ``not_health_check_filter`` (always
passes: no health checks reach a waypoint), ``and_filter``/``or_filter`` of them.
Refused, naming the field: ``runtime_filter``, ``traceable_filter``,
``extension_filter`` (CEL), ``metadata_filter``, ``log_type_filter``, formatter
extensions (``formatters``), a format from a file, and every other logger type.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import substitution_format_string_pb2 as sfs_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from google.protobuf import struct_pb2

from waypoint.config import model as m
from waypoint.config.checks import Unsupported, only
from waypoint.config.routes import header_matcher

DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)
STDOUT = "/dev/stdout"
STDERR = "/dev/stderr"
FILE_LOGGER = "envoy.extensions.access_loggers.file.v3.FileAccessLog"
STDOUT_LOGGER = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
STDERR_LOGGER = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog"

# Envoy's command syntax flags: parameters none / optional / required, and LEN.
_NONE, _OPTIONAL, _REQUIRED = 0, 1, 2
_COMMANDS: dict[str, tuple[int, bool]] = {
    "START_TIME": (_OPTIONAL, False),
    "REQ": (_REQUIRED, True),
    "RESP": (_REQUIRED, True),
    "TRAILER": (_REQUIRED, True),
    "RESPONSE_CODE": (_NONE, False),
    "RESPONSE_CODE_DETAILS": (_OPTIONAL, False),
    "RESPONSE_FLAGS": (_NONE, False),
    "RESPONSE_FLAGS_LONG": (_NONE, False),
    "BYTES_RECEIVED": (_NONE, False),
    "BYTES_SENT": (_NONE, False),
    "DURATION": (_NONE, False),
    "REQUEST_DURATION": (_NONE, False),
    "RESPONSE_DURATION": (_NONE, False),
    "PROTOCOL": (_NONE, False),
    "UPSTREAM_HOST": (_NONE, False),
    "UPSTREAM_CLUSTER": (_NONE, False),
    "UPSTREAM_CLUSTER_RAW": (_NONE, False),
    "UPSTREAM_LOCAL_ADDRESS": (_NONE, False),
    "UPSTREAM_TRANSPORT_FAILURE_REASON": (_NONE, False),
    "DOWNSTREAM_LOCAL_ADDRESS": (_NONE, False),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": (_NONE, False),
    "DOWNSTREAM_REMOTE_ADDRESS": (_NONE, False),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": (_NONE, False),
    "DOWNSTREAM_PEER_URI_SAN": (_NONE, False),
    "REQUESTED_SERVER_NAME": (_NONE, False),
    "ROUTE_NAME": (_NONE, False),
    "CONNECTION_TERMINATION_DETAILS": (_NONE, False),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": (_NONE, False),
    "GRPC_STATUS": (_OPTIONAL, False),
    "GRPC_STATUS_NUMBER": (_NONE, False),
    "HOSTNAME": (_NONE, False),
}
SUPPORTED_COMMANDS = frozenset(_COMMANDS)
_COMMAND = re.compile(r"%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::([0-9]+))?%")
# Envoy's response flags, short and long (a response_flag_filter may name the short ones).
# fmt: off
LONG_FLAGS = {
    "LH": "FailedLocalHealthCheck", "UH": "NoHealthyUpstream", "UT": "UpstreamRequestTimeout",
    "LR": "LocalReset", "UR": "UpstreamRemoteReset", "UF": "UpstreamConnectionFailure",
    "UC": "UpstreamConnectionTermination", "UO": "UpstreamOverflow", "NR": "NoRouteFound",
    "DI": "DelayInjected", "FI": "FaultInjected", "RL": "RateLimited",
    "UAEX": "UnauthorizedExternalService", "RLSE": "RateLimitServiceError",
    "DC": "DownstreamConnectionTermination", "URX": "UpstreamRetryLimitExceeded",
    "SI": "StreamIdleTimeout", "IH": "InvalidEnvoyRequestHeaders",
    "DPE": "DownstreamProtocolError", "UMSDR": "UpstreamMaxStreamDurationReached",
    "RFCF": "ResponseFromCacheFilter", "NFCF": "NoFilterConfigFound", "DT": "DurationTimeout",
    "UPE": "UpstreamProtocolError", "NC": "NoClusterFound", "OM": "OverloadManagerTerminated",
    "DF": "DnsResolutionFailed", "DO": "DropOverload", "DR": "DownstreamRemoteReset",
    "UDO": "UnconditionalDropOverload",
}
# fmt: on
RESPONSE_FLAGS = frozenset(LONG_FLAGS)


@dataclass(frozen=True, slots=True)
class Command:
    """One ``%NAME(ARG):LEN%``; for REQ/RESP/TRAILER ``arg`` is the header, ``alt`` the ``?ALT``."""

    name: str
    arg: str = ""
    alt: str = ""
    max_length: int | None = None


Piece = str | Command


@dataclass(frozen=True, slots=True)
class FormatString:
    """A parsed format string: literal text and commands, in order."""

    pieces: tuple[Piece, ...]


@dataclass(frozen=True, slots=True)
class JsonStruct:
    fields: tuple[tuple[str, JsonNode], ...]


@dataclass(frozen=True, slots=True)
class JsonList:
    items: tuple[JsonNode, ...]


JsonNode = FormatString | float | JsonStruct | JsonList


@dataclass(frozen=True, slots=True)
class TextFormat:
    format: FormatString
    omit_empty_values: bool = False


@dataclass(frozen=True, slots=True)
class JsonFormat:
    struct: JsonStruct
    omit_empty_values: bool = False
    sort_properties: bool = False


LogFormat = TextFormat | JsonFormat


class Op:
    EQ, GE, LE, NE = "EQ", "GE", "LE", "NE"


@dataclass(frozen=True, slots=True)
class StatusCodeFilter:
    op: str
    value: int


@dataclass(frozen=True, slots=True)
class DurationFilter:
    op: str
    value_ms: int


@dataclass(frozen=True, slots=True)
class ResponseFlagFilter:
    flags: frozenset[str]  # empty: any flag set


@dataclass(frozen=True, slots=True)
class GrpcStatusFilter:
    statuses: frozenset[int]
    exclude: bool = False


@dataclass(frozen=True, slots=True)
class HeaderFilter:
    header: m.HeaderMatcher


@dataclass(frozen=True, slots=True)
class NotHealthCheckFilter:
    pass


@dataclass(frozen=True, slots=True)
class AndFilter:
    filters: tuple[LogFilter, ...]


@dataclass(frozen=True, slots=True)
class OrFilter:
    filters: tuple[LogFilter, ...]


LogFilter = (
    StatusCodeFilter
    | DurationFilter
    | ResponseFlagFilter
    | GrpcStatusFilter
    | HeaderFilter
    | NotHealthCheckFilter
    | AndFilter
    | OrFilter
)


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """One access log: where lines go (a path; ``/dev/stdout``, ``/dev/stderr``), how, when."""

    name: str
    path: str
    format: LogFormat
    filter: LogFilter | None = None


# ---------------------------------------------------------------- format strings


def parse_format(text: str, where: str) -> FormatString:
    """Envoy's SubstitutionFormatParser: literal text and commands; unknown ones refused."""
    pieces: list[Piece] = []
    literal: list[str] = []
    pos, size = 0, len(text)
    while pos < size:
        ch = text[pos]
        if ch != "%":
            literal.append(ch)
            pos += 1
            continue
        if text.startswith("%%", pos):
            literal.append("%")
            pos += 2
            continue
        found = _COMMAND.match(text, pos)
        if found is None:
            raise Unsupported(
                f"{where}: {text!r}: no valid command at position {pos} "
                "(Envoy's syntax: %NAME%, %NAME(ARG)%, %NAME(ARG):LENGTH%; %% for a %)"
            )
        if literal:
            pieces.append("".join(literal))
            literal.clear()
        pieces.append(_command(found.group(1), found.group(2), found.group(3), where))
        pos = found.end()
    if literal:
        pieces.append("".join(literal))
    return FormatString(tuple(pieces))


def _command(name: str, arg: str | None, length: str | None, where: str) -> Command:
    syntax = _COMMANDS.get(name)
    if syntax is None:
        raise Unsupported(f"{where}: command operator %{name}% is not supported by this waypoint")
    params, length_allowed = syntax
    if params == _NONE and arg is not None:
        raise Unsupported(f"{where}: %{name}% takes no parameters")
    if params == _REQUIRED and not arg:
        raise Unsupported(f"{where}: %{name}% requires a parameter")
    if length is not None and not length_allowed:
        raise Unsupported(f"{where}: %{name}% does not take a length")
    max_length = int(length) if length is not None else None
    arg = arg or ""
    if name in ("REQ", "RESP", "TRAILER"):
        main, _, alt = arg.partition("?")
        if "?" in alt:
            raise Unsupported(f"{where}: %{name}({arg})%: only one alternative header")
        if "\n" in arg:
            raise Unsupported(f"{where}: %{name}%: a header name has no newline")
        return Command(name, main.lower(), alt.lower(), max_length)
    if name == "GRPC_STATUS" and arg not in ("", "CAMEL_STRING", "SNAKE_STRING", "NUMBER"):
        raise Unsupported(f"{where}: %GRPC_STATUS({arg})%: CAMEL_STRING, SNAKE_STRING or NUMBER")
    if name == "RESPONSE_CODE_DETAILS" and arg not in ("", "ALLOW_WHITESPACES"):
        raise Unsupported(f"{where}: %RESPONSE_CODE_DETAILS({arg})%: only ALLOW_WHITESPACES")
    return Command(name, arg, "", max_length)


def _json_struct(s: struct_pb2.Struct, where: str) -> JsonStruct:
    return JsonStruct(tuple((k, _json_value(v, f"{where}.{k}")) for k, v in s.fields.items()))


def _json_value(v: struct_pb2.Value, where: str) -> JsonNode:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return parse_format(v.string_value, where)
    if kind == "number_value":
        return float(v.number_value)
    if kind == "struct_value":
        return _json_struct(v.struct_value, where)
    if kind == "list_value":
        return JsonList(
            tuple(_json_value(x, f"{where}[{i}]") for i, x in enumerate(v.list_value.values))
        )
    raise Unsupported(
        f"{where}: only strings, numbers, nested structs and lists are supported in a JSON format"
    )


def log_format(f: sfs_pb2.SubstitutionFormatString, where: str) -> LogFormat:
    """A SubstitutionFormatString: text or JSON."""
    only(
        f,
        {
            "text_format",
            "json_format",
            "text_format_source",
            "omit_empty_values",
            "content_type",
            "json_format_options",
        },
        where,
    )
    omit = f.omit_empty_values
    kind = f.WhichOneof("format")
    if kind == "json_format":
        sort = False
        if f.HasField("json_format_options"):
            only(f.json_format_options, {"sort_properties"}, f"{where}.json_format_options")
            sort = f.json_format_options.sort_properties
        return JsonFormat(_json_struct(f.json_format, f"{where}.json_format"), omit, sort)
    if kind == "text_format":
        return TextFormat(parse_format(f.text_format, f"{where}.text_format"), omit)
    if kind == "text_format_source":
        sw = f"{where}.text_format_source"
        src = f.text_format_source
        only(src, {"inline_string", "inline_bytes"}, sw)
        text = (
            src.inline_string
            if src.WhichOneof("specifier") == "inline_string"
            else src.inline_bytes.decode("utf-8", "replace")
        )
        return TextFormat(parse_format(text, sw), omit)
    return TextFormat(parse_format(DEFAULT_FORMAT, where), omit)


def default_format() -> TextFormat:
    return TextFormat(parse_format(DEFAULT_FORMAT, "default format"))


# ---------------------------------------------------------------- filters

_OPS = {
    accesslog_pb2.ComparisonFilter.EQ: Op.EQ,
    accesslog_pb2.ComparisonFilter.GE: Op.GE,
    accesslog_pb2.ComparisonFilter.LE: Op.LE,
    accesslog_pb2.ComparisonFilter.NE: Op.NE,
}


def _comparison(c: accesslog_pb2.ComparisonFilter, where: str) -> tuple[str, int]:
    only(c, {"op", "value"}, where)
    only(c.value, {"default_value", "runtime_key"}, f"{where}.value")
    return _OPS[c.op], int(c.value.default_value)


def log_filter(f: accesslog_pb2.AccessLogFilter, where: str) -> LogFilter:
    kind = f.WhichOneof("filter_specifier")
    fw = f"{where}.{kind}"
    if kind == "status_code_filter":
        only(f.status_code_filter, {"comparison"}, fw)
        return StatusCodeFilter(*_comparison(f.status_code_filter.comparison, f"{fw}.comparison"))
    if kind == "duration_filter":
        only(f.duration_filter, {"comparison"}, fw)
        return DurationFilter(*_comparison(f.duration_filter.comparison, f"{fw}.comparison"))
    if kind == "not_health_check_filter":
        return NotHealthCheckFilter()
    if kind == "response_flag_filter":
        only(f.response_flag_filter, {"flags"}, fw)
        flags = frozenset(f.response_flag_filter.flags)
        unknown = sorted(flags - RESPONSE_FLAGS)
        if unknown:
            raise Unsupported(f"{fw}.flags: unknown response flag(s) {', '.join(unknown)}")
        return ResponseFlagFilter(flags)
    if kind == "grpc_status_filter":
        only(f.grpc_status_filter, {"statuses", "exclude"}, fw)
        return GrpcStatusFilter(
            frozenset(int(s) for s in f.grpc_status_filter.statuses),
            f.grpc_status_filter.exclude,
        )
    if kind == "header_filter":
        only(f.header_filter, {"header"}, fw)
        return HeaderFilter(header_matcher(f.header_filter.header, f"{fw}.header"))
    if kind in ("and_filter", "or_filter"):
        group = getattr(f, kind)
        only(group, {"filters"}, fw)
        if len(group.filters) < 2:
            raise Unsupported(f"{fw}.filters: needs at least two filters")
        inner = tuple(log_filter(x, f"{fw}.filters[{i}]") for i, x in enumerate(group.filters))
        return AndFilter(inner) if kind == "and_filter" else OrFilter(inner)
    if kind is None:
        raise Unsupported(f"{where}: an access log filter needs a filter")
    raise Unsupported(f"{fw}: not supported by this waypoint")


# ---------------------------------------------------------------- loggers


def access_log(entry: accesslog_pb2.AccessLog, where: str) -> AccessLogConfig:
    only(entry, {"name", "filter", "typed_config"}, where)
    if not entry.HasField("typed_config"):
        raise Unsupported(f"{where}.typed_config: is required")
    tw = f"{where}.typed_config"
    packed = entry.typed_config
    kind = packed.type_url.rpartition("/")[2]
    fmt: LogFormat
    if kind == FILE_LOGGER:
        file = file_pb2.FileAccessLog()
        packed.Unpack(file)
        only(file, {"path", "format", "log_format"}, tw)
        if not file.path:
            raise Unsupported(f"{tw}.path: is required")
        path = file.path
        if file.HasField("log_format"):
            fmt = log_format(file.log_format, f"{tw}.log_format")
        elif file.format:
            fmt = TextFormat(parse_format(file.format, f"{tw}.format"))
        else:
            fmt = default_format()
    elif kind in (STDOUT_LOGGER, STDERR_LOGGER):
        stream = (
            stream_pb2.StdoutAccessLog() if kind == STDOUT_LOGGER else stream_pb2.StderrAccessLog()
        )
        packed.Unpack(stream)
        only(stream, {"log_format"}, tw)
        path = STDOUT if kind == STDOUT_LOGGER else STDERR
        fmt = (
            log_format(stream.log_format, f"{tw}.log_format")
            if stream.HasField("log_format")
            else default_format()
        )
    else:
        raise Unsupported(f"{tw}: access logger {packed.type_url} is not supported")
    flt = log_filter(entry.filter, f"{where}.filter") if entry.HasField("filter") else None
    return AccessLogConfig(name=entry.name, path=path, format=fmt, filter=flt)


def access_logs(
    entries: Sequence[accesslog_pb2.AccessLog], where: str
) -> tuple[AccessLogConfig, ...]:
    """An HCM's ``access_log`` (``where`` names it, e.g. ``"...http_connection_manager"``)."""
    return tuple(access_log(e, f"{where}.access_log[{i}]") for i, e in enumerate(entries))
