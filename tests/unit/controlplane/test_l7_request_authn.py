"""RequestAuthentications bound to a waypoint by targetRefs -> Envoy's jwt_authn filter."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import yaml
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from controlplane.l7 import envoy
from controlplane.l7.build import build
from controlplane.l7.envoy_jwt import PUBLIC_ONLY_JWKS
from controlplane.l7.request_authn import NOT_FOR_ZTUNNEL
from controlplane.sources.kube_convert import KINDS, L7_KINDS
from controlplane.sources.local import source_state
from controlplane.state import L7Object
from mesh.cluster import parse_spec
from meshlab.apply import kind_of, read_documents
from tests.support.l7world import world

REVIEWS = "reviews.shop.svc.cluster.local:9080"
REVIEWS_V1 = "reviews-v1.shop.svc.cluster.local:9080"
GATEWAY = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]"
CLASS = "targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]"
# Istio's sample key set (security/tools/jwt/samples/jwks.json), the one its
# "JWT authentication" task uses with the issuer testing@secure.istio.io.
ISTIO_JWKS = (
    '{ "keys":[ {"e":"AQAB","kid":"DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ","kty":"RSA",'
    '"n":"xAE7eB6qugXyCAG3yhh7pkDkT65pHymX-P7KfIupjf59vsdo91bSP9C8H07pSAGQO1MV_xFj9VswgsCg4R6o'
    "tmg5PV2He95lZdHtOcU5DXIg_pbhLdKXbi66GlVeK6ABZOUW3WYtnNHD-91gVuoeJT_DwtGGcp4ignkgXfkiEm4sw"
    "-4sfb4qdt5oLbyVpmW6x9cfa7vs2WTfURiCrBoUqgBo_-4WTiULmmHSGZHOjzwa8WtrtOQGsAFjIbno85jp6MnGGG"
    'ZPYZbDAa_b3y5u-YpW7ypZrvD8BgtKVjgtQgZhLAGezMt0ua3DRrWnKqTZ0BJ_EyxOGuHJrLsn00fnMQ"}]}'
)
EMPTY_JWKS = '{"keys": []}'
OTHER_JWKS = '{"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}'
JWT = "envoy.filters.http.jwt_authn"


def request_authn(spec: str, name: str = "jwt", namespace: str = "shop", created: str = "") -> str:
    stamp = f", creationTimestamp: '{created}'" if created else ""
    return textwrap.dedent(
        f"""
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {{name: {name}, namespace: {namespace}, generation: 3{stamp}}}
        spec:
        """
    ) + textwrap.indent(textwrap.dedent(spec), "  ")


def rule(issuer: str, jwks: str = ISTIO_JWKS, extra: str = "") -> str:
    return f"- issuer: {json.dumps(issuer)}\n  jwks: {json.dumps(jwks)}\n{extra}"


def hcm_of(*docs: str, chain: str = REVIEWS) -> hcm_pb2.HttpConnectionManager:
    res = envoy.translate(build(world("---\n".join(docs))).shares["shop/waypoint"])
    chains = {c.name: c for c in res.listeners["waypoint"].filter_chains}
    (hcm_filter,) = chains[chain].filters
    hcm = hcm_pb2.HttpConnectionManager()
    hcm_filter.typed_config.Unpack(hcm)
    return hcm


def jwt_config(*docs: str, chain: str = REVIEWS) -> dict[str, Any] | None:
    """The chain's jwt_authn filter as a JSON dict (None: no such filter); it comes first."""
    filters = hcm_of(*docs, chain=chain).http_filters
    found = [f for f in filters if f.name == JWT]
    if not found:
        return None
    assert filters[0].name == JWT
    msg = jwt_pb2.JwtAuthentication()
    found[0].typed_config.Unpack(msg)
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def statuses(*docs: str) -> dict[str, tuple[bool, str, str]]:
    out = {}
    for s in build(world("---\n".join(docs))).statuses:
        if s.kind == "RequestAuthentication":
            (c,) = s.conditions
            assert c.type in ("WaypointAccepted", "ZtunnelAccepted")
            assert s.generation == 3
            out[f"{s.namespace}/{s.name}"] = (c.status, c.reason, c.message)
    return out


def requirement(*names: str) -> dict[str, Any]:
    """istiod's requirement for these providers (convertToEnvoyJwtConfig)."""
    inner = [
        {"requires_any": {"requirements": [{"provider_name": n}, {"allow_missing": {}}]}}
        for n in names
    ]
    if len(inner) == 1:
        return inner[0]
    outer = [{"provider_name": n} for n in names] + [{"requires_all": {"requirements": inner}}]
    return {"requires_any": {"requirements": outer}}


# ------------------------------------------------------------------ translation


def test_istio_s_jwt_example_becomes_istiod_s_jwt_authn_filter_field_by_field() -> None:
    """Istio's task example (issuer testing@secure.istio.io, its sample key set)
    bound to the waypoint: the JwtAuthentication istiod generates
    (policy_applier.go convertToEnvoyJwtConfig, a waypoint: clearRouteCache)."""
    doc = request_authn(f"{GATEWAY}\njwtRules:\n{rule('testing@secure.istio.io')}")
    assert jwt_config(doc) == {
        "providers": {
            "origins-0": {
                "issuer": "testing@secure.istio.io",
                "local_jwks": {"inline_string": ISTIO_JWKS},
                "payload_in_metadata": "payload",
                "normalize_payload_in_metadata": {
                    "space_delimited_claims": ["permission", "scope"]
                },
                "clear_route_cache": True,
            }
        },
        "rules": [{"match": {"prefix": "/"}, "requires": requirement("origins-0")}],
        "bypass_cors_preflight": True,
    }
    assert statuses(doc) == {"shop/jwt": (True, "Accepted", "bound to waypoint shop/waypoint")}


def test_every_rule_field_reaches_its_provider_field() -> None:
    extra = textwrap.indent(
        textwrap.dedent(
            """\
            audiences: [bookinfo, reviews]
            fromHeaders: [{name: x-jwt-assertion, prefix: "Bearer "}, {name: x-token}]
            fromParams: [my_token]
            fromCookies: [session]
            outputPayloadToHeader: x-jwt-payload
            outputClaimToHeaders: [{header: x-sub, claim: sub}, {header: x-team, claim: team}]
            forwardOriginalToken: true
            timeout: 10s
            spaceDelimitedClaims: [roles, scope]
            """
        ),
        "  ",
    )
    doc = request_authn(f"{GATEWAY}\njwtRules:\n{rule('https://idp.example.com', extra=extra)}")
    config = jwt_config(doc)
    assert config is not None
    assert config["providers"]["origins-0"] == {
        "issuer": "https://idp.example.com",
        "audiences": ["bookinfo", "reviews"],
        "local_jwks": {"inline_string": ISTIO_JWKS},
        "forward": True,
        "from_headers": [
            {"name": "x-jwt-assertion", "value_prefix": "Bearer "},
            {"name": "x-token"},
        ],
        "from_params": ["my_token"],
        "from_cookies": ["session"],
        "forward_payload_header": "x-jwt-payload",
        "payload_in_metadata": "payload",
        "normalize_payload_in_metadata": {
            "space_delimited_claims": ["permission", "roles", "scope"]
        },
        "claim_to_headers": [
            {"header_name": "x-sub", "claim_name": "sub"},
            {"header_name": "x-team", "claim_name": "team"},
        ],
        "clear_route_cache": True,
    }
    assert statuses(doc)["shop/jwt"][0] is True


def test_jwt_authn_comes_first_then_rbac_fault_and_router() -> None:
    ra = request_authn(f"{GATEWAY}\njwtRules:\n{rule('testing@secure.istio.io')}")
    ap = textwrap.dedent(
        f"""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: require-jwt, namespace: shop}}
        spec:
          {GATEWAY}
          rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
        """
    )
    names = [f.name for f in hcm_of(ra, ap).http_filters]
    assert names == [
        JWT,
        "envoy.filters.http.rbac",
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]
    # Without a RequestAuthentication there is no jwt_authn filter at all.
    assert hcm_of(ap).http_filters[0].name == "envoy.filters.http.rbac"
    assert jwt_config() is None


def test_two_request_authentications_are_origins_0_and_1_sorted_by_issuer() -> None:
    """istiod concatenates the rules and sorts them by issuer; with several
    providers: any one alone, or all of {provider or missing}."""
    older = request_authn(
        f"{GATEWAY}\njwtRules:\n{rule('zeta.example.com', OTHER_JWKS)}",
        name="older",
        created="2024-01-01T00:00:00Z",
    )
    newer = request_authn(
        f"{GATEWAY}\njwtRules:\n{rule('alpha.example.com')}",
        name="newer",
        created="2024-06-01T00:00:00Z",
    )
    config = jwt_config(older, newer)
    assert config is not None
    assert {k: v["issuer"] for k, v in config["providers"].items()} == {
        "origins-0": "alpha.example.com",
        "origins-1": "zeta.example.com",
    }
    assert config["providers"]["origins-1"]["local_jwks"] == {"inline_string": OTHER_JWKS}
    assert config["rules"] == [
        {"match": {"prefix": "/"}, "requires": requirement("origins-0", "origins-1")}
    ]


def test_equal_issuers_keep_istio_s_namespace_then_creation_order() -> None:
    """The waypoint's namespace before the root namespace, each oldest first."""
    root = request_authn(
        f"{CLASS}\njwtRules:\n{rule('same', OTHER_JWKS)}",
        name="mesh",
        namespace="istio-system",
        created="2020-01-01T00:00:00Z",
    )
    late = request_authn(
        f"{GATEWAY}\njwtRules:\n{rule('same', ISTIO_JWKS)}",
        name="a",
        created="2024-02-01T00:00:00Z",
    )
    early = request_authn(
        f"{GATEWAY}\njwtRules:\n{rule('same', EMPTY_JWKS)}",
        name="b",
        created="2024-01-01T00:00:00Z",
    )
    config = jwt_config(root, late, early)
    assert config is not None
    assert [
        config["providers"][f"origins-{i}"]["local_jwks"]["inline_string"] for i in range(3)
    ] == [
        EMPTY_JWKS,
        ISTIO_JWKS,
        OTHER_JWKS,
    ]


# ------------------------------------------------------------------ binding


def test_a_gateway_target_binds_every_service_chain_a_service_target_only_its_own() -> None:
    on_gateway = request_authn(f"{GATEWAY}\njwtRules:\n{rule('gw.example.com')}", name="gw")
    on_service = request_authn(
        "targetRefs: [{kind: Service, group: '', name: reviews-v1}]\n"
        f"jwtRules:\n{rule('svc.example.com')}",
        name="svc",
    )
    issuers = {}
    for chain in (REVIEWS, REVIEWS_V1):
        config = jwt_config(on_gateway, on_service, chain=chain)
        assert config is not None
        issuers[chain] = [p["issuer"] for _, p in sorted(config["providers"].items())]
    assert issuers == {
        REVIEWS: ["gw.example.com"],
        REVIEWS_V1: ["gw.example.com", "svc.example.com"],
    }
    assert statuses(on_gateway, on_service) == {
        "shop/gw": (True, "Accepted", "bound to waypoint shop/waypoint"),
        "shop/svc": (True, "Accepted", "bound to service shop/reviews-v1"),
    }
    # Only the service's chain has the service's rule.
    assert jwt_config(on_service) is None
    assert jwt_config(on_service, chain=REVIEWS_V1) is not None


def test_a_gateway_class_target_in_the_root_namespace_binds_every_waypoint() -> None:
    doc = request_authn(
        f"{CLASS}\njwtRules:\n{rule('mesh.example.com')}", name="mesh", namespace="istio-system"
    )
    config = jwt_config(doc)
    assert config is not None and config["providers"]["origins-0"]["issuer"] == "mesh.example.com"
    assert statuses(doc)["istio-system/mesh"] == (
        True,
        "Accepted",
        "bound to waypoint shop/waypoint",
    )
    outside = request_authn(f"{CLASS}\njwtRules:\n{rule('x')}", name="outside")
    ok, reason, message = statuses(outside)["shop/outside"]
    assert (ok, reason) == (False, "Invalid") and "root namespace" in message
    assert jwt_config(outside) is None


def test_a_target_no_waypoint_serves_says_so() -> None:
    doc = request_authn(
        f"targetRefs: [{{kind: Service, group: '', name: ratings}}]\njwtRules:\n{rule('x')}"
    )
    assert statuses(doc)["shop/jwt"] == (
        False,
        "TargetNotFound",
        "no waypoint serves Service shop/ratings",
    )
    assert jwt_config(doc) is None


def test_selector_bound_ones_are_not_the_waypoint_s_and_both_is_refused() -> None:
    selector = request_authn(f"selector: {{matchLabels: {{app: reviews}}}}\njwtRules:\n{rule('x')}")
    namespace_wide = request_authn(f"jwtRules:\n{rule('x')}", name="ns-wide")
    assert jwt_config(selector, namespace_wide) is None
    # In force nowhere (ztunnel does no JWT, there are no sidecars), and said so.
    nowhere = (False, "UnsupportedValue", NOT_FOR_ZTUNNEL)
    assert statuses(selector, namespace_wide) == {"shop/jwt": nowhere, "shop/ns-wide": nowhere}
    both = request_authn(
        f"{GATEWAY}\nselector: {{matchLabels: {{app: reviews}}}}\njwtRules:\n{rule('x')}"
    )
    ok, reason, message = statuses(both)["shop/jwt"]
    assert (ok, reason) == (False, "Invalid") and message.startswith("spec.selector:")
    assert jwt_config(both) is None


# ------------------------------------------------------------------ refusals


def test_jwks_uri_gets_a_key_set_nobody_signs_for_and_the_status_says_not_fetched() -> None:
    doc = request_authn(
        f"""\
        {GATEWAY}
        jwtRules:
        - issuer: testing@secure.istio.io
          jwksUri: https://raw.githubusercontent.com/istio/istio/release-1.24/security/tools/jwt/samples/jwks.json
        """
    )
    config = jwt_config(doc)
    assert config is not None
    provider = config["providers"]["origins-0"]
    assert provider["issuer"] == "testing@secure.istio.io"
    assert provider["local_jwks"] == {"inline_string": PUBLIC_ONLY_JWKS}
    (key,) = json.loads(PUBLIC_ONLY_JWKS)["keys"]  # a public key only: no "d"
    assert key["kty"] == "RSA" and "d" not in key and "kid" not in key
    assert "remote_jwks" not in provider
    ok, reason, message = statuses(doc)["shop/jwt"]
    # Not fetched yet (no fetcher in a pure build; see test_jwks_fetch): fail closed.
    assert (ok, reason) == (False, "KeysNotFetched")
    assert "spec.jwtRules[0]" in message and "not fetched yet" in message
    assert "refused" in message and message.endswith("(bound to waypoint shop/waypoint)")


def test_an_unknown_field_is_refused_naming_it_and_binds_nowhere() -> None:
    doc = request_authn(f"{GATEWAY}\njwtRules:\n- issuer: x\n  jwksUrl: https://example.com/keys\n")
    ok, reason, message = statuses(doc)["shop/jwt"]
    assert (ok, reason) == (False, "Invalid")
    assert message.startswith("spec.jwtRules[0].jwksUrl: unknown field")
    assert jwt_config(doc) is None
    spec_field = request_authn(f"{GATEWAY}\naction: ALLOW\njwtRules:\n{rule('x')}")
    assert statuses(spec_field)["shop/jwt"][2].startswith("spec.action: unknown field")


def test_values_istio_s_validation_refuses_are_refused() -> None:
    cases = {
        "not-json": (rule("x", "{not json"), "spec.jwtRules[0].jwks: is not valid JSON"),
        "no-keys": (rule("x", '{"kty": "RSA"}'), "spec.jwtRules[0].jwks: is not a JSON Web Key"),
        "no-issuer": ("- jwks: '{\"keys\": []}'\n", "spec.jwtRules[0].issuer: issuer or jwksUri"),
        "ftp-uri": ("- issuer: x\n  jwksUri: ftp://example.com/k\n", "jwksUri: 'ftp://"),
        "empty-audience": (rule("x", extra="  audiences: ['']\n"), "audiences[0]: must be"),
        "bad-header": (
            rule("x", extra="  outputClaimToHeaders: [{header: 'x y', claim: sub}]\n"),
            "outputClaimToHeaders[0].header: 'x y' is not a valid header name",
        ),
        "bad-timeout": (rule("x", extra="  timeout: soon\n"), "timeout: 'soon' is not a duration"),
    }
    docs = [request_authn(f"{GATEWAY}\njwtRules:\n{r}", name=n) for n, (r, _) in cases.items()]
    got = statuses(*docs)
    for name, (_, expected) in cases.items():
        ok, reason, message = got[f"shop/{name}"]
        assert (ok, reason) == (False, "Invalid"), name
        assert expected in message, (name, message)
    assert jwt_config(*docs) is None


# ------------------------------------------------------------------ sources


def test_kubernetes_source_follows_request_authentications_as_l7_objects() -> None:
    (kind,) = [k for k in KINDS if k.name == "requestauthentications"]
    assert kind.name in L7_KINDS
    assert kind.args == ("security.istio.io", "v1", "requestauthentications")
    assert kind.optional  # a cluster without Istio's CRDs has none
    raw = yaml.safe_load(request_authn(f"{GATEWAY}\njwtRules:\n{rule('x')}"))
    raw["metadata"]["resourceVersion"] = "42"
    obj = kind.convert(raw)
    assert isinstance(obj, L7Object)
    assert (obj.kind, obj.namespace, obj.name) == ("RequestAuthentication", "shop", "jwt")
    assert "resourceVersion" not in obj.raw["metadata"]
    res = envoy.translate(build(world("", l7=(obj,))).shares["shop/waypoint"])
    (chain,) = [c for c in res.listeners["waypoint"].filter_chains if c.name == REVIEWS]
    hcm = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(hcm)
    assert hcm.http_filters[0].name == JWT


def test_meshlab_apply_takes_a_request_authentication_and_meshd_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "ra.yaml"
    path.write_text(request_authn(f"{GATEWAY}\njwtRules:\n{rule('x')}"))
    (document,) = read_documents(path)
    assert (document.kind, document.namespace, document.name) == (
        "RequestAuthentication",
        "shop",
        "jwt",
    )
    assert kind_of("ra") == kind_of("requestauthentications") == "RequestAuthentication"
    cluster = parse_spec({"nodes": [{"name": "node1"}], "resources": [dict(document.raw)]})
    (obj,) = source_state(cluster).l7
    assert (obj.kind, obj.namespace, obj.name) == ("RequestAuthentication", "shop", "jwt")


def test_no_jwks_at_all_is_openid_discovery_not_yet_fetched_and_no_rules_is_no_filter() -> None:
    """Istio finds the keys by the issuer's OpenID discovery, as meshd does: until fetched
    (tests/unit/controlplane/test_jwks_fetch.py) fail closed, as with a jwksUri (also under
    its proto name jwks_uri); an issuer that is no URL has nowhere to fetch from."""
    discovery = request_authn(f"{GATEWAY}\njwtRules: [{{issuer: https://idp.example.com}}]\n")
    proto_name = request_authn(
        f"{GATEWAY}\njwtRules: [{{issuer: b, jwks_uri: 'https://b.example/k'}}]\n", name="proto"
    )
    config = jwt_config(discovery, proto_name)
    assert config is not None
    assert [p["local_jwks"]["inline_string"] for p in config["providers"].values()] == [
        PUBLIC_ONLY_JWKS,
        PUBLIC_ONLY_JWKS,
    ]
    got = statuses(discovery, proto_name)
    assert "keys by OpenID discovery" in got["shop/jwt"][2]
    assert got["shop/jwt"][1] == "KeysNotFetched"
    nowhere = request_authn(f"{GATEWAY}\njwtRules: [{{issuer: testing@secure.istio.io}}]\n")
    ok, reason, message = statuses(nowhere)["shop/jwt"]
    assert (ok, reason) == (False, "UnsupportedValue")
    assert "nowhere to find them" in message and "refused, never accepted" in message
    assert "jwksUri https://b.example/k" in got["shop/proto"][2]
    empty = request_authn(f"{GATEWAY}\njwtRules: []\n")
    assert jwt_config(empty) is None  # istiod: no rules, no filter
    assert statuses(empty)["shop/jwt"] == (True, "Accepted", "bound to waypoint shop/waypoint")
