"""Requests the waypoint answers itself (RBAC's 403, no route's 404) still name the service
in their metrics: the service of the chain that took the stream, never the Host header."""

from __future__ import annotations

from tests.support.l7world import objects, world
from tests.support.waypoint_harness import Backend, config_for, request, waypoint, with_backends
from tests.unit.hbone.conftest import run
from waypoint.telemetry import LABELS, Telemetry

DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
"""


def test_a_denied_request_is_counted_against_its_service() -> None:
    async def body() -> None:
        backend = await Backend("v1-a", "127.0.0.11").start()
        try:
            state = with_backends(world(l7=objects(DENY_ADMIN)), {"reviews-v1-a": backend})
            async with waypoint(config_for(state), "10.96.0.20:9080") as wp:
                assert (await request(wp.address, path="/admin"))[0] == 403
                assert (await request(wp.address, path="/", host="evil.example"))[0] == 200
                assert (await request(wp.address, path="/admin", host="x.example"))[0] == 403
                telemetry = Telemetry()
                seen = [dict(zip(LABELS, telemetry.labels(r), strict=True)) for r in wp.records]
        finally:
            await backend.stop()
        for labels in seen:
            assert labels["destination_service"] == "reviews.shop.svc.cluster.local"
            assert labels["destination_service_name"] == "reviews"
            assert labels["destination_service_namespace"] == "shop"
        assert [s["response_code"] for s in seen] == ["403", "200", "403"]

    run(body)
