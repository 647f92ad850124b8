"""Istio's ``MeshConfig``, the telemetry part: extension providers and their defaults.

Read from the text istiod reads: the ``mesh`` key of the ``istio`` ConfigMap in
the root namespace (a ``ConfigMap`` among a local cluster's resources), or the
file that ConfigMap is mounted as (``meshd --mesh-config``, istiod's
``--meshConfig``). Field names are MeshConfig's:

* ``extensionProviders[]``: ``name`` and one of ``opentelemetry`` (``service``,
  ``port``, ``maxTagLength``), ``zipkin`` (``service``, ``port``,
  ``maxTagLength``, ``traceContextOption``), ``envoyFileAccessLog`` (``path``,
  ``logFormat.text`` or ``logFormat.labels``) or ``prometheus``. Other kinds
  (``envoyExtAuthzHttp``, ``skywalking``, ``datadog``, ...) are refused by name:
  a Telemetry that names one is told so.
* ``defaultProviders``: ``tracing``, ``accessLogging``, ``metrics`` (provider
  names), what applies where no Telemetry says otherwise.
* ``enableTracing`` (default true) and ``defaultConfig.tracing.sampling``
  (percent, default 1.0: Istio's).
* ``accessLogFile`` (e.g. ``/dev/stdout``: every proxy logs, in
  ``accessLogEncoding`` ``TEXT`` or ``JSON``, with ``accessLogFormat`` or
  Istio's format), the switch most Istio installs use.

Everything else in MeshConfig belongs to other parts (or to sidecars) and is
left alone here. A provider that cannot be read is left out with a problem
line; the rest of the mesh config stands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml

from controlplane.l7.reader import InvalidObject, Reader

KIND = "MeshConfig"
DEFAULT_SAMPLING = 1.0  # percent: Istio's default defaultConfig.tracing.sampling
# The built-in providers Istio knows without an extensionProviders entry.
ENVOY = "envoy"  # the access log provider with Istio's format, on /dev/stdout
PROMETHEUS = "prometheus"
OPENTELEMETRY, ZIPKIN, FILE_LOG = "opentelemetry", "zipkin", "envoyFileAccessLog"
_UNSUPPORTED_KINDS = (
    "envoyExtAuthzHttp",
    "envoyExtAuthzGrpc",
    "stackdriver",
    "skywalking",
    "datadog",
    "lightstep",
    "envoyOtelAls",
    "envoyHttpAls",
    "envoyTcpAls",
    "sds",
)
_PROVIDER_KINDS = (OPENTELEMETRY, ZIPKIN, FILE_LOG, PROMETHEUS)


@dataclass(frozen=True, slots=True, kw_only=True)
class Provider:
    name: str
    kind: str  # opentelemetry, zipkin, envoyFileAccessLog, prometheus, envoy (built in)
    service: str = ""  # the collector's host (a Service's FQDN, or any DNS name)
    port: int = 0
    max_tag_length: int = 0
    trace_context: str = ""  # zipkin: USE_B3 (default) or USE_B3_WITH_W3C_PROPAGATION
    path: str = ""  # access log file
    text_format: str = ""  # access log text format ("" = Istio's)
    json_labels: Mapping[str, str] | None = None  # access log JSON format (None = text)

    @property
    def is_tracing(self) -> bool:
        return self.kind in (OPENTELEMETRY, ZIPKIN)

    @property
    def is_access_log(self) -> bool:
        return self.kind in (ENVOY, FILE_LOG)


BUILT_IN = MappingProxyType(
    {
        ENVOY: Provider(name=ENVOY, kind=ENVOY, path="/dev/stdout"),
        PROMETHEUS: Provider(name=PROMETHEUS, kind=PROMETHEUS),
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    providers: Mapping[str, Provider] = field(default_factory=lambda: BUILT_IN)
    # Provider kinds we do not run, by name: a Telemetry naming one is told so.
    refused: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    default_tracing: tuple[str, ...] = ()
    default_access_logging: tuple[str, ...] = ()
    default_metrics: tuple[str, ...] = ()
    enable_tracing: bool = True
    sampling: float = DEFAULT_SAMPLING
    access_log_file: str = ""
    access_log_json: bool = False
    access_log_format: str = ""
    problems: tuple[str, ...] = ()

    def provider(self, name: str) -> Provider | None:
        return self.providers.get(name)


DEFAULT = MeshConfig()


def parse(text: str, where: str = "mesh config") -> MeshConfig:
    """MeshConfig's YAML; one that is not YAML or not a mapping is the default with a problem."""
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        return MeshConfig(problems=(f"{where}: not YAML: {e}",))
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return MeshConfig(problems=(f"{where}: must be a mapping, got {type(raw).__name__}",))
    return from_dict(raw, where)


def from_dict(raw: Mapping[str, Any], where: str = "mesh config") -> MeshConfig:
    r = Reader(raw, KIND, where)
    problems: list[str] = []
    providers: dict[str, Provider] = dict(BUILT_IN)
    refused: dict[str, str] = {}
    entries: list[Reader] = []
    try:
        entries = list(r.children("extensionProviders"))
    except InvalidObject as e:
        problems.append(str(e))
    for p in entries:
        try:
            name = p.text("name")
            kinds = [k for k in p.raw if k != "name"]
            if len(kinds) != 1:
                raise p.error("must set exactly one provider kind besides name")
            (kind,) = kinds
            if kind in _UNSUPPORTED_KINDS:
                refused[name] = f"provider {name} is {kind}, which this mesh does not run"
                continue
            if kind not in _PROVIDER_KINDS:
                raise p.error(f"unknown provider kind; known: {', '.join(_PROVIDER_KINDS)}", kind)
            providers[name] = _provider(name, kind, p.child(kind))
        except InvalidObject as e:
            problems.append(str(e))
    try:
        defaults = r.child("defaultProviders")
        tracing = defaults.strings("tracing")
        access = defaults.strings("accessLogging")
        metrics = defaults.strings("metrics")
    except InvalidObject as e:
        tracing = access = metrics = ()
        problems.append(str(e))
    sampling = DEFAULT_SAMPLING
    try:
        t = r.child("defaultConfig").child("tracing")
        if t.has("sampling"):
            sampling = t.number("sampling", low=0, high=100)
    except InvalidObject as e:
        problems.append(str(e))
    try:
        enable = r.boolean("enableTracing", True)
        log_file = r.text("accessLogFile", "")
        encoding = r.one_of("accessLogEncoding", ("TEXT", "JSON"), "TEXT")
        log_format = r.text("accessLogFormat", "")
    except InvalidObject as e:
        enable, log_file, encoding, log_format = True, "", "TEXT", ""
        problems.append(str(e))
    return MeshConfig(
        providers=MappingProxyType(providers),
        refused=MappingProxyType(refused),
        default_tracing=tuple(tracing),
        default_access_logging=tuple(access),
        default_metrics=tuple(metrics),
        enable_tracing=enable,
        sampling=sampling,
        access_log_file=log_file,
        access_log_json=encoding == "JSON",
        access_log_format=log_format,
        problems=tuple(problems),
    )


def _provider(name: str, kind: str, r: Reader) -> Provider:
    if kind == PROMETHEUS:
        r.only(set())
        return Provider(name=name, kind=kind)
    if kind == FILE_LOG:
        r.only({"path", "logFormat"})
        fmt = r.child("logFormat").only({"text", "labels"})
        if fmt.has("text") and fmt.has("labels"):
            raise fmt.error("set text or labels, not both")
        labels = fmt.raw.get("labels") if fmt.has("labels") else None
        if labels is not None and not isinstance(labels, Mapping):
            raise fmt.error("must be a mapping of field names to format strings", "labels")
        return Provider(
            name=name,
            kind=kind,
            path=r.text("path"),
            text_format=fmt.text("text", ""),
            json_labels=MappingProxyType({str(k): str(v) for k, v in labels.items()})
            if labels is not None
            else None,
        )
    allowed = {"service", "port", "maxTagLength"}
    if kind == ZIPKIN:
        allowed |= {"traceContextOption"}
    r.only(allowed, {"http": "OTLP/HTTP export (this mesh exports OTLP over gRPC)"})
    trace_context = ""
    if kind == ZIPKIN:
        trace_context = r.one_of(
            "traceContextOption", ("USE_B3", "USE_B3_WITH_W3C_PROPAGATION"), "USE_B3"
        )
    return Provider(
        name=name,
        kind=kind,
        service=r.text("service"),
        port=r.integer("port", low=1, high=65535),
        max_tag_length=r.integer("maxTagLength", 0, low=0),
        trace_context=trace_context,
    )


def from_config_map(raw: Mapping[str, Any], where: str) -> MeshConfig:
    """The ``istio`` ConfigMap: its ``data.mesh`` text (absent: the default)."""
    data = raw.get("data") or {}
    text = data.get("mesh", "") if isinstance(data, Mapping) else ""
    if not isinstance(text, str):
        return MeshConfig(problems=(f"{where}: data.mesh must be a string",))
    return parse(text, where)
