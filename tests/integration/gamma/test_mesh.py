"""GAMMA conformance: the mesh cases (see the package docstring)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.integration.conftest import meshlab
from tests.integration.gamma.harness import (
    CONSUMER_CLIENT,
    CONSUMER_NS,
    NS,
    Case,
    Expect,
    applied,
    conditions,
    converge,
    eventually,
    http,
    indent,
    route,
    send,
    set_response_header,
    to,
)


def test_mesh_basic(mesh: str) -> None:
    """MeshBasic: a mesh client reaches a mesh server, no route applied."""
    converge(
        mesh,
        [
            Case("http://echo/", http("/"), Expect(path="/", host="echo")),
            # Beyond upstream: the tcp port (no appProtocol) is relayed as bytes, not
            # proxied as HTTP: the echo answers on it, and no waypoint header is added.
            Case(
                "tcp echo:9090",
                http("/", host="echo:9090"),
                Expect(host="echo:9090", absent=("X-Request-Id", "X-Forwarded-Proto")),
            ),
        ],
    )


def test_mesh_traffic_split(mesh: str, tmp_path: Path) -> None:
    """MeshTrafficSplit: Exact paths to each version's Service, parentRef without port."""
    rules = """
- matches: [{path: {type: Exact, value: /v1}}]
  backendRefs: [{name: echo-v1, port: 80}]
- matches: [{path: {type: Exact, value: /v2}}]
  backendRefs: [{name: echo-v2, port: 80}]
"""
    with applied(mesh, tmp_path, route("mesh-split", "echo", rules)):
        converge(
            mesh,
            [
                to("echo-v1", http("/v1")),
                to("echo-v2", http("/v2")),
                # Beyond upstream: once a route attaches, what it does not match is 404.
                Case("/v3", http("/v3"), Expect(status=404)),
            ],
        )


MESH_FRONTEND = route(
    "mesh-split-v1",
    "echo-v2",
    f"- filters:\n{indent(set_response_header('set'), 2)}"
    "  backendRefs: [{name: echo-v2, port: 80}]",
)

DIRECT_TO_V2 = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: echo-v2-direct
  namespace: {NS}
spec:
  selector:
    matchLabels: {{app: echo, version: v2}}
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: [{NS}]
"""


def test_mesh_frontend(mesh: str, tmp_path: Path) -> None:
    """MeshFrontend: a route applies to its Service's address only, not to the pod's IP."""
    pods = json.loads(meshlab("status", "--name", mesh, "-o", "json").stdout)["pods"]
    v2_ip = next(p["ip"] for p in pods if p["name"] == "echo-v2-1" and p["namespace"] == NS)
    direct = http("/", host=f"{v2_ip}:8080")
    service = to("echo-v2", http("/", host="echo-v2"), response_headers={"X-Header-Set": "set"})
    with applied(mesh, tmp_path, MESH_FRONTEND):
        converge(mesh, [service])
        # Deliberately beyond Istio (README, "Fail closed"): a pod bound to a waypoint
        # takes no traffic from elsewhere unless an ALLOW policy names it, so dialling
        # its IP is refused rather than skipping the waypoint. Istio lets it in, and
        # upstream expects echo-v2 to answer without the route's header.
        (refused,) = send(mesh, [direct])
        assert isinstance(refused["status"], str), refused  # the connection, reset
        policy = tmp_path / "policy.yaml"
        policy.write_text(DIRECT_TO_V2)
        meshlab("apply", "--name", mesh, "-f", str(policy))
        try:
            # With an explicit ALLOW (of the namespace: the waypoint's identity too),
            # upstream's expectation: echo-v2 answers and the route does not apply.
            pod_ip = to("echo-v2", direct, absent_response_headers=("X-Header-Set",))
            converge(mesh, [pod_ip, service])
        finally:
            meshlab("delete", "--name", mesh, "-f", str(policy))
        eventually(lambda: isinstance(send(mesh, [direct])[0]["status"], str))


def test_mesh_frontend_hostname(mesh: str, tmp_path: Path) -> None:
    """MeshFrontendHostname: the parentRef matches the Service's IP, not the Host header."""
    with applied(mesh, tmp_path, MESH_FRONTEND):
        converge(
            mesh,
            [
                to(
                    "echo-v2",
                    http("/", ("Host", "echo-v1"), host="echo-v2"),
                    host="echo-v1",
                    response_headers={"X-Header-Set": "set"},
                ),
                to(
                    "echo-v1",
                    http("/", ("Host", "echo-v2"), host="echo-v1"),
                    host="echo-v2",
                    absent_response_headers=("X-Header-Set",),
                ),
            ],
        )


def test_mesh_ports(mesh: str, tmp_path: Path) -> None:
    """MeshPorts: a parentRef port limits the route to that port; without one, to all."""
    manifest = "---\n".join(
        route(
            f"mesh-split-{v}",
            f"echo-{v}",
            f"- filters:\n{indent(set_response_header(v), 2)}"
            f"  backendRefs: [{{name: echo-{v}, port: 80}}]",
            port=port,
        )
        for v, port in (("v1", 80), ("v2", None))
    )
    with applied(mesh, tmp_path, manifest):
        converge(
            mesh,
            [
                to("echo-v1", http("/", host="echo-v1"), response_headers={"X-Header-Set": "v1"}),
                to(
                    "echo-v1",
                    http("/", host="echo-v1:8080"),
                    absent_response_headers=("X-Header-Set",),
                ),
                to("echo-v2", http("/", host="echo-v2"), response_headers={"X-Header-Set": "v2"}),
                to(
                    "echo-v2",
                    http("/", host="echo-v2:8080"),
                    response_headers={"X-Header-Set": "v2"},
                ),
            ],
        )


CONSUMER_ROUTE = f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mesh-echo-add-header
  namespace: {CONSUMER_NS}
spec:
  parentRefs:
  - {{group: "", kind: Service, name: echo-v1, namespace: {NS}}}
  rules:
  - filters:
{indent(set_response_header("set"), 4)}\
    backendRefs: [{{name: echo-v1, namespace: {NS}, port: 80}}]
"""


def test_mesh_consumer_route_is_refused_with_its_reason(mesh: str, tmp_path: Path) -> None:
    """MeshConsumerRoute, where we deliberately differ from upstream and Istio.

    Upstream (and Istio) apply a route in another namespace than its parent
    Service's to requests from the route's namespace only: the consumer client
    sees ``X-Header-Set: set``, the producer does not. Our waypoints do not
    implement consumer routes: meshd refuses the route (Accepted=False,
    NotAllowedByParent) and neither client sees it.
    """
    untouched = to(
        "echo-v1", http("/", host=f"echo-v1.{NS}"), absent_response_headers=("X-Header-Set",)
    )
    with applied(mesh, tmp_path, CONSUMER_ROUTE, accepted=False):

        def refused() -> list[dict[str, Any]]:
            """the consumer route's parent says Accepted=False"""
            parents = conditions(mesh, "httproute", CONSUMER_NS, "mesh-echo-add-header")
            return [p for p in parents if p["Accepted"]["status"] == "False"]

        (parent,) = eventually(refused)
        assert parent["Accepted"]["reason"] == "NotAllowedByParent", parent
        assert "consumer routes" in parent["Accepted"]["message"], parent
        converge(mesh, [untouched], client=CONSUMER_CLIENT)
        converge(mesh, [untouched])
