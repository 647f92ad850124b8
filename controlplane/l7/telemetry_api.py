"""Istio ``Telemetry`` (``telemetry.istio.io/v1``) for waypoints: tracing and access logging.

Which Telemetries apply to a waypoint's chains, in istiod's order of
precedence (``pilot/pkg/model/telemetry.go``), least specific first:

1. the mesh: the oldest one in the root namespace with neither ``selector`` nor
   ``targetRefs``;
2. the namespace: the oldest one in the waypoint's namespace with neither;
3. the waypoint: the oldest with ``targetRefs`` to its ``Gateway`` (or, from
   the root namespace, the ``GatewayClass`` ``istio-waypoint``), or a
   ``selector`` its pods match (``gateway.networking.k8s.io/gateway-name``);
4. a service: the oldest with ``targetRefs`` to the ``Service`` (its chains only).

Tracing merges down the levels as istiod's ``mergeTracing`` does: the first
``tracing`` entry that applies to a waypoint (``match.mode`` SERVER,
CLIENT_AND_SERVER or unset; a waypoint is the server side) of each level
replaces ``providers``, ``randomSamplingPercentage``, ``disableSpanReporting``
and ``customTags`` when it sets them. Where no level names providers,
MeshConfig's ``defaultProviders.tracing`` apply; the sampling default is
``defaultConfig.tracing.sampling`` (1%). One provider is in force (istiod
supports one); ``enableTracing: false`` turns tracing off. Access logging:
the most specific level with an ``accessLogging`` entry that applies decides
(its ``providers``, else the default ones; ``disabled: true``: none); with no
such entry, ``defaultProviders.accessLogging`` and ``accessLogFile``.

Metrics overrides (:mod:`controlplane.l7.telemetry_metrics`) add up down the
levels, least specific first (a later one wins a tag). Refused, whole, with a
``WaypointAccepted`` condition that names the field: what
:mod:`~controlplane.l7.telemetry_metrics` does not support,
``accessLogging[].filter`` (CEL), a provider that is not in MeshConfig or is
of a kind this mesh does not run, and custom tags other than ``literal``,
``environment`` and ``header``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType

from controlplane.l7 import telemetry_metrics
from controlplane.l7.authz import Target, read_targets
from controlplane.l7.istio_object import created_of, generation_of
from controlplane.l7.mesh_config import ENVOY, MeshConfig, Provider
from controlplane.l7.reader import InvalidObject, Reader
from controlplane.l7.status import ObjectStatus, waypoint_accepted
from controlplane.l7.telemetry_metrics import MetricOverride
from controlplane.state import L7Object, WaypointInfo

KIND = "Telemetry"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
_SERVER_MODES = ("SERVER", "CLIENT_AND_SERVER")
_MODES = ("CLIENT", "SERVER", "CLIENT_AND_SERVER")


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomTag:
    name: str
    kind: str  # literal, environment, header
    value: str  # the literal, the variable's or the header's name
    default: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingRule:
    providers: tuple[str, ...] | None = None
    sampling: float | None = None
    disable_reporting: bool | None = None
    custom_tags: tuple[CustomTag, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessLogRule:
    providers: tuple[str, ...] | None = None
    disabled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointTelemetry:
    namespace: str
    name: str
    targets: tuple[Target, ...] = ()
    selector: Mapping[str, str] | None = None  # None: no selector
    tracing: TracingRule | None = None  # the first entry that applies to a waypoint
    access_logging: AccessLogRule | None = None
    metrics: tuple[MetricOverride, ...] | None = None  # its metrics overrides (None: none)
    generation: int = 0
    created: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def wide(self) -> bool:
        """Mesh- or namespace-wide: neither selector nor targetRefs."""
        return not self.targets and self.selector is None


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSpec:
    provider: Provider
    sampling: float  # percent
    report: bool = True  # disableSpanReporting: propagate, report nothing
    custom_tags: tuple[CustomTag, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetrySpec:
    """What one chain does: its tracer (or none), its access logs."""

    tracing: TracingSpec | None = None
    access_logs: tuple[Provider, ...] = ()
    metrics: tuple[MetricOverride, ...] = ()  # every level's overrides, least specific first
    from_: tuple[str, ...] = field(default=())  # the Telemetries in force, for the status


NONE = TelemetrySpec()


def parse_all(
    objects: Sequence[L7Object], root_namespace: str, mesh: MeshConfig
) -> tuple[list[WaypointTelemetry], list[ObjectStatus]]:
    """Every readable Telemetry, oldest first; a status for each one refused."""
    found: list[WaypointTelemetry] = []
    refused: list[ObjectStatus] = []
    for obj in objects:
        if obj.kind != KIND:
            continue
        try:
            found.append(parse(obj, root_namespace, mesh))
        except InvalidObject as e:
            refused.append(_status(obj.namespace, obj.name, generation_of(obj.raw), False,
                                   "Invalid", str(e)))  # fmt: skip
    found.sort(key=lambda t: (t.created, t.namespace, t.name))
    return found, refused


def parse(obj: L7Object, root_namespace: str, mesh: MeshConfig) -> WaypointTelemetry:
    r = Reader(obj.raw, KIND, f"{obj.namespace}/{obj.name}")
    spec = r.child("spec").only({"selector", "targetRef", "targetRefs", "tracing",
                                 "accessLogging", "metrics"})  # fmt: skip
    targets = read_targets(r, obj.namespace, root_namespace) if _has_targets(spec) else ()
    selector: Mapping[str, str] | None = None
    if spec.has("selector"):
        if targets:
            raise spec.error("set selector or targetRefs, not both", "selector")
        sel = spec.child("selector").only({"matchLabels"})
        selector = MappingProxyType(sel.labels("matchLabels"))
    tracing = next(
        (t for t in (_tracing(t, mesh) for t in spec.children("tracing")) if t is not None), None
    )
    logging = next(
        (a for a in (_access(a, mesh) for a in spec.children("accessLogging")) if a is not None),
        None,
    )
    metrics = telemetry_metrics.parse_metrics(spec) if spec.has("metrics") else None
    for m in spec.children("metrics"):
        for p in m.children("providers"):
            name = p.only({"name"}).text("name")
            provider = mesh.provider(name)
            if provider is None or provider.kind != "prometheus":
                raise p.error(f"{name!r} is not a metrics provider here (only prometheus)", "name")
    return WaypointTelemetry(
        namespace=obj.namespace,
        name=obj.name,
        targets=targets,
        selector=selector,
        tracing=tracing,
        access_logging=logging,
        metrics=metrics,
        generation=generation_of(obj.raw),
        created=created_of(obj.raw),
    )


def _has_targets(spec: Reader) -> bool:
    return spec.has("targetRef") or bool(spec.items("targetRefs"))


def _applies(r: Reader) -> bool:
    mode = r.child("match").only({"mode"}).one_of("mode", _MODES, "CLIENT_AND_SERVER")
    return mode in _SERVER_MODES


def _providers(r: Reader, mesh: MeshConfig, want: str) -> tuple[str, ...] | None:
    if not r.has("providers"):
        return None
    names = []
    for p in r.children("providers"):
        name = p.only({"name"}).text("name")
        if name in mesh.refused:
            raise p.error(mesh.refused[name], "name")
        provider = mesh.provider(name)
        if provider is None:
            raise p.error(f"no extension provider {name!r} in the mesh config", "name")
        if (want == "tracing" and not provider.is_tracing) or (
            want == "accessLogging" and not provider.is_access_log
        ):
            raise p.error(f"provider {name} ({provider.kind}) is not a {want} provider", "name")
        names.append(name)
    return tuple(names)


def _tracing(r: Reader, mesh: MeshConfig) -> TracingRule | None:
    r.only(
        {"match", "providers", "randomSamplingPercentage", "disableSpanReporting", "customTags"},
        {"useRequestIdForTraceSampling": "sampling by x-request-id (sampling here is random)",
         "enableIstioTags": "Istio's extra span tags switch"},
    )  # fmt: skip
    if not _applies(r):
        return None
    sampling = (
        r.number("randomSamplingPercentage", low=0, high=100)
        if r.has("randomSamplingPercentage")
        else None
    )
    tags: tuple[CustomTag, ...] | None = None
    if r.has("customTags"):
        c = r.child("customTags")
        tags = tuple(_custom_tag(name, c.child(name)) for name in sorted(c.raw))
    return TracingRule(
        providers=_providers(r, mesh, "tracing"),
        sampling=sampling,
        disable_reporting=r.boolean("disableSpanReporting")
        if r.has("disableSpanReporting")
        else None,
        custom_tags=tags,
    )


def _custom_tag(name: str, r: Reader) -> CustomTag:
    r.only({"literal", "environment", "header"}, {"formatter": "formatter tags (CEL)"})
    kinds = [k for k in ("literal", "environment", "header") if r.has(k)]
    if len(kinds) != 1:
        raise r.error("set exactly one of literal, environment, header")
    (kind,) = kinds
    t = r.child(kind)
    if kind == "literal":
        return CustomTag(name=name, kind=kind, value=t.only({"value"}).text("value"))
    t.only({"name", "defaultValue"})
    return CustomTag(name=name, kind=kind, value=t.text("name"), default=t.text("defaultValue", ""))


def _access(r: Reader, mesh: MeshConfig) -> AccessLogRule | None:
    r.only({"match", "providers", "disabled"}, {"filter": "CEL filter expressions"})
    if not _applies(r):
        return None
    return AccessLogRule(
        providers=_providers(r, mesh, "accessLogging"), disabled=r.boolean("disabled")
    )


# ------------------------------------------------------------------ resolution


def levels(
    telemetries: Sequence[WaypointTelemetry],
    waypoint: WaypointInfo,
    root_namespace: str,
    service: tuple[str, str] | None,
) -> list[WaypointTelemetry]:
    """The Telemetries in force on a waypoint's chains (of ``service``: namespace, name),
    least specific first, one per level (the oldest: ``telemetries`` are sorted so)."""

    def first(pred: Callable[[WaypointTelemetry], bool]) -> WaypointTelemetry | None:
        return next((t for t in telemetries if pred(t)), None)

    out = [
        first(lambda t: t.wide and t.namespace == root_namespace),
        first(lambda t: t.wide and t.namespace == waypoint.namespace != root_namespace),
        first(lambda t: _targets_waypoint(t, waypoint)),
    ]
    if service is not None:
        out.append(
            first(
                lambda t: any(
                    x.kind == "Service" and (x.namespace, x.name) == service for x in t.targets
                )
            )
        )
    return [t for t in out if t is not None]


def _targets_waypoint(t: WaypointTelemetry, waypoint: WaypointInfo) -> bool:
    if t.selector is not None:
        return (
            t.namespace == waypoint.namespace
            and bool(t.selector)
            and all(({GATEWAY_NAME_LABEL: waypoint.name}).get(k) == v
                    for k, v in t.selector.items())
        )  # fmt: skip
    return any(
        x.kind == "GatewayClass"
        or (x.kind == "Gateway" and (x.namespace, x.name) == (waypoint.namespace, waypoint.name))
        for x in t.targets
    )


def resolve(in_force: Sequence[WaypointTelemetry], mesh: MeshConfig) -> TelemetrySpec:
    """The chain's tracer and access logs from its levels (least specific first)."""
    providers: tuple[str, ...] = mesh.default_tracing
    sampling, report = mesh.sampling, True
    tags: tuple[CustomTag, ...] = ()
    for t in in_force:
        rule = t.tracing
        if rule is None:
            continue
        providers = rule.providers if rule.providers is not None else providers
        sampling = rule.sampling if rule.sampling is not None else sampling
        report = not rule.disable_reporting if rule.disable_reporting is not None else report
        tags = rule.custom_tags if rule.custom_tags is not None else tags
    tracing = None
    chosen = [p for p in (mesh.provider(n) for n in providers) if p is not None and p.is_tracing]
    if mesh.enable_tracing and chosen:
        tracing = TracingSpec(provider=chosen[0], sampling=sampling, report=report,
                              custom_tags=tuple(tags))  # fmt: skip
    logs = _default_logs(mesh)
    for t in in_force:
        if t.access_logging is not None:
            access = t.access_logging
            if access.disabled:
                logs = ()
            elif access.providers is not None:
                logs = tuple(p for p in (mesh.provider(n) for n in access.providers) if p)
            else:
                logs = _default_logs(mesh) or (mesh.providers[ENVOY],)
    metrics = tuple(o for t in in_force for o in (t.metrics or ()))
    return TelemetrySpec(
        tracing=tracing, access_logs=logs, metrics=metrics, from_=tuple(t.key for t in in_force)
    )


def _default_logs(mesh: MeshConfig) -> tuple[Provider, ...]:
    logs = [p for p in (mesh.provider(n) for n in mesh.default_access_logging) if p]
    if mesh.access_log_file and not any(p.path == mesh.access_log_file for p in logs):
        logs.append(
            Provider(
                name="accessLogFile",
                kind="envoyFileAccessLog",
                path=mesh.access_log_file,
                text_format=mesh.access_log_format if not mesh.access_log_json else "",
                json_labels=MappingProxyType({}) if mesh.access_log_json else None,
            )
        )
    return tuple(logs)


# ------------------------------------------------------------------ status


def status_of(t: WaypointTelemetry, bound: Sequence[str]) -> ObjectStatus:
    """The ``WaypointAccepted`` condition: where it is in force, or that it is nowhere."""
    if not bound:
        if t.selector is not None:
            why = "its selector matches no waypoint (only waypoints read Telemetry here)"
        elif t.targets:
            why = f"no waypoint serves {', '.join(str(x) for x in t.targets)}"
        else:
            why = "no waypoint in its namespace, or an older Telemetry is in force there"
        return _status(t.namespace, t.name, t.generation, False, "TargetNotFound", why)
    parts = [
        p
        for p, on in (
            ("tracing", t.tracing),
            ("access logging", t.access_logging),
            ("metrics overrides", t.metrics),
        )
        if on
    ]
    what = " and ".join(parts) or "nothing for waypoints"
    return _status(t.namespace, t.name, t.generation, True, "Accepted",
                   f"{what} in force on {', '.join(bound)}")  # fmt: skip


_status = partial(waypoint_accepted, KIND)  # namespace, name, generation, ok, reason, message
