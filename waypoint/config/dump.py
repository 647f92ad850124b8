"""``/config_dump`` in Envoy's shape (``envoy.admin.v3.ConfigDump``), so Envoy's tooling reads it.

Built from the resources as received, with their versions; ``include_eds``
adds the endpoints, as Envoy's admin does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envoy.admin.v3 import config_dump_pb2, config_dump_shared_pb2
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format, struct_pb2

from waypoint.config import convert
from waypoint.config.snapshot import WaypointConfig


def config_dump(
    config: WaypointConfig, *, node_id: str, metadata: dict[str, Any], include_eds: bool = False
) -> dict[str, Any]:
    dump = config_dump_pb2.ConfigDump()
    bootstrap = config_dump_pb2.BootstrapConfigDump()
    node = base_pb2.Node(id=node_id)
    node.metadata.CopyFrom(_struct(metadata))
    bootstrap.bootstrap.node.CopyFrom(node)
    dump.configs.add().Pack(bootstrap)
    raw, versions = config.raw, config.versions

    def version(type_url: str, name: str) -> str:
        return versions.get(type_url, {}).get(name, "")

    listeners = config_dump_shared_pb2.ListenersConfigDump()
    for name, message in sorted(raw.get(convert.LISTENER_TYPE, {}).items()):
        entry = listeners.dynamic_listeners.add(name=name)
        entry.active_state.version_info = version(convert.LISTENER_TYPE, name)
        entry.active_state.listener.Pack(message)
    dump.configs.add().Pack(listeners)
    clusters = config_dump_shared_pb2.ClustersConfigDump()
    for name, message in sorted(raw.get(convert.CLUSTER_TYPE, {}).items()):
        entry = clusters.dynamic_active_clusters.add(
            version_info=version(convert.CLUSTER_TYPE, name)
        )
        entry.cluster.Pack(message)
    dump.configs.add().Pack(clusters)
    routes = config_dump_shared_pb2.RoutesConfigDump()
    for name, message in sorted(raw.get(convert.ROUTE_TYPE, {}).items()):
        entry = routes.dynamic_route_configs.add(version_info=version(convert.ROUTE_TYPE, name))
        entry.route_config.Pack(message)
    dump.configs.add().Pack(routes)
    if include_eds:
        endpoints = config_dump_shared_pb2.EndpointsConfigDump()
        for name, message in sorted(raw.get(convert.ENDPOINT_TYPE, {}).items()):
            entry = endpoints.dynamic_endpoint_configs.add(
                version_info=version(convert.ENDPOINT_TYPE, name)
            )
            entry.endpoint_config.Pack(message)
        dump.configs.add().Pack(endpoints)
    result: dict[str, Any] = json_format.MessageToDict(dump, preserving_proto_field_name=True)
    return result


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


_DUMP_KEYS: dict[str, tuple[str, Callable[[dict[str, Any]], Any]]] = {
    "ListenersConfigDump": (
        "dynamic_listeners",
        lambda e: e.get("active_state", {}).get("listener"),
    ),
    "ClustersConfigDump": ("dynamic_active_clusters", lambda e: e.get("cluster")),
    "RoutesConfigDump": ("dynamic_route_configs", lambda e: e.get("route_config")),
    "EndpointsConfigDump": ("dynamic_endpoint_configs", lambda e: e.get("endpoint_config")),
}
_TYPE_OF = {
    "ListenersConfigDump": convert.LISTENER_TYPE,
    "ClustersConfigDump": convert.CLUSTER_TYPE,
    "RoutesConfigDump": convert.ROUTE_TYPE,
    "EndpointsConfigDump": convert.ENDPOINT_TYPE,
}


def config_from_dump(doc: dict[str, Any]) -> WaypointConfig:
    """A saved ``/config_dump`` (ours or Envoy's) as the waypoint's config, through the same
    conversion the feed uses: what ``explain`` decides on is what the waypoint runs."""
    from google.protobuf import any_pb2

    from waypoint.config.snapshot import apply_response

    config = WaypointConfig()
    for section in doc.get("configs") or []:
        kind = str(section.get("@type", "")).rsplit(".", 1)[-1]
        if kind not in _DUMP_KEYS:
            continue
        key, inner = _DUMP_KEYS[kind]
        type_url = _TYPE_OF[kind]
        resources = []
        for entry in section.get(key) or []:
            body = inner(entry)
            if not body:
                continue
            packed = any_pb2.Any()
            json_format.ParseDict(body, packed)
            message = convert.MESSAGES[type_url]()
            packed.Unpack(message)
            name = getattr(message, "name", "") or getattr(message, "cluster_name", "")
            resources.append((name, str(entry.get("version_info", "")), packed))
        config = apply_response(config, type_url, resources, ()).state
    return config
