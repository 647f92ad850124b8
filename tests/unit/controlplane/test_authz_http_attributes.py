"""Policies ztunnel enforces that name HTTP attributes: Istio's ambient semantics.

Each case parses the user's YAML as meshd does, builds the policy ztunnel is
sent, and asks ztunnel's own decision (:mod:`ztunnel.authz`) about
connections, so what is asserted is what a client would see: an ALLOW rule
naming HTTP attributes matches nothing, a DENY rule is enforced without them,
and the policy carries Istio's ``ZtunnelAccepted`` warning word for word.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from controlplane.authz_yaml import parse_authorization_policy, ztunnel_status
from controlplane.state import AuthorizationPolicyInfo
from controlplane.translate import build_policy
from mesh.identity import SpiffeId
from ztunnel.authz import Connection, matches

FRONTEND = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/frontend")
OTHER = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/other")
ADMIN = SpiffeId.parse("spiffe://cluster.local/ns/ops/sa/admin")


def policy(spec: dict[str, Any]) -> AuthorizationPolicyInfo:
    return parse_authorization_policy(
        {"metadata": {"name": "p", "namespace": "shop", "generation": 3}, "spec": spec}
    )


def hits(info: AuthorizationPolicyInfo, who: SpiffeId | None, port: int = 8080) -> bool:
    conn = Connection(
        source_identity=who,
        source_ip=ipaddress.ip_address("10.244.1.5"),
        destination_ip=ipaddress.ip_address("10.244.2.7"),
        destination_port=port,
    )
    return matches(build_policy(info, "istio-system"), conn)


FRONTEND_POSTS = {
    "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
    "to": [{"operation": {"methods": ["POST"], "paths": ["/orders"]}}],
}


def test_an_allow_rule_with_http_attributes_matches_nothing_and_says_so() -> None:
    only_l7 = policy({"action": "ALLOW", "rules": [FRONTEND_POSTS]})
    assert only_l7.rules == ()  # a policy left without rules: it allows nothing
    assert not hits(only_l7, FRONTEND) and not hits(only_l7, OTHER)
    assert only_l7.warning == (
        "ztunnel does not support HTTP attributes (found: methods, paths). "
        "In ambient mode you must use a waypoint proxy to enforce HTTP rules. "
        "Within an ALLOW policy, rules matching HTTP attributes are omitted. "
        "This will be more restrictive than requested."
    )
    # The other rules of the policy keep working.
    admin = {"from": [{"source": {"namespaces": ["ops"]}}]}
    mixed = policy({"action": "ALLOW", "rules": [FRONTEND_POSTS, admin]})
    assert hits(mixed, ADMIN) and not hits(mixed, FRONTEND)


def test_a_deny_rule_with_http_attributes_denies_all_its_l4_parts_match() -> None:
    deny = policy({"action": "DENY", "rules": [FRONTEND_POSTS]})
    assert hits(deny, FRONTEND), "the frontend is denied outright, not only its POSTs"
    assert not hits(deny, OTHER)
    assert "DENY policy with HTTP attributes is enforced without the HTTP rules." in deny.warning
    # A condition ztunnel cannot see holds for every connection, in a DENY.
    header = policy(
        {
            "action": "DENY",
            "rules": [{"when": [{"key": "request.headers[x-user]", "values": ["eve"]}]}],
        }
    )
    assert hits(header, OTHER) and hits(header, None)
    assert "(found: request.headers[x-user])" in header.warning


def test_every_http_attribute_istio_names_is_found() -> None:
    spec = {
        "rules": [
            {
                "from": [
                    {
                        "source": {
                            "requestPrincipals": ["*"],
                            "notRequestPrincipals": ["x"],
                            "remoteIpBlocks": ["1.2.3.4"],
                            "notRemoteIpBlocks": ["5.6.7.8"],
                        }
                    }
                ],
                "to": [
                    {
                        "operation": {
                            "hosts": ["a"],
                            "notHosts": ["b"],
                            "methods": ["GET"],
                            "notMethods": ["PUT"],
                            "paths": ["/x"],
                            "notPaths": ["/y"],
                        }
                    }
                ],
                "when": [
                    {"key": "request.auth.claims[groups]", "values": ["admin"]},
                    {"key": "request.auth.audiences", "values": ["a"]},
                    {"key": "request.auth.presenter", "values": ["a"]},
                    {"key": "request.auth.principal", "values": ["a"]},
                    {"key": "remote.ip", "values": ["1.2.3.4"]},
                    {"key": "connection.sni", "values": ["a"]},
                ],
            }
        ]
    }
    found = policy(spec).warning.split("(found: ")[1].split(")")[0]
    assert found.split(", ") == sorted(
        [
            *("connection.sni", "hosts", "methods", "notHosts", "notMethods", "notPaths"),
            *("notRemoteIpBlocks", "notRequestPrincipals", "paths", "remote.ip"),
            *("remoteIpBlocks", "request.auth.audiences", "request.auth.claims[groups]"),
            *("request.auth.presenter", "request.auth.principal", "requestPrincipals"),
        ]
    )


def test_l4_conditions_and_service_accounts_are_enforced() -> None:
    when = policy(
        {
            "action": "ALLOW",
            "rules": [
                {
                    "when": [
                        {"key": "source.namespace", "values": ["shop"]},
                        {"key": "source.principal", "notValues": ["*/sa/other"]},
                        {"key": "destination.port", "values": ["8080"]},
                        {"key": "source.ip", "values": ["10.244.0.0/16"]},
                        {"key": "destination.ip", "notValues": ["10.244.9.0/24"]},
                    ]
                }
            ],
        }
    )
    assert when.warning == ""
    assert hits(when, FRONTEND) and not hits(when, OTHER) and not hits(when, ADMIN)
    assert not hits(when, FRONTEND, port=9090)
    accounts = policy({"rules": [{"from": [{"source": {"serviceAccounts": ["frontend"]}}]}]})
    assert hits(accounts, FRONTEND) and not hits(accounts, OTHER) and not hits(accounts, None)
    elsewhere = policy({"rules": [{"from": [{"source": {"serviceAccounts": ["ops/admin"]}}]}]})
    assert hits(elsewhere, ADMIN) and not hits(elsewhere, FRONTEND)
    not_accounts = policy(
        {"rules": [{"from": [{"source": {"notServiceAccounts": ["frontend", "ops/admin"]}}]}]}
    )
    assert hits(not_accounts, OTHER) and not hits(not_accounts, FRONTEND)
    assert not hits(not_accounts, ADMIN)


def test_the_status_is_istios_ztunnel_accepted_condition() -> None:
    warned = ztunnel_status(policy({"rules": [FRONTEND_POSTS]})).to_dict()
    (condition,) = warned["status"]["conditions"]
    assert (condition["type"], condition["status"], condition["reason"]) == (
        "ZtunnelAccepted",
        "True",
        "UnsupportedValue",
    )
    assert condition["message"].startswith("ztunnel does not support HTTP attributes")
    assert condition["observedGeneration"] == 3
    plain = ztunnel_status(policy({"rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}))
    assert plain.conditions[0].reason == "Accepted"
    assert plain.conditions[0].message == "attached to ztunnel"
