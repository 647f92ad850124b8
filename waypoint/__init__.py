"""waypoint, the per-namespace L7 proxy: HBONE in, HTTP routing, HBONE out.

Owns: the xDS config it is fed and its typed model (``config``), the HTTP
codecs (``http``: HTTP/1.1 on httptools, h2c, gRPC), the HTTP filters ahead
of the router (``filters``: the connection manager's work, fault injection,
and the sequencing of the local rate limit, JWT and RBAC filters), the
router and its pure decisions (``router``, ``match``, ``headers``, ``retry``,
``mirror``, ``records``), Envoy's JWT authentication (``jwt_authn``: local
JWKS), RBAC over requests and connections (``authz``) and local rate limiting
(``ratelimit``), upstream clusters, pools, load balancing and outlier
ejection (``upstream``), the HBONE data path in and out (``proxy``,
``connect``), telemetry (``telemetry``), the admin listeners (``admin``), the
process (``runtime``, ``cli``, ``gcfreeze``) and the operator's view
(``explain``, ``ctl``). Remote JWKS and global rate limits are later work.

May import: ``mesh`` and third-party libraries. Never ``controlplane``,
``ztunnel``, ``ebpf`` or ``meshlab``.
"""
