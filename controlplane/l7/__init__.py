"""L7 configuration for the waypoints: the user's routes in, Envoy resources out.

* ``gateway_api``, ``virtual_service`` and ``destination_rule`` read the
  objects users write (Gateway, HTTPRoute, GRPCRoute; VirtualService,
  DestinationRule) with their real field names, refusing what is malformed or
  not supported with the field's path (``reader``: typed access with paths);
  ``istio_api`` reads all the Istio ones, with their statuses
  (``istio_object``: what the two Istio kinds share);
* ``ir`` is the one internal form they turn into (route rules per service
  port, cluster settings per service and subset), whatever API they came from;
* ``build`` makes each waypoint's share (``share``: the values, and the names
  of services and clusters): ``binding`` decides which waypoint serves which
  service, ``route_attachment`` which routes attach to which service, with the
  status conditions that say so (``status``), ``port_routes`` each service
  port's rules (its protocol from ``protocol``), ``clusters`` the clusters they
  send to and their endpoints; ``workloads`` which pods a waypoint serves as
  workloads (``istio.io/waypoint-for`` ``workload`` or ``all``), reached at
  the address their clients dial; ``authz`` reads the AuthorizationPolicies
  that bind with ``targetRefs`` and says where each is in force;
* ``envoy`` turns one waypoint's share into standard Envoy v3 resources
  (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment), a portable
  subset that a stock Envoy accepts unchanged (``envoy_clusters``: the
  clusters and endpoints; ``envoy_rbac``: the policies as Envoy RBAC filters,
  as Istio generates them; ``envoy_pb``: shared names and helpers).

Pure functions over immutable values, tested without a server.

May import: ``mesh``, ``controlplane.state``, ``xds-protos`` (only in the
``envoy`` modules), ``google-re2`` and the standard library.
"""
