"""The waypoint's configuration: Envoy resources in, an immutable snapshot out.

``convert`` is the edge (the only importer of Envoy's protobuf types): one
resource at a time into ``model`` values, refusing what is not implemented;
``snapshot`` applies Delta xDS responses as whole new :class:`WaypointConfig`
values, NACKing refused resources alone.

May import: ``mesh.xds``, ``xds-protos``, ``protobuf``, ``google-re2``.
"""

from waypoint.config.snapshot import WaypointConfig, apply_response

__all__ = ["WaypointConfig", "apply_response"]
