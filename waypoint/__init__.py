"""waypoint, the per-namespace L7 proxy.

Owns: HTTP codecs, the router, upstream clusters and load balancing, filters
(authz, JWT, fault, rate limit, headers) and L7 telemetry. Empty until the
waypoint issue lands.

May import: ``mesh`` and third-party libraries. Never ``controlplane``,
``ztunnel``, ``ebpf`` or ``meshlab``.
"""
