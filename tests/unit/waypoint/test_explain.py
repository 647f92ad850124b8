"""``waypoint-ctl explain``: the waypoint's own decision, from a config dump, explained."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.l7world import CANARY, world
from tests.support.waypoint_harness import config_for
from tests.unit.controlplane.test_l7_ratelimit import RECIPE_PATCHES, RECIPE_PER_ROUTE, envoy_filter
from waypoint import ctl
from waypoint.config.dump import config_dump, config_from_dump
from waypoint.config.snapshot import WaypointConfig
from waypoint.explain import ExplainError, Explanation, explain

V1 = "inbound-vip|9080|http|reviews-v1.shop.svc.cluster.local"
V2 = "inbound-vip|9080|http|reviews-v2.shop.svc.cluster.local"


def dumped() -> dict[str, object]:
    """The canary world as the waypoint's /config_dump shows it."""
    return config_dump(
        config_for(world(CANARY)), node_id="waypoint~x", metadata={}, include_eds=True
    )


def test_the_dump_round_trips_into_the_same_config() -> None:
    config = config_for(world(CANARY))
    again = config_from_dump(json.loads(json.dumps(dumped())))
    assert again.routes == config.routes and again.clusters == config.clusters
    assert again.endpoints == config.endpoints and again.listeners == config.listeners


def test_an_iphone_goes_to_v2_and_the_rest_is_split() -> None:
    config = config_from_dump(dumped())
    iphone = explain(
        config, "GET http://reviews:9080/x -H 'user-agent: Mozilla (iPhone)'", namespace="shop"
    )
    assert iphone.verdict["kind"] == "forward" and iphone.verdict["clusters"] == {V2: 0}
    assert iphone.verdict["endpoints"] == ["10.244.1.21:8080"]
    assert "route shop.canary.0 matches" in iphone.text()
    other = explain(config, "GET http://reviews.shop.svc.cluster.local:9080/x", namespace="shop")
    assert other.verdict["clusters"] == {V1: 90, V2: 10}
    text = other.text()
    assert "route shop.canary.0" in text and "header user-agent" in text and "no," in text
    assert "90.0 %" in text and "10.0 %" in text
    assert set(other.verdict["endpoints"]) == {
        "10.244.1.11:8080",
        "10.244.2.12:8080",
        "10.244.1.21:8080",
    }


def test_a_vip_works_as_well_as_a_name_and_unknown_ones_are_refused() -> None:
    config = config_from_dump(dumped())
    assert explain(config, "GET http://10.96.0.21:9080/", namespace="shop").verdict["clusters"] == {
        V1: 0
    }
    with pytest.raises(ExplainError, match="not a service of this waypoint"):
        explain(config, "GET http://ratings:9080/", namespace="shop")
    with pytest.raises(ExplainError, match="METHOD URL"):
        explain(config, "GET", namespace="shop")


def test_the_command_reads_a_saved_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dump.json"
    path.write_text(json.dumps(dumped()))
    code = ctl.main(
        [
            "-f",
            str(path),
            "-n",
            "shop",
            "-o",
            "json",
            "explain",
            "GET http://reviews:9080/ -H user-agent:iPhone",
        ]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["verdict"]["clusters"] == {V2: 0}
    assert ctl.main(["-f", str(path), "-n", "shop", "explain", "GET http://nowhere:1/"]) == 2


MOVED = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: moved, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
"""


def test_a_redirect_is_explained_with_the_location_the_client_would_get() -> None:
    # No -H host: the Host is the URL's, as curl sends it, port and all.
    config = config_for(world(MOVED))
    verdict = explain(config, "GET http://reviews:9080/old/x", namespace="shop").verdict
    assert verdict == {"kind": "redirect", "status": 302, "location": "http://reviews:9080/new/x"}
    told = explain(config, "GET http://reviews:9080/old/x -H host:reviews.shop", namespace="shop")
    # The port is the service port's, as Gateway API says for a redirect without one.
    assert told.verdict["location"] == "http://reviews.shop:9080/new/x"


# ------------------------------------------------------------------ the filters ahead of the router

ISSUER = "https://issuer.example.com"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_JWK = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key())) | {"kid": "one"}
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
ROBOT = "spiffe://cluster.local/ns/other/sa/robot"
DENY_ADMIN = "ns[shop]-policy[deny-admin]-rule[0]"
GATEWAY = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]"
SECURED = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: shop}}
spec:
  {GATEWAY}
  action: DENY
  rules:
  - to: [{{operation: {{paths: [/admin*]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: callers, namespace: shop}}
spec:
  {GATEWAY}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/frontend]}}}}]
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  {GATEWAY}
  jwtRules:
  - issuer: {ISSUER}
    jwks: {json.dumps(json.dumps({"keys": [_JWK]}))}
"""


def token(**claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": "alice", "exp": now + 600, "iat": now} | claims
    return pyjwt.encode(payload, KEY, algorithm="RS256", headers={"kid": "one"})


def secured(*more: str) -> WaypointConfig:
    """The policies (and more) as a live waypoint's /config_dump gives them to explain."""
    dump = config_dump(
        config_for(world("---\n".join([SECURED, *more]))),
        node_id="waypoint~x",
        metadata={},
        include_eds=True,
    )
    return config_from_dump(json.loads(json.dumps(dump)))


def by_filter(e: Explanation) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for f in e.filters:
        out.setdefault(f["filter"], []).append(f)
    return out


def test_the_deny_policy_answers_403_for_admin_whoever_asks() -> None:
    e = explain(
        secured(),
        "GET http://reviews:9080/admin/users",
        namespace="shop",
        peer_identity=FRONTEND,
        source_ip="10.244.1.5",
    )
    assert e.verdict == {
        "kind": "local",
        "status": 403,
        "by": "rbac",
        "policy": DENY_ADMIN,
        "body": "RBAC: access denied",
        "details": f"rbac_access_denied_matched_policy[{DENY_ADMIN}]",
    }
    text = e.text()
    assert f"assumed: peer {FRONTEND} (namespace shop" in text and "from 10.244.1.5" in text
    assert f"rbac DENY (policies: {DENY_ADMIN}): {DENY_ADMIN} matches: 403" in text
    # The walk stops where the router stops: no ALLOW filter, no route.
    assert [f["action"] for f in by_filter(e)["rbac"]] == ["DENY"]
    assert "route" not in text.split("rbac DENY")[1]
    assert e.to_dict()["request"]["connection"]["peer_identity"] == FRONTEND


def test_a_principal_the_allow_does_not_list_gets_403_and_a_listed_one_passes() -> None:
    config = secured()
    robot = explain(config, "GET http://reviews:9080/x", namespace="shop", peer_identity=ROBOT)
    assert robot.verdict["status"] == 403 and robot.verdict["by"] == "rbac"
    assert robot.verdict["policy"] is None
    assert robot.verdict["details"] == "rbac_access_denied_matched_policy[none]"
    assert [(f["action"], f["matched"]) for f in by_filter(robot)["rbac"]] == [
        ("DENY", None),
        ("ALLOW", None),
    ]
    assert "ALLOW" in robot.text() and "no policy matches: 403" in robot.text()
    nobody = explain(config, "GET http://reviews:9080/x", namespace="shop")
    assert nobody.verdict["status"] == 403
    assert "no peer identity (an unauthenticated connection" in nobody.text()
    # Istio's principal form is taken for the SPIFFE ID it names.
    frontend = explain(
        config,
        "GET http://reviews:9080/x",
        namespace="shop",
        peer_identity="cluster.local/ns/shop/sa/frontend",
    )
    assert frontend.verdict["kind"] == "forward" and frontend.verdict["route"] == "default"
    allow = by_filter(frontend)["rbac"][1]
    assert allow["matched"] == "ns[shop]-policy[callers]-rule[0]" and allow["outcome"] == "pass"
    assert by_filter(frontend)["jwt_authn"][0]["tokens"] == 0
    assert "none found: passes" in frontend.text()


def test_an_expired_token_is_answered_401_with_envoy_s_body() -> None:
    expired = token(exp=int(time.time()) - 3600)
    e = explain(
        secured(),
        f"GET http://reviews:9080/x -H 'authorization: Bearer {expired}'",
        namespace="shop",
        peer_identity=FRONTEND,
    )
    assert e.verdict["status"] == 401 and e.verdict["by"] == "jwt_authn"
    assert e.verdict["body"] == "Jwt is expired"
    assert e.verdict["details"] == "jwt_authn_access_denied{Jwt_is_expired}"
    assert e.verdict["headers"]["www-authenticate"] == (
        'Bearer realm="http://reviews:9080/x", error="invalid_token"'
    )
    (jwt,) = by_filter(e)["jwt_authn"]
    assert jwt["outcome"] == "refuse" and jwt["tokens"] == 1
    assert "header authorization: Bearer <token>" in jwt["locations"]
    assert [p["issuer"] for p in jwt["providers"]] == [ISSUER]
    assert "rbac" not in by_filter(e)  # the JWT filter answered: RBAC never ran
    # A wrong audience is jwt_authn's 403, the same function deciding.
    aud = explain(
        config_for(world(AUDIENCE)),
        f"GET http://reviews:9080/x -H 'authorization: Bearer {token(aud='other')}'",
        namespace="shop",
    )
    assert (
        aud.verdict["status"] == 403 and aud.verdict["body"] == "Audiences in Jwt are not allowed"
    )


AUDIENCE = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  {GATEWAY}
  jwtRules:
  - issuer: {ISSUER}
    audiences: [reviews]
    jwks: {json.dumps(json.dumps({"keys": [_JWK]}))}
"""


def test_a_valid_token_passes_and_its_principal_is_what_rbac_sees() -> None:
    good = token(scope="read write")
    e = explain(
        secured(),
        f"GET http://reviews:9080/x -H 'authorization: Bearer {good}'",
        namespace="shop",
    )
    assert e.verdict["kind"] == "forward"
    (jwt,) = by_filter(e)["jwt_authn"]
    assert jwt["outcome"] == "pass" and jwt["principal"] == f"{ISSUER}/alice"
    payload = jwt["claims"]["payload"]
    assert payload["sub"] == "alice" and payload["scope"] == ["read", "write"]
    assert jwt["removed"] == ["authorization"]
    allow = by_filter(e)["rbac"][1]
    assert allow["matched"] == "ns[shop]-policy[callers]-rule[1]"  # requestPrincipals
    assert f"request principal {ISSUER}/alice" in e.text()
    # An explanation at a later time (``now``) sees the same token expired.
    later = explain(
        secured(),
        f"GET http://reviews:9080/x -H 'authorization: Bearer {good}'",
        namespace="shop",
        now=time.time() + 3600,
    )
    assert later.verdict["status"] == 401


def test_the_rate_limit_bucket_is_named_and_no_token_is_taken() -> None:
    config = secured(envoy_filter(RECIPE_PATCHES))
    for _ in range(6):  # more than the bucket's 4 tokens: explain takes none
        e = explain(config, "GET http://reviews:9080/x", namespace="shop", peer_identity=FRONTEND)
        assert e.verdict["kind"] == "forward"
    (limit,) = by_filter(e)["local_ratelimit"]
    assert e.filters[0] is limit  # Istio's recipe puts it first, ahead of JWT and RBAC
    assert limit["bucket"] == {
        "scope": "filter",
        "stat_prefix": "http_local_rate_limiter",
        "max_tokens": 4,
        "tokens_per_fill": 4,
        "fill_interval_s": 60.0,
    }
    assert (limit["enabled_percent"], limit["enforced_percent"]) == (100.0, 100.0)
    assert limit["when_empty"]["status"] == 429 and limit["when_empty"]["body"] == (
        "local_rate_limited"
    )
    assert limit["when_empty"]["headers"] == {"x-local-rate-limit": "true"}
    assert e.verdict["unless"] == [
        {"status": 429, "by": "local_ratelimit", "when": "the bucket is empty"}
    ]
    assert "429 'local_rate_limited' (RL) only when the bucket is empty" in e.text()
    # The recipe's per-route form: the route's bucket replaces the filter's (which has none).
    per_route = explain(
        config_for(world(envoy_filter(RECIPE_PER_ROUTE))),
        "GET http://reviews:9080/x",
        namespace="shop",
    )
    (limit,) = by_filter(per_route)["local_ratelimit"]
    assert limit["bucket"]["scope"] == "route" and limit["bucket"]["max_tokens"] == 4
    assert "route default's own bucket" in per_route.text()
    # No policies, no identity asked for: no "assumed" line.
    assert "assumed" not in per_route.text()


FAULTY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: faulty, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews-v1}}]
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 12.5}}
      abort: {httpStatus: 503, percentage: {value: 100}}
"""


def test_a_fault_is_described_and_an_abort_of_every_request_answers() -> None:
    e = explain(config_for(world(FAULTY)), "GET http://reviews:9080/x", namespace="shop")
    (fault,) = by_filter(e)["fault"]
    assert fault["delay"] == {"seconds": 2.0, "percent": 12.5}
    assert fault["abort"]["status"] == 503 and fault["abort"]["percent"] == 100.0
    assert e.verdict["by"] == "fault" and e.verdict["status"] == 503
    assert "delay 2s for 12.5 %" in e.text()


def test_the_command_takes_as_and_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dump.json"
    dump = config_dump(
        config_for(world(SECURED)), node_id="waypoint~x", metadata={}, include_eds=True
    )
    path.write_text(json.dumps(dump))
    base = ["-f", str(path), "-n", "shop"]
    code = ctl.main([*base, "-o", "json", "explain", "--as", ROBOT, "GET http://reviews:9080/x"])
    assert code == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"]["status"] == 403 and out["verdict"]["by"] == "rbac"
    assert [f["filter"] for f in out["filters"]] == ["jwt_authn", "rbac", "rbac"]
    args = ["explain", "--as", FRONTEND, "--from", "10.244.1.5", "GET http://reviews:9080/x"]
    assert ctl.main([*base, *args]) == 0
    assert f"assumed: peer {FRONTEND}" in capsys.readouterr().out
    assert ctl.main([*base, "explain", "--from", "nowhere", "GET http://reviews:9080/x"]) == 2
