"""A ztunnel policy (bound by selector) that meshd cannot read is never dropped.

On Kubernetes such an object exists whatever meshd thinks of it; leaving it
out would allow by accident what a DENY was written to stop, or everything
an only ALLOW was written to limit. It stands instead as a DENY of every
connection to what it may select, and its ``ZtunnelAccepted`` condition says
why. Asserted as ztunnel decides (:mod:`ztunnel.authz`) on the policy meshd
sends.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from controlplane.authz_yaml import InvalidPolicy, ztunnel_status
from controlplane.sources.kube_convert import convert_authorization_policy
from controlplane.sources.local import source_state
from controlplane.state import AuthorizationPolicyInfo
from controlplane.translate import build_policy
from mesh.cluster import parse_spec
from mesh.identity import SpiffeId
from ztunnel.authz import Connection, matches

FRONTEND = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/frontend")


def convert(spec: Any, name: str = "p") -> AuthorizationPolicyInfo:
    obj = {"metadata": {"name": name, "namespace": "shop", "generation": 4}, "spec": spec}
    converted = convert_authorization_policy(obj)
    if isinstance(converted, tuple):
        info, notes = converted
        assert notes == (info.invalid,)  # logged once by the informer
        return info
    assert isinstance(converted, AuthorizationPolicyInfo)
    return converted


def denies(info: AuthorizationPolicyInfo, port: int) -> bool:
    conn = Connection(
        source_identity=FRONTEND,
        source_ip=ipaddress.ip_address("10.244.1.5"),
        destination_ip=ipaddress.ip_address("10.244.2.7"),
        destination_port=port,
    )
    policy = build_policy(info, "istio-system")
    return policy.action.name == "DENY" and matches(policy, conn)


def test_an_unreadable_allow_denies_everything_its_selector_selects() -> None:
    info = convert(
        {
            "selector": {"matchLabels": {"app": "db"}},
            "action": "ALLOW",
            "rules": [{"to": [{"operation": {"portz": ["5432"]}}]}],  # a typo
        }
    )
    assert info.selector == {"app": "db"}
    assert denies(info, 5432) and denies(info, 22)
    (condition,) = ztunnel_status(info).conditions
    assert (condition.type, condition.status, condition.reason) == (
        "ZtunnelAccepted",
        False,
        "Invalid",
    )
    assert "spec.rules[0].to[0].operation" in condition.message and "portz" in condition.message
    assert "DENY of every connection to the workloads it selects" in condition.message


def test_an_unreadable_selector_widens_the_denial_to_the_namespace_and_says_so() -> None:
    info = convert(
        {
            "selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": ["5432"]}}]}],
        }
    )
    assert info.selector is None and info.namespace == "shop"
    assert denies(info, 8080)
    assert "all of namespace shop, as its selector cannot be read" in info.invalid


def test_a_readable_policy_is_untouched_and_a_nameless_one_is_refused() -> None:
    fine = convert({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["5432"]}}]}]})
    assert not fine.invalid and denies(fine, 5432) and not denies(fine, 8080)
    with pytest.raises(InvalidPolicy, match=r"metadata\.name"):
        convert_authorization_policy({"metadata": {"namespace": "shop"}, "spec": {"rules": 3}})


def test_meshlabs_cluster_file_fails_closed_the_same_way() -> None:
    cluster = parse_spec(
        {
            "nodes": [{"name": "node1"}],
            "namespaces": [{"name": "shop"}],
            "authorizationPolicies": [
                {
                    "apiVersion": "security.istio.io/v1",
                    "kind": "AuthorizationPolicy",
                    "metadata": {"name": "typo", "namespace": "shop"},
                    "spec": {"action": "DENY", "rulez": []},
                }
            ],
        }
    )
    (info,) = source_state(cluster).policies
    assert info.name == "typo" and "spec.rulez" in info.invalid and denies(info, 1)
