"""Upstream clusters: load balancing, circuit breakers, outlier detection, connection pools.

``lb`` picks an endpoint (Envoy's algorithms, randomness and clock passed in),
``outlier`` ejects failing endpoints (consecutive 5xx, gateway errors, with
Envoy's timing), ``breakers`` counts what Envoy's circuit breakers count,
``pool`` keeps connections to endpoints over HBONE or plain TCP and queues
requests when a cluster is at its limit. The first three are pure.

May import: ``mesh.hbone``, ``waypoint.config``, ``waypoint.http``.
"""
