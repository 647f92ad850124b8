"""The saved ``/config_dump`` the ``ztunnel-ctl`` tests read: node1's ztunnel of a small mesh.

Built from model values through the codec, plus the parts the admin server
adds (certificates, enrolled pods with their connections, config), so it is
the document a live ztunnel would serve.

* client/sleep (node1, enrolled) and client/curl (node1, HBONE in xDS but
  not enrolled: its capture failed);
* server/echo-1 (node1), echo-2 and echo-3 (node2, echo-3 unhealthy) behind
  server/echo 10.96.0.20:80 -> 8080; echo-2 also behind server/local, whose
  internalTrafficPolicy is Local (STRICT on the node);
* legacy/db (node2, not in the mesh) behind legacy/db 10.96.0.30:5432;
* shop/cart (node2) with waypoint shop/waypoint (10.96.0.9 -> pod 10.244.1.5),
  and service shop/cart whose waypoint is the same;
* policies: a GLOBAL DENY of namespace attic, server's NAMESPACE DENY of
  port 9090, echo's ALLOW (rule 0: curl on 9999; rule 1: sleep), cart's
  ALLOW of the waypoint.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from mesh.model import LoadBalancing, LoadBalancingMode, LoadBalancingScope, Port
from mesh.model.dump import dump_state, load_state
from mesh.xds import XdsState
from tests.unit.ztunnel.conftest import index, policy, service, workload

ECHO = "server/echo.server.svc.cluster.local"
LOCAL = "server/local.server.svc.cluster.local"
DB = "legacy/db.legacy.svc.cluster.local"
CART = "shop/cart.shop.svc.cluster.local"
WAYPOINT = "shop/waypoint.shop.svc.cluster.local"
HTTP = (Port(service_port=80, target_port=8080),)

SLEEP_ID = "spiffe://cluster.local/ns/client/sa/sleep"
CURL_ID = "spiffe://cluster.local/ns/client/sa/curl"
ECHO_ID = "spiffe://cluster.local/ns/server/sa/echo"


def _state() -> XdsState:
    workloads = (
        workload("sleep", "10.244.0.2", "client", "sleep"),
        workload("curl", "10.244.0.5", "client", "curl"),
        workload(
            "echo-1",
            "10.244.0.3",
            "server",
            "echo",
            services={ECHO: HTTP},
            policies=("server/allow-echo",),
        ),
        workload(
            "echo-2",
            "10.244.1.2",
            "server",
            "echo",
            node="node2",
            services={ECHO: HTTP, LOCAL: HTTP},
            policies=("server/allow-echo",),
        ),
        workload(
            "echo-3",
            "10.244.1.3",
            "server",
            "echo",
            node="node2",
            services={ECHO: HTTP},
            healthy=False,
        ),
        workload(
            "db",
            "10.244.1.9",
            "legacy",
            hbone=False,
            node="node2",
            services={DB: (Port(service_port=5432, target_port=5432),)},
        ),
        workload(
            "cart",
            "10.244.1.4",
            "shop",
            "cart",
            node="node2",
            services={CART: HTTP},
            policies=("shop/allow-waypoint",),
            waypoint="10.96.0.9",
        ),
        workload(
            "waypoint",
            "10.244.1.5",
            "shop",
            "waypoint",
            node="node2",
            services={WAYPOINT: (Port(service_port=15008, target_port=15008),)},
        ),
    )
    services = (
        service("echo", "10.96.0.20", "server"),
        replace(
            service("local", "10.96.0.40", "server"),
            load_balancing=LoadBalancing(
                routing_preference=(LoadBalancingScope.NODE,), mode=LoadBalancingMode.STRICT
            ),
        ),
        service("db", "10.96.0.30", "legacy", ports=(Port(service_port=5432, target_port=5432),)),
        service("cart", "10.96.0.8", "shop", waypoint="10.96.0.9"),
        service(
            "waypoint", "10.96.0.9", "shop", ports=(Port(service_port=15008, target_port=15008),)
        ),
    )
    policies = (
        policy(
            "deny-attic",
            "istio-system",
            {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["attic"]}}]}]},
        ),
        policy(
            "deny-9090",
            "server",
            {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]},
        ),
        policy(
            "allow-echo",
            "server",
            {
                "selector": {"matchLabels": {"app": "echo"}},
                "rules": [
                    {
                        "from": [{"source": {"principals": ["cluster.local/ns/client/sa/curl"]}}],
                        "to": [{"operation": {"ports": ["9999"]}}],
                    },
                    {"from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}]},
                ],
            },
        ),
        policy(
            "allow-waypoint",
            "shop",
            {
                "selector": {"matchLabels": {"app": "cart"}},
                "rules": [
                    {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/waypoint"]}}]}
                ],
            },
        ),
    )
    return index(workloads, services, policies).state


def _cert(serial: int, start: str, end: str) -> dict[str, str]:
    return {
        "pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "serialNumber": str(serial),
        "validFrom": start,
        "expirationTime": end,
    }


def _conn(src: str, original: str, actual: str, src_id: str, dst_id: str) -> dict[str, Any]:
    return {
        "src": src,
        "originalDst": original,
        "actualDst": actual,
        "protocol": "HBONE",
        "srcIdentity": src_id,
        "dstIdentity": dst_id,
        "bytesSent": 12,
        "bytesReceived": 34,
        "startedAt": "2025-01-01T10:00:00Z",
    }


def build_dump() -> dict[str, Any]:
    doc = dump_state(_state())
    doc["certificates"] = [
        {
            "identity": CURL_ID,
            "state": "Initializing",
            "certChain": [],
            "rootCerts": [],
        },
        {
            "identity": SLEEP_ID,
            "state": "Available",
            "certChain": [_cert(255, "2025-01-01T00:00:00Z", "2099-01-02T00:00:00Z")],
            "rootCerts": [_cert(4096, "2024-01-01T00:00:00Z", "2098-01-01T00:00:00Z")],
        },
        {
            "identity": ECHO_ID,
            "state": "Unavailable: the CA at 10.0.0.1:15012 is unreachable",
            "certChain": [],
            "rootCerts": [],
        },
    ]
    to_echo = _conn("10.244.0.2:40000", "10.96.0.20:80", "10.244.0.3:15008", SLEEP_ID, ECHO_ID)
    from_sleep = _conn("10.244.0.2:40000", "10.244.0.3:8080", "10.244.0.3:8080", SLEEP_ID, ECHO_ID)
    doc["workloadState"] = {
        "uid-sleep": {
            "state": "Up",
            "info": {
                "name": "sleep",
                "namespace": "client",
                "trustDomain": "cluster.local",
                "serviceAccount": "sleep",
            },
            "netns": "/proc/1234/fd/7",
            "connections": {"inbound": [], "outbound": [to_echo]},
        },
        "uid-echo-1": {
            "state": "Up",
            "info": {
                "name": "echo-1",
                "namespace": "server",
                "trustDomain": "cluster.local",
                "serviceAccount": "echo",
            },
            "netns": "/proc/1234/fd/8",
            "connections": {"inbound": [from_sleep], "outbound": []},
        },
    }
    doc["config"] = {
        "node": "node1",
        "xdsAddress": "172.30.5.1:15010",
        "trustDomain": "cluster.local",
        "synced": True,
        "pid": 1234,
    }
    return doc


DUMP = build_dump()


def saved(tmp_path: Path, doc: dict[str, Any] | None = None) -> str:
    """The dump (or ``doc``) written to a file, as ``curl .../config_dump > f`` would."""
    path = tmp_path / "dump.json"
    path.write_text(json.dumps(DUMP if doc is None else doc, indent=2))
    return str(path)


def dump_copy() -> dict[str, Any]:
    return copy.deepcopy(DUMP)


def test_the_fixture_is_a_valid_synced_snapshot() -> None:
    state, expected = load_state(DUMP), _state()
    assert state.synced
    assert (state.workloads, state.services, state.policies) == (
        expected.workloads,
        expected.services,
        expected.policies,
    )


def test_unhealthy_endpoints_are_left_out_of_the_service_as_in_ztunnel() -> None:
    echo = next(s for s in DUMP["services"] if s["name"] == "echo")
    assert sorted(echo["endpoints"]) == [
        "Kubernetes//Pod/server/echo-1",
        "Kubernetes//Pod/server/echo-2",
    ]
