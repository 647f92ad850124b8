"""Gateway API mesh conformance (GAMMA), ported to our own cluster.

One test per upstream case, a module per family: ``test_mesh``,
``test_httproute``, ``test_redirects``, ``test_grpcroute``; the requests,
expectations and cluster helpers are in ``harness``, the one cluster they
share (per package run) in ``conftest``. The cases are upstream's
(kubernetes-sigs/gateway-api ``conformance/tests``: ``mesh-*.go``,
``httproute-*.go`` and ``grpcroute-*.go`` as the mesh suite runs them; the
requests and expected values are upstream's, the YAML is ours). The cluster is
upstream's base manifests (``cluster.yaml``) with namespace
``gateway-conformance-mesh`` in the mesh and bound to its waypoint; every
request goes client pod -> its ztunnel -> HBONE -> the waypoint -> HBONE ->
the backend's ztunnel -> the echo, all real.

As upstream, the client is the echo-v1 pod itself (and for the consumer case
the echo-v1 pod of ``gateway-conformance-mesh-consumer``), and "which backend"
is the answering pod's name prefix. Upstream's mesh harness declares more than
it checks (digest 2.4); here every case also checks what it declares and
upstream ignores: the namespace that answered, the path and Host the backend
saw (rewrites), and each part of a redirect's ``Location``.

Each test applies its routes, waits until meshd accepts them and the
waypoint carries them (its config dump), then until the behaviour holds for
three rounds in a row (upstream's ``AwaitConvergence``: 3 consecutive
successes within 30 s), and deletes them again, waiting until the waypoint
has dropped them, so no test sees another's routes.

Not ported: the https (443) cases, since the echo serves no TLS and the mesh
has no TLS backends yet.
"""
