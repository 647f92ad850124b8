"""AuthorizationPolicies bound to a waypoint by targetRefs -> the RBAC filters Envoy enforces."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from typing import Any

import yaml
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from google.protobuf import json_format

from controlplane.l7 import envoy
from controlplane.l7.build import build
from controlplane.sources.kube_convert import convert_authorization_policy
from controlplane.state import AuthorizationPolicyInfo, L7Object, ServicePortInfo
from tests.support.l7world import objects, service, world

REVIEWS = "reviews.shop.svc.cluster.local:9080"
CLASS = "targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]"
GATEWAY = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]"


def policy(spec: str, name: str = "p", namespace: str = "shop", created: str = "") -> str:
    stamp = f", creationTimestamp: '{created}'" if created else ""
    return textwrap.dedent(
        f"""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: {name}, namespace: {namespace}, generation: 2{stamp}}}
        spec:
        """
    ) + textwrap.indent(textwrap.dedent(spec), "  ")


def chains(*docs: str, **changes: Any) -> dict[str, Any]:
    state = world("---\n".join(docs), **changes)
    res = envoy.translate(build(state).shares["shop/waypoint"])
    return {c.name: c for c in res.listeners["waypoint"].filter_chains}


def http_rbac(*docs: str, chain: str = REVIEWS, **changes: Any) -> list[dict[str, Any]]:
    """The chain's RBAC filters as JSON dicts, in filter order."""
    (hcm_filter,) = chains(*docs, **changes)[chain].filters
    hcm = hcm_pb2.HttpConnectionManager()
    hcm_filter.typed_config.Unpack(hcm)
    out = []
    for f in hcm.http_filters:
        if f.name == "envoy.filters.http.rbac":
            msg = http_rbac_pb2.RBAC()
            f.typed_config.Unpack(msg)
            out.append(as_dict(msg.rules))
    assert [f.name for f in hcm.http_filters][-2:] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]
    return out


def network_rbac(chain: Any) -> list[dict[str, Any]]:
    out = []
    for f in chain.filters:
        if f.name == "envoy.filters.network.rbac":
            msg = network_rbac_pb2.RBAC()
            f.typed_config.Unpack(msg)
            assert msg.stat_prefix == "tcp."
            out.append(as_dict(msg.rules))
    assert chain.filters[-1].name == "envoy.filters.network.tcp_proxy"
    return out


def as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def statuses(*docs: str, **changes: Any) -> dict[str, tuple[bool, str, str]]:
    out = {}
    for s in build(world("---\n".join(docs), **changes)).statuses:
        if s.kind == "AuthorizationPolicy":
            (c,) = s.conditions
            assert c.type == "WaypointAccepted"
            out[f"{s.namespace}/{s.name}"] = (c.status, c.reason, c.message)
    return out


PEER = "io.istio.peer_principal"


def any_and(*items: dict[str, Any], key: str = "and_rules") -> dict[str, Any]:
    inner = "rules" if key == "and_rules" else "ids"
    return {key: {inner: list(items)}}


# ------------------------------------------------------------------ translation


def test_the_istio_example_becomes_istio_s_rbac_policy() -> None:
    """Istio's "only the frontend may POST /orders*" example, field by field."""
    (allow,) = http_rbac(
        policy(
            f"""
            {GATEWAY}
            action: ALLOW
            rules:
            - from: [{{source: {{principals: ["cluster.local/ns/shop/sa/frontend"]}}}}]
              to:
              - operation: {{methods: ["POST"], paths: ["/orders*"], notPaths: ["/orders/admin"]}}
            """,
            name="frontend-orders",
        )
    )
    assert allow.get("action", "ALLOW") == "ALLOW"  # ALLOW is the enum's zero: JSON omits it
    assert list(allow["policies"]) == ["ns[shop]-policy[frontend-orders]-rule[0]"]
    rule = allow["policies"]["ns[shop]-policy[frontend-orders]-rule[0]"]
    assert rule["permissions"] == [
        any_and(
            {
                "or_rules": {
                    "rules": [{"header": {"name": ":method", "string_match": {"exact": "POST"}}}]
                }
            },
            {"or_rules": {"rules": [{"url_path": {"path": {"prefix": "/orders"}}}]}},
            {
                "not_rule": {
                    "or_rules": {"rules": [{"url_path": {"path": {"exact": "/orders/admin"}}}]}
                }
            },
        )
    ]
    assert rule["principals"] == [
        any_and(
            {
                "or_ids": {
                    "ids": [
                        {
                            "filter_state": {
                                "key": PEER,
                                "string_match": {
                                    "exact": "spiffe://cluster.local/ns/shop/sa/frontend"
                                },
                            }
                        }
                    ]
                }
            },
            key="and_ids",
        )
    ]


def test_deny_filter_comes_before_allow_and_a_rule_free_allow_denies_everything() -> None:
    deny, allow = http_rbac(
        policy(f"{GATEWAY}\naction: ALLOW\n", name="nothing-allowed"),
        policy(
            f"{GATEWAY}\naction: DENY\nrules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]\n",
            name="no-delete",
        ),
    )
    assert deny["action"] == "DENY"
    assert list(deny["policies"]) == ["ns[shop]-policy[no-delete]-rule[0]"]
    assert allow.get("action", "ALLOW") == "ALLOW"
    assert "policies" not in allow  # an ALLOW policy without rules matches nothing


def test_wildcards_namespaces_service_accounts_and_path_templates() -> None:
    (allow,) = http_rbac(
        policy(
            f"""
            {GATEWAY}
            rules:
            - from:
              - source:
                  principals: ["*"]
                  namespaces: ["shop", "team-*"]
                  serviceAccounts: ["frontend", "other/robot"]
              to:
              - operation:
                  hosts: ["*.example.com", "api*", "*"]
                  paths: ["/a/{{*}}/b/{{**}}", "*.png", "*"]
                  ports: ["9080"]
            """
        )
    )
    rule = allow["policies"]["ns[shop]-policy[p]-rule[0]"]
    ids = rule["principals"][0]["and_ids"]["ids"]
    principals, accounts, namespaces = (i["or_ids"]["ids"] for i in ids)
    assert principals == [
        {"filter_state": {"key": PEER, "string_match": {"safe_regex": {"regex": ".+"}}}}
    ]
    assert [n["filter_state"]["string_match"]["safe_regex"]["regex"] for n in namespaces] == [
        ".*/ns/shop/.*",
        ".*/ns/team-.*/.*",
    ]
    assert [a["filter_state"]["string_match"]["safe_regex"]["regex"] for a in accounts] == [
        "spiffe://.+/ns/shop/(.+/|)sa/frontend(/.+)?",
        "spiffe://.+/ns/other/(.+/|)sa/robot(/.+)?",
    ]
    hosts, paths, ports = (
        r["or_rules"]["rules"] for r in rule["permissions"][0]["and_rules"]["rules"]
    )
    assert [h["header"] for h in hosts] == [
        {"name": ":authority", "string_match": {"suffix": ".example.com", "ignore_case": True}},
        {"name": ":authority", "string_match": {"prefix": "api", "ignore_case": True}},
        {"name": ":authority", "present_match": True},
    ]
    template, suffix, anything = paths
    assert template["uri_template"]["name"] == "uri-template"
    assert template["uri_template"]["typed_config"]["path_template"] == "/a/*/b/**"
    assert suffix == {"url_path": {"path": {"suffix": ".png"}}}
    assert anything == {"url_path": {"path": {"safe_regex": {"regex": ".+"}}}}
    assert ports == [{"destination_port": 9080}]


def test_when_conditions_join_the_side_their_key_belongs_to() -> None:
    (deny,) = http_rbac(
        policy(
            f"""
            {GATEWAY}
            action: DENY
            rules:
            - when:
              - {{key: "request.headers[X-Debug]", values: ["on"]}}
              - {{key: source.ip, values: ["10.0.0.0/8"], notValues: ["10.1.2.3"]}}
              - {{key: destination.port, values: ["9080"]}}
              - {{key: "request.auth.claims[groups][0]", values: ["admin", "ops"]}}
            """
        )
    )
    rule = deny["policies"]["ns[shop]-policy[p]-rule[0]"]
    assert rule["permissions"] == [any_and({"or_rules": {"rules": [{"destination_port": 9080}]}})]
    header, ip, not_ip, claim = rule["principals"][0]["and_ids"]["ids"]
    assert header == {
        "or_ids": {"ids": [{"header": {"name": "x-debug", "string_match": {"exact": "on"}}}]}
    }
    assert ip == {
        "or_ids": {"ids": [{"direct_remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]}
    }
    assert not_ip == {
        "not_id": {
            "or_ids": {
                "ids": [{"direct_remote_ip": {"address_prefix": "10.1.2.3", "prefix_len": 32}}]
            }
        }
    }
    metadata = claim["metadata"]
    assert metadata["filter"] == "envoy.filters.http.jwt_authn"
    assert [p["key"] for p in metadata["path"]] == ["payload", "groups", "0"]
    either = metadata["value"]["or_match"]["value_matchers"]
    one_of = {
        "or_match": {
            "value_matchers": [
                {"string_match": {"exact": "admin"}},
                {"string_match": {"exact": "ops"}},
            ]
        }
    }
    assert either == [{"list_match": {"one_of": one_of}}, one_of]


def test_request_principals_split_into_issuer_and_subject() -> None:
    (allow,) = http_rbac(
        policy(
            f"""
            {GATEWAY}
            rules:
            - from:
              - source:
                  requestPrincipals:
                  - https://idp.example.com/alice
                  - "*"
                  - "*@example.com"
                  - https://idp.example.com/*
            """
        )
    )
    rule = allow["policies"]["ns[shop]-policy[p]-rule[0]"]
    (values,) = rule["principals"][0]["and_ids"]["ids"]

    def pair(p: dict[str, Any]) -> tuple[Any, Any]:
        iss, sub = p["and_ids"]["ids"]
        assert [s["key"] for s in iss["metadata"]["path"]] == ["payload", "iss"]
        assert [s["key"] for s in sub["metadata"]["path"]] == ["payload", "sub"]
        return iss["metadata"]["value"]["string_match"], sub["metadata"]["value"]["string_match"]

    assert [pair(p) for p in values["or_ids"]["ids"]] == [
        ({"exact": "https://idp.example.com"}, {"exact": "alice"}),
        ({"safe_regex": {"regex": ".+"}}, {"safe_regex": {"regex": ".+"}}),
        ({"safe_regex": {"regex": ".+"}}, {"suffix": "@example.com"}),
        ({"exact": "https://idp.example.com"}, {"safe_regex": {"regex": ".+"}}),
    ]


def test_on_a_tcp_chain_http_attributes_shrink_allow_and_widen_deny() -> None:
    tcp = service(
        "reviews-v2", {"app": "reviews"}, ports=(ServicePortInfo(port=3306, target_port=3306),)
    )
    docs = (
        policy(
            f"{GATEWAY}\nrules: [{{to: [{{operation: {{paths: [/x]}}}}]}}]\n", name="allow-path"
        ),
        policy(
            f"{GATEWAY}\naction: DENY\n"
            "rules: [{to: [{operation: {methods: [GET], ports: ['3306']}}]}]\n",
            name="deny-get",
        ),
    )
    chain = chains(*docs, services=(*world().services[:2], tcp))[
        "reviews-v2.shop.svc.cluster.local:3306"
    ]
    deny, allow = network_rbac(chain)
    assert deny["action"] == "DENY"
    assert deny["policies"]["ns[shop]-policy[deny-get]-rule[0]"]["permissions"] == [
        any_and({"or_rules": {"rules": [{"destination_port": 3306}]}})
    ]
    assert "policies" not in allow  # the only ALLOW rule names a path: nothing is allowed


def test_custom_and_invalid_policies_deny_everything_and_say_so() -> None:
    docs = (
        policy(f"{GATEWAY}\naction: CUSTOM\nprovider: {{name: ext}}\n", name="custom"),
        policy(
            f"{GATEWAY}\nrules: [{{to: [{{operation: {{ports: [http]}}}}]}}]\n", name="bad-port"
        ),
    )
    (deny,) = http_rbac(*docs)
    assert deny["action"] == "DENY"
    for name in ("custom", "bad-port"):
        assert deny["policies"][f"ns[shop]-policy[{name}]-rule[0]"] == {
            "permissions": [{"any": True}],
            "principals": [{"any": True}],
        }
    got = statuses(*docs)
    ok, reason, message = got["shop/custom"]
    assert not ok and reason == "Invalid" and "provider" in message
    ok, reason, message = got["shop/bad-port"]
    assert not ok and reason == "Invalid"
    assert "'http' is not a port number" in message and "denied" in message


# ------------------------------------------------------------------ binding


def test_a_service_target_binds_to_that_service_only_a_gateway_target_to_all() -> None:
    docs = (
        policy(
            "targetRefs: [{kind: Service, group: '', name: reviews-v1}]\n"
            "action: DENY\nrules: [{}]\n",
            name="v1-closed",
        ),
        policy(
            f"{GATEWAY}\naction: DENY\nrules: [{{to: [{{operation: {{methods: [PUT]}}}}]}}]\n",
            name="no-put",
        ),
    )
    v1 = http_rbac(*docs, chain="reviews-v1.shop.svc.cluster.local:9080")
    reviews = http_rbac(*docs)
    assert set(v1[0]["policies"]) == {
        "ns[shop]-policy[v1-closed]-rule[0]",
        "ns[shop]-policy[no-put]-rule[0]",
    }
    assert set(reviews[0]["policies"]) == {"ns[shop]-policy[no-put]-rule[0]"}
    got = statuses(*docs)
    assert got["shop/v1-closed"] == (True, "Accepted", "bound to service shop/reviews-v1")
    assert got["shop/no-put"] == (True, "Accepted", "bound to waypoint shop/waypoint")


def test_pods_served_as_workloads_get_the_gateway_policies() -> None:
    all_traffic = replace(world().waypoints[0], waypoint_for="all")
    docs = (policy(f"{GATEWAY}\nrules: [{{from: [{{source: {{namespaces: [shop]}}}}]}}]\n"),)
    found = chains(*docs, waypoints=(all_traffic,))
    direct = [c for name, c in found.items() if name.startswith("direct-tcp|")]
    assert direct
    for chain in direct:
        (allow,) = network_rbac(chain)
        assert list(allow["policies"]) == ["ns[shop]-policy[p]-rule[0]"]


def test_targets_nobody_serves_or_cannot_be_read_say_so() -> None:
    docs = (
        policy("targetRefs: [{kind: Service, group: '', name: ratings}]\n", name="unserved"),
        policy("targetRefs: [{kind: Deployment, group: apps, name: reviews}]\n", name="wrong-kind"),
        policy(
            CLASS + "\n",
            name="class-outside-root",
        ),
    )
    got = statuses(*docs)
    assert got["shop/unserved"] == (
        False,
        "TargetNotFound",
        "no waypoint serves Service shop/ratings",
    )
    ok, reason, message = got["shop/wrong-kind"]
    assert (ok, reason) == (False, "Invalid") and "Deployment" in message
    ok, reason, message = got["shop/class-outside-root"]
    assert (ok, reason) == (False, "Invalid") and "root namespace" in message
    assert http_rbac(*docs) == []  # nothing of them is in force


def test_a_gateway_class_policy_in_the_root_namespace_binds_every_waypoint() -> None:
    doc = policy(
        CLASS + "\naction: DENY\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]\n",
        name="mesh-wide",
        namespace="istio-system",
    )
    (deny,) = http_rbac(doc)
    assert list(deny["policies"]) == ["ns[istio-system]-policy[mesh-wide]-rule[0]"]
    assert statuses(doc)["istio-system/mesh-wide"][0] is True


# ------------------------------------------------------------------ sources


def test_kubernetes_source_hands_targetref_policies_to_the_waypoint_side() -> None:
    (raw,) = (o.raw for o in objects(policy(f"{GATEWAY}\naction: DENY\nrules: [{{}}]\n")))
    assert isinstance(convert_authorization_policy(raw), L7Object)
    selector = yaml.safe_load(
        policy("selector: {matchLabels: {app: reviews}}\naction: DENY\nrules: [{}]\n")
    )
    assert isinstance(convert_authorization_policy(selector), AuthorizationPolicyInfo)
