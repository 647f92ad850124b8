"""Istio's ``istio.stats`` filter, converted: which standard metrics are dropped or re-tagged.

istiod puts the filter (``stats.PluginConfig`` in a ``udpa.type.v1.TypedStruct``)
on a waypoint's HTTP connection managers and TCP chains when a Telemetry
overrides metrics (:mod:`controlplane.l7.telemetry_metrics`). Supported:
``reporter`` (``SERVER_GATEWAY``, a waypoint's), ``metrics[]`` with ``name``
(Istio's standard metrics), ``drop``, ``tags_to_remove`` and ``dimensions`` of
Istio's standard tags with the expressions meshd accepts (evaluated by
:mod:`waypoint.telemetry`). Entries apply in order: a later one wins a tag.
Anything else is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from google.protobuf import any_pb2, json_format
from udpa.type.v1 import typed_struct_pb2

from mesh.istio_metrics import ATTRIBUTES, HEADER, LITERAL, STANDARD_LABELS
from mesh.istio_metrics import METRICS as ISTIO_METRICS
from waypoint.config.checks import Unsupported

ISTIO_STATS = "istio.stats"
PLUGIN_CONFIG = "type.googleapis.com/stats.PluginConfig"
METRICS = tuple(ISTIO_METRICS.values())
REMOVE = None  # a tag's value in MetricRule.tags: removed
# Istio's standard tags, all of which the waypoint reports (waypoint.telemetry.LABELS).
STANDARD_TAGS = frozenset(STANDARD_LABELS)


@dataclass(frozen=True, slots=True)
class Expression:
    """A tag's value: a literal, a request header, or one of ATTRIBUTES."""

    literal: str | None = None
    header: str | None = None
    attribute: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricRule:
    drop: bool = False
    tags: Mapping[str, Expression | None] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsConfig:
    rules: Mapping[str, MetricRule]  # by istio_stats' metric name

    def rule(self, metric: str) -> MetricRule | None:
        return self.rules.get(metric)


def expression(text: str, where: str) -> Expression:
    v = text.strip()
    if (m := LITERAL.match(v)) is not None:
        return Expression(literal=m.group(1) if m.group(1) is not None else m.group(2))
    if (m := HEADER.match(v)) is not None:
        return Expression(header=(m.group(1) or m.group(2)).lower())
    if v in ATTRIBUTES:
        return Expression(attribute=v)
    raise Unsupported(f"{where}: expression {text!r} is not supported")


def stats_filter(
    typed_config: any_pb2.Any, where: str, tags: frozenset[str] = STANDARD_TAGS
) -> StatsConfig:
    """``tags``: the standard tags the waypoint reports (the only ones that can change)."""
    if not typed_config.Is(typed_struct_pb2.TypedStruct.DESCRIPTOR):
        raise Unsupported(f"{where}: {ISTIO_STATS} must be a udpa.type.v1.TypedStruct")
    ts = typed_struct_pb2.TypedStruct()
    typed_config.Unpack(ts)
    if ts.type_url != PLUGIN_CONFIG:
        raise Unsupported(f"{where}: {ISTIO_STATS} of type {ts.type_url!r} (only {PLUGIN_CONFIG})")
    doc: dict[str, Any] = json_format.MessageToDict(ts.value)
    unknown = set(doc) - {"reporter", "metrics"}
    if unknown:
        raise Unsupported(f"{where}: {ISTIO_STATS} field {sorted(unknown)[0]} is not supported")
    if doc.get("reporter", "SERVER_GATEWAY") != "SERVER_GATEWAY":
        raise Unsupported(f"{where}.reporter: only SERVER_GATEWAY (a waypoint's)")
    drops: dict[str, bool] = {}
    changed: dict[str, dict[str, Expression | None]] = {}
    for i, entry in enumerate(doc.get("metrics") or []):
        ew = f"{where}.metrics[{i}]"
        if not isinstance(entry, dict):
            raise Unsupported(f"{ew}: must be an object")
        unknown = set(entry) - {"name", "dimensions", "tags_to_remove", "drop"}
        if unknown:
            raise Unsupported(f"{ew}: field {sorted(unknown)[0]} is not supported")
        name = entry.get("name", "")
        if name not in METRICS:
            raise Unsupported(f"{ew}.name: {name!r} is not one of Istio's standard metrics")
        if "drop" in entry:
            drops[name] = bool(entry["drop"])
        mine = changed.setdefault(name, {})
        for tag in entry.get("tags_to_remove") or []:
            if tag not in tags:
                raise Unsupported(f"{ew}.tags_to_remove: {tag!r} is not a standard tag")
            mine[tag] = REMOVE
        for tag, value in (entry.get("dimensions") or {}).items():
            if tag not in tags:
                raise Unsupported(f"{ew}.dimensions: {tag!r}: a new dimension is not supported")
            mine[tag] = expression(str(value), f"{ew}.dimensions[{tag}]")
    rules = {
        name: MetricRule(drop=drops.get(name, False), tags=MappingProxyType(changed.get(name, {})))
        for name in set(drops) | set(changed)
    }
    return StatsConfig(rules=MappingProxyType(rules))
