"""L7 configuration for the waypoints: the user's routes in, Envoy resources out.

* ``gateway_api`` and ``istio_api`` read the objects users write (Gateway,
  HTTPRoute, GRPCRoute; VirtualService, DestinationRule) with their real field
  names, refusing what is malformed or not supported with the field's path;
* ``ir`` is the one internal form both turn into (route rules per service
  port, cluster settings per service and subset), whatever API they came from;
* ``bind`` decides which waypoint serves which service, which routes attach
  to which service port, and the status conditions that say so; ``workloads``
  which pods a waypoint serves as workloads (``istio.io/waypoint-for``
  ``workload`` or ``all``), reached at the address their clients dial;
* ``envoy`` turns one waypoint's share into standard Envoy v3 resources
  (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment), a portable
  subset that a stock Envoy accepts unchanged.

Pure functions over immutable values, tested without a server.

May import: ``mesh``, ``controlplane.state``, ``xds-protos`` (only in
``envoy``), ``google-re2`` and the standard library.
"""
