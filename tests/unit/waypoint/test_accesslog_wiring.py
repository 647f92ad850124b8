"""Access logs as a user turns them on: MeshConfig and Telemetry through meshd, lines from
the waypoint's router (what went upstream, the details, the cluster) into the file named.

The formatter's operators are tests/unit/waypoint/test_accesslog.py; Envoy's lines beside
ours, tests/interop/test_envoy_waypoint_accesslog.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from controlplane.state import L7Object
from tests.support.l7world import world
from tests.support.waypoint_harness import Backend, config_for, request, waypoint, with_backends
from tests.unit.hbone.conftest import run
from waypoint import accesslog

REVIEWS = "10.96.0.20:9080"
ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: logs, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /strip}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /items}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
"""
FORMAT = (
    "%REQ(:PATH)% %REQ(X-ENVOY-ORIGINAL-PATH)% %RESPONSE_CODE% %RESPONSE_CODE_DETAILS% "
    "%UPSTREAM_CLUSTER% %REQ(X-USER)%"
)


def _mesh(path: Path, provider: str) -> L7Object:
    mesh = f"extensionProviders:\n- name: logs\n  envoyFileAccessLog:\n    path: {path}\n{provider}"
    raw = {"data": {"mesh": mesh}, "metadata": {"name": "istio", "namespace": "istio-system"}}
    return L7Object(kind="ConfigMap", namespace="istio-system", name="istio", raw=raw)


TELEMETRY = """
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: logs, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  accessLogging:
  - providers: [{name: logs}]
"""


def _lines(path: Path, provider: str, docs: str = ROUTES + TELEMETRY) -> list[str]:
    async def body() -> None:
        backend = await Backend("v1-a", "127.0.0.11").start()
        try:
            state = world(docs)
            state = replace(state, l7=(*state.l7, _mesh(path, provider)))
            config = config_for(with_backends(state, {"reviews-v1-a": backend}))
            async with waypoint(config, REVIEWS) as wp:
                await request(wp.address, path="/strip/x?q=1", headers={"x-user": "ada"})
                await request(wp.address, path="/items/1")
                await request(wp.address, path="/nowhere")
        finally:
            await backend.stop()
            accesslog.close_all()

    run(body)
    return path.read_text().splitlines() if path.exists() else []


def test_a_telemetry_provider_logs_what_went_upstream_in_its_format(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    lines = _lines(log, f"    logFormat: {{text: '{FORMAT}'}}\n")
    cluster = "inbound-vip|9080|http|reviews-v1.shop.svc.cluster.local"
    assert lines == [
        f"/x?q=1 /strip/x?q=1 200 via_upstream {cluster} ada",
        f"/items/1 - 200 via_upstream {cluster} -",
        "/nowhere - 404 route_not_found - -",
    ]


def test_json_labels_and_a_disabled_telemetry(tmp_path: Path) -> None:
    log = tmp_path / "access.json"
    labels = "    logFormat:\n      labels: {code: '%RESPONSE_CODE%', path: '%REQ(:PATH)%'}\n"
    lines = [json.loads(line) for line in _lines(log, labels)]
    assert lines == [
        {"code": 200, "path": "/x?q=1"},
        {"code": 200, "path": "/items/1"},
        {"code": 404, "path": "/nowhere"},
    ]
    # MeshConfig's default provider logs without any Telemetry; one that disables stops it.
    default = "defaultProviders: {accessLogging: [logs]}\n"
    assert len(_lines(tmp_path / "default.log", default, ROUTES)) == 3
    disabled = TELEMETRY.replace("- providers: [{name: logs}]", "- disabled: true")
    assert _lines(tmp_path / "off.log", default, ROUTES + disabled) == []
