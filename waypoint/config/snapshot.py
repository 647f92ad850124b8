"""The waypoint's xDS state, sans I/O: Delta responses in, immutable snapshots out."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from mesh.xds.state import Applied
from waypoint.config import convert
from waypoint.config import model as m


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class WaypointConfig:
    """Everything the waypoint knows from meshd, at one moment."""

    listeners: Mapping[str, m.Listener] = field(default_factory=_empty)
    routes: Mapping[str, m.RouteConfig] = field(default_factory=_empty)
    clusters: Mapping[str, m.Cluster] = field(default_factory=_empty)
    endpoints: Mapping[str, m.LoadAssignment] = field(default_factory=_empty)
    # The resources as received, for /config_dump.
    raw: Mapping[str, Mapping[str, Message]] = field(default_factory=_empty)
    versions: Mapping[str, Mapping[str, str]] = field(default_factory=_empty)
    synced_types: frozenset[str] = frozenset()
    generation: int = 0
    # name -> reason, per type: the resources last refused (for /config_dump and logs).
    refused: Mapping[str, Mapping[str, str]] = field(default_factory=_empty)

    @property
    def synced(self) -> bool:
        return set(convert.TYPE_URLS) <= self.synced_types

    def summary(self) -> str:
        return (
            f"{len(self.listeners)} listeners, {len(self.routes)} routes, "
            f"{len(self.clusters)} clusters"
        )


_CONVERT: dict[str, Callable[[Any], Any]] = {
    convert.LISTENER_TYPE: convert.listener,
    convert.ROUTE_TYPE: convert.route_config,
    convert.CLUSTER_TYPE: convert.cluster,
    convert.ENDPOINT_TYPE: convert.load_assignment,
}
_FIELD = {
    convert.LISTENER_TYPE: "listeners",
    convert.ROUTE_TYPE: "routes",
    convert.CLUSTER_TYPE: "clusters",
    convert.ENDPOINT_TYPE: "endpoints",
}


def _name_of(value: Any) -> str:
    return str(getattr(value, "name", None) or getattr(value, "cluster", ""))


def apply_response(
    state: WaypointConfig,
    type_url: str,
    resources: Iterable[tuple[str, str, any_pb2.Any]],
    removed: Iterable[str],
) -> Applied[WaypointConfig]:
    """Apply one Delta response: every resource converted first, a refused one alone."""
    if type_url not in _CONVERT:
        return Applied(state, {}, False)
    attr = _FIELD[type_url]
    values = dict(getattr(state, attr))
    raw = dict(state.raw.get(type_url, {}))
    versions = dict(state.versions.get(type_url, {}))
    refused: dict[str, str] = {}
    changed = False
    for name, version, packed in resources:
        message = convert.MESSAGES[type_url]()
        if packed.type_url != type_url:
            refused[name] = f"type {packed.type_url!r}, expected {type_url}"
            continue
        try:
            message.ParseFromString(packed.value)
            value = _CONVERT[type_url](message)
        except DecodeError as e:
            refused[name] = f"cannot decode: {e}"
            continue
        except convert.Unsupported as e:
            refused[name] = str(e)
            continue
        if _name_of(value) != name:
            refused[name] = f"resource named {name!r} holds {_name_of(value)!r}"
            continue
        values[name] = value
        raw[name] = message
        versions[name] = version
        changed = True
    for name in removed:
        if values.pop(name, None) is not None:
            changed = True
        raw.pop(name, None)
        versions.pop(name, None)
    synced = state.synced_types | {type_url}
    changed = changed or synced != state.synced_types
    all_raw = dict(state.raw)
    all_raw[type_url] = MappingProxyType(raw)
    all_versions = dict(state.versions)
    all_versions[type_url] = MappingProxyType(versions)
    all_refused = dict(state.refused)
    all_refused[type_url] = MappingProxyType(refused)
    new = replace(
        state,
        raw=MappingProxyType(all_raw),
        versions=MappingProxyType(all_versions),
        synced_types=synced,
        generation=state.generation + (1 if changed else 0),
        refused=MappingProxyType(all_refused),
        **{attr: MappingProxyType(values)},
    )
    return Applied(new, MappingProxyType(refused), changed)
