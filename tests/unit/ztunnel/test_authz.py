"""L4 authorization with Istio's semantics, from the YAML a user applies."""

from __future__ import annotations

import ipaddress

from mesh.identity import SpiffeId
from mesh.model import Policy
from tests.unit.ztunnel.conftest import index, policy, workload
from ztunnel.authz import Connection, authorize

SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/client/sa/sleep")
OTHER = SpiffeId.parse("spiffe://cluster.local/ns/client/sa/other")
FOREIGN_NS = SpiffeId.parse("spiffe://cluster.local/ns/attic/sa/sleep")
ECHO_IP = "10.244.1.2"


def conn(identity: SpiffeId | None, port: int = 8080, source: str = "10.244.0.2") -> Connection:
    return Connection(
        source_identity=identity,
        source_ip=ipaddress.ip_address(source),
        destination_ip=ipaddress.ip_address(ECHO_IP),
        destination_port=port,
    )


def check(policies: tuple[Policy, ...], c: Connection, named: tuple[str, ...] = ()) -> bool:
    """Whether ``c`` reaches server/echo, which names the WORKLOAD_SELECTOR policies ``named``."""
    echo = workload("echo", ECHO_IP, namespace="server", policies=named)
    return authorize(index((echo,), policies=policies), echo, c).allowed


ALLOW_SLEEP = policy(
    "allow-sleep",
    "server",
    {
        "selector": {"matchLabels": {"app": "echo"}},
        "rules": [
            {
                "from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}],
                "to": [{"operation": {"ports": ["8080"]}}],
            }
        ],
    },
)


def test_without_policies_everything_is_allowed() -> None:
    echo = workload("echo", ECHO_IP, namespace="server")
    decision = authorize(index((echo,)), echo, conn(None))
    assert decision.allowed and decision.reason == "no ALLOW policy applies"


def test_allow_by_principal_and_port_denies_everyone_else() -> None:
    named = ("server/allow-sleep",)
    assert check((ALLOW_SLEEP,), conn(SLEEP), named)
    assert not check((ALLOW_SLEEP,), conn(SLEEP, port=9090), named)
    assert not check((ALLOW_SLEEP,), conn(OTHER), named)
    assert not check((ALLOW_SLEEP,), conn(None), named)  # plaintext has no principal
    # Not named by the workload (its selector does not select it): it does not apply.
    assert check((ALLOW_SLEEP,), conn(OTHER))


def test_the_decision_names_the_policy_that_made_it() -> None:
    echo = workload("echo", ECHO_IP, namespace="server", policies=("server/allow-sleep",))
    idx = index((echo,), policies=(ALLOW_SLEEP,))
    allowed = authorize(idx, echo, conn(SLEEP))
    assert allowed.policy == "server/allow-sleep"
    denied = authorize(idx, echo, conn(OTHER))
    assert denied.policy is None and "server/allow-sleep" in denied.reason


def test_a_matching_deny_wins_over_a_matching_allow() -> None:
    deny = policy(
        "deny-sleep",
        "server",
        {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["*/sa/sleep"]}}]}]},
    )
    decision_allowed = check((ALLOW_SLEEP, deny), conn(SLEEP), ("server/allow-sleep",))
    assert not decision_allowed
    echo = workload("echo", ECHO_IP, namespace="server", policies=("server/allow-sleep",))
    decision = authorize(index((echo,), policies=(ALLOW_SLEEP, deny)), echo, conn(SLEEP))
    assert decision.policy == "server/deny-sleep"


def test_namespace_and_global_scope_apply_other_namespaces_do_not() -> None:
    namespace_wide = policy(
        "ns-only", "server", {"rules": [{"from": [{"source": {"namespaces": ["client"]}}]}]}
    )
    elsewhere = policy("lock", "attic", {})  # ALLOW nothing, but in another namespace
    assert check((namespace_wide, elsewhere), conn(SLEEP))
    assert not check((namespace_wide,), conn(FOREIGN_NS))
    mesh_wide = policy(
        "deny-attic",
        "istio-system",
        {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["attic"]}}]}]},
    )
    assert not check((mesh_wide,), conn(FOREIGN_NS))
    assert check((mesh_wide,), conn(SLEEP))


def test_not_principals_star_denies_plaintext_only() -> None:
    deny_plaintext = policy(
        "no-plaintext",
        "server",
        {"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]},
    )
    assert not check((deny_plaintext,), conn(None))
    assert check((deny_plaintext,), conn(OTHER))


def test_ip_blocks_and_their_negation() -> None:
    from_pods = policy(
        "pods",
        "server",
        {
            "rules": [
                {
                    "from": [
                        {
                            "source": {
                                "ipBlocks": ["10.244.0.0/16"],
                                "notIpBlocks": ["10.244.9.0/24"],
                            }
                        }
                    ]
                }
            ]
        },
    )
    assert check((from_pods,), conn(None, source="10.244.0.2"))
    assert not check((from_pods,), conn(None, source="10.244.9.7"))
    assert not check((from_pods,), conn(None, source="192.168.1.1"))
    assert not check((from_pods,), conn(None, source="fd00::1"))  # another family


def test_empty_policies_allow_nothing_and_deny_nothing() -> None:
    allow_nothing = policy("allow-nothing", "server", {})
    deny_nothing = policy("deny-nothing", "server", {"action": "DENY"})
    assert not check((allow_nothing,), conn(SLEEP))
    assert check((deny_nothing,), conn(SLEEP))
    allow_all = policy("allow-all", "server", {"rules": [{}]})
    assert check((allow_nothing, allow_all), conn(None))


def test_a_named_policy_not_received_yet_denies() -> None:
    echo = workload("echo", ECHO_IP, namespace="server", policies=("server/late",))
    decision = authorize(index((echo,)), echo, conn(SLEEP))
    assert not decision.allowed and "server/late" in decision.reason


def test_a_pod_behind_a_waypoint_takes_traffic_only_through_it() -> None:
    """Beyond Istio: the waypoint cannot be bypassed by dialling the pod directly."""
    from mesh.model import Port
    from tests.unit.ztunnel.conftest import service

    reviews = service("reviews", "10.96.0.20", "server", waypoint="10.96.0.30")
    wp_service = service(
        "waypoint", "10.96.0.30", "server", ports=(Port(service_port=15008, target_port=15008),)
    )
    echo = workload(
        "echo",
        ECHO_IP,
        namespace="server",
        services={reviews.resource_name: reviews.ports},
    )
    wp_pod = workload(
        "waypoint",
        "10.244.1.30",
        namespace="server",
        sa="waypoint",
        hbone=False,
        services={wp_service.resource_name: wp_service.ports},
    )
    waypoint_id = wp_pod.identity
    idx = index((echo, wp_pod), (reviews, wp_service))
    assert authorize(idx, echo, conn(waypoint_id)).allowed
    direct = authorize(idx, echo, conn(SLEEP))
    assert not direct.allowed and "bound to waypoint 10.96.0.30:15008" in direct.reason
    # An ALLOW that names the client lets it past the waypoint, on purpose.
    named = workload(
        "echo",
        ECHO_IP,
        namespace="server",
        services={reviews.resource_name: reviews.ports},
        policies=("server/allow-sleep",),
    )
    idx = index((named, wp_pod), (reviews, wp_service), (ALLOW_SLEEP,))
    allowed = authorize(idx, named, conn(SLEEP))
    assert allowed.allowed and allowed.policy == "server/allow-sleep"
    assert not authorize(idx, named, conn(OTHER)).allowed


def test_a_missing_waypoint_lets_nothing_in() -> None:
    from mesh.model import GatewayAddress

    echo = workload("echo", ECHO_IP, namespace="server")
    from dataclasses import replace

    echo = replace(echo, waypoint=GatewayAddress(hostname="server/gone.server.svc.cluster.local"))
    decision = authorize(index((echo,)), echo, conn(SLEEP))
    assert not decision.allowed and "traffic must come through it" in decision.reason
