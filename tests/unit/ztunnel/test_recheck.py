"""Live connections decided again on a new snapshot: which ones a change closes, and why.

The connections are (key, facts) pairs, as the proxy keeps them; keys here
are plain names so each answer reads as the list of what gets closed.
"""

from __future__ import annotations

import ipaddress

from mesh.identity import SpiffeId
from mesh.model import Policy, Workload
from tests.unit.ztunnel.conftest import index, policy, workload
from ztunnel.authz import Connection, revoked
from ztunnel.index import StateIndex

SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/client/sa/sleep")
OTHER = SpiffeId.parse("spiffe://cluster.local/ns/client/sa/other")
ECHO_IP = "10.244.1.2"
ECHO = ("server", "echo")


def conn(identity: SpiffeId | None, port: int = 8080, source: str = "10.244.0.2") -> Connection:
    return Connection(
        source_identity=identity,
        source_ip=ipaddress.ip_address(source),
        destination_ip=ipaddress.ip_address(ECHO_IP),
        destination_port=port,
    )


LIVE = [
    ("sleep:8080", conn(SLEEP)),
    ("sleep:9090", conn(SLEEP, port=9090)),
    ("other:8080", conn(OTHER)),
    ("plaintext:8080", conn(None, source="10.244.7.7")),
]


def snapshot(*policies: Policy, named: tuple[str, ...] = (), echo: bool = True) -> StateIndex:
    workloads: tuple[Workload, ...] = (
        (workload("echo", ECHO_IP, namespace="server", policies=named),) if echo else ()
    )
    return index(workloads, policies=policies)


def closed(idx: StateIndex, live: list[tuple[str, Connection]] = LIVE) -> list[str]:
    return [key for key, _ in revoked(idx, ECHO, live)]


DENY_SLEEP_8080 = policy(
    "deny-sleep",
    "server",
    {
        "action": "DENY",
        "rules": [
            {
                "from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}],
                "to": [{"operation": {"ports": ["8080"]}}],
            }
        ],
    },
)


def test_without_policies_nothing_is_closed() -> None:
    assert closed(snapshot()) == []


def test_a_deny_closes_exactly_the_connections_it_matches_and_names_itself() -> None:
    answer = revoked(snapshot(DENY_SLEEP_8080), ECHO, LIVE)
    assert [key for key, _ in answer] == ["sleep:8080"]
    ((_, decision),) = answer
    assert not decision.allowed and decision.policy == "server/deny-sleep"


def test_an_allow_closes_everyone_it_does_not_name() -> None:
    allow_sleep = policy(
        "allow-sleep",
        "server",
        {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}]}]},
    )
    answer = revoked(snapshot(allow_sleep), ECHO, LIVE)
    assert [key for key, _ in answer] == ["other:8080", "plaintext:8080"]
    # No policy decided a "nothing matched": the reason lists the ones that applied.
    assert all(d.policy is None and "server/allow-sleep" in d.reason for _, d in answer)


def test_a_plaintext_only_deny_spares_mesh_peers() -> None:
    no_plaintext = policy(
        "no-plaintext",
        "server",
        {"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]},
    )
    assert closed(snapshot(no_plaintext)) == ["plaintext:8080"]


def test_unrelated_changes_close_nothing() -> None:
    # A policy of another namespace, a selector policy the workload does not name,
    # and a DENY for a principal that has no live connection.
    elsewhere = policy("lock", "attic", {})
    not_ours = policy(
        "not-ours",
        "server",
        {"selector": {"matchLabels": {"app": "other"}}, "action": "DENY", "rules": [{}]},
    )
    deny_ghost = policy(
        "deny-ghost",
        "server",
        {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["*/sa/ghost"]}}]}]},
    )
    assert closed(snapshot(elsewhere, not_ours, deny_ghost)) == []


def test_a_selector_policy_applies_once_the_workload_names_it() -> None:
    deny_all = policy(
        "deny-all",
        "server",
        {"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY", "rules": [{}]},
    )
    assert closed(snapshot(deny_all)) == []
    everyone = [key for key, _ in LIVE]
    assert closed(snapshot(deny_all, named=("server/deny-all",))) == everyone


def test_a_policy_named_but_not_received_yet_decides_nothing_until_it_arrives() -> None:
    # New connections are refused meanwhile (fail closed); live ones are left as they
    # are, since the late policy may well allow them. Its arrival decides.
    late = ("server/deny-sleep",)
    assert closed(snapshot(named=late)) == []
    assert closed(snapshot(DENY_SLEEP_8080, named=late)) == ["sleep:8080"]


def test_the_workload_leaving_the_snapshot_closes_all_its_connections() -> None:
    answer = revoked(snapshot(echo=False), ECHO, LIVE)
    assert [key for key, _ in answer] == [key for key, _ in LIVE]
    assert all("server/echo left the xDS state" in d.reason for _, d in answer)


def test_connections_with_the_same_facts_are_all_closed() -> None:
    twins = [("a", conn(SLEEP)), ("b", conn(SLEEP)), ("c", conn(SLEEP, port=9090))]
    assert closed(snapshot(DENY_SLEEP_8080), twins) == ["a", "b"]


def test_source_ip_blocks_are_checked_against_the_recorded_source() -> None:
    deny_range = policy(
        "deny-range",
        "server",
        {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.244.7.0/24"]}}]}]},
    )
    assert closed(snapshot(deny_range)) == ["plaintext:8080"]
