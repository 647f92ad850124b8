"""The waypoint's JWT authentication: Envoy's jwt_authn filter, converted and enforced.

Keys are generated here (RSA, EC P-256, Ed25519) and tokens signed with PyJWT;
the filter config is the shape istiod generates for a RequestAuthentication
(providers ``origins-N``, ``requires_any`` of them or ``allow_missing``).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import replace
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, json_format

from tests.support.l7world import world
from tests.support.waypoint_harness import Backend, config_for, request, waypoint, with_backends
from tests.unit.hbone.conftest import run
from waypoint import authz, jwt_authn
from waypoint.config import convert, jwt, rbac
from waypoint.config import jwt_model as j
from waypoint.config.checks import Unsupported
from waypoint.config.model import FilterChain, HttpManager
from waypoint.config.snapshot import WaypointConfig
from waypoint.http.messages import RequestHead

ISSUER = "https://issuer.example.com"
OTHER_ISSUER = "https://other.example.com"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
REVIEWS = "10.96.0.20:9080"
BAD_FORMAT = b"Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
NO_KEY = b"Jwks doesn't have key to match kid or alg from Jwt"
REMOTE = {"httpUri": {"uri": "https://x/jwks", "cluster": "c", "timeout": "1s"}}


def _jwk(key: Any, alg_class: Any, **extra: str) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(alg_class.to_jwk(key.public_key()))
    d.update(extra)
    return d


def jwks(*keys: dict[str, Any]) -> str:
    return json.dumps({"keys": list(keys)})


RSA_JWKS = jwks(_jwk(RSA_KEY, pyjwt.algorithms.RSAAlgorithm, kid="one", alg="RS256"))


def token(
    key: Any = RSA_KEY,
    alg: str = "RS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"iss": ISSUER, "sub": "alice", "exp": now + 600, "iat": now}
    payload.update(claims)
    for k in [k for k, v in payload.items() if v is None]:
        del payload[k]
    return pyjwt.encode(
        payload, key, algorithm=alg, headers={"kid": "one"} if headers is None else headers
    )


def istio_filter(
    *providers: dict[str, Any], allow_missing: bool = True, **top: Any
) -> config_pb2.JwtAuthentication:
    """istiod's filter for one RequestAuthentication with these jwtRules."""
    names = [f"origins-{i}" for i in range(len(providers))]
    requirements: list[dict[str, Any]] = [{"providerName": n} for n in names]
    if allow_missing:
        requirements.append({"allowMissing": {}})
    requires = {"requiresAny": {"requirements": requirements}}
    if len(requirements) == 1:
        requires = requirements[0]
    doc = {
        "providers": {
            n: {"payloadInMetadata": "payload", **p} for n, p in zip(names, providers, strict=True)
        },
        "rules": [{"match": {"prefix": "/"}, "requires": requires}],
        "bypassCorsPreflight": True,
        **top,
    }
    return json_format.ParseDict(doc, config_pb2.JwtAuthentication())


def provider(issuer: str = ISSUER, keys: str = RSA_JWKS, **extra: Any) -> dict[str, Any]:
    return {"issuer": issuer, "localJwks": {"inlineString": keys}, **extra}


def convert_filter(f: config_pb2.JwtAuthentication) -> j.JwtConfig:
    packed = any_pb2.Any()
    packed.Pack(f)
    config = jwt.http_filter(packed, "f")
    assert config is not None
    return config


def head(path: str = "/items", authorization: str | None = None, **headers: str) -> RequestHead:
    h = [(k.replace("_", "-"), v) for k, v in headers.items()]
    if authorization is not None:
        h.append(("authorization", authorization))
    h.append(("x-forwarded-proto", "http"))
    return RequestHead(method="GET", target=path, authority="reviews:9080", headers=h)


def check(config: j.JwtConfig, h: RequestHead) -> tuple[int, bytes, str, dict[str, Any]]:
    reply, metadata = jwt_authn.jwt_denial(config, h)
    if reply is None:
        return 200, b"", "", metadata
    return reply.status, reply.body, reply.details, metadata


# ------------------------------------------------------------------ verdicts


def test_a_valid_token_passes_and_its_payload_is_the_metadata() -> None:
    config = convert_filter(istio_filter(provider()))
    h = head(authorization=f"Bearer {token(aud='reviews', groups=['a'])}")
    status, _, _, metadata = check(config, h)
    assert status == 200
    payload = metadata[jwt_authn.FILTER]["payload"]
    assert (payload["iss"], payload["sub"], payload["aud"]) == (ISSUER, "alice", "reviews")
    assert isinstance(payload["exp"], float)  # a Struct's number
    assert h.get("authorization") is None  # forward is false: the token is removed


def test_a_missing_token_passes_with_allow_missing_and_sets_no_metadata() -> None:
    config = convert_filter(istio_filter(provider()))
    assert check(config, head()) == (200, b"", "", {})


def test_a_missing_token_is_401_when_required() -> None:
    config = convert_filter(istio_filter(provider(), allow_missing=False))
    reply, _ = jwt_authn.jwt_denial(config, head(path="/items?x=1"))
    assert reply is not None
    assert (reply.status, reply.body) == (401, b"Jwt is missing")
    assert reply.details == "jwt_authn_access_denied{Jwt_is_missing}"
    assert dict(reply.headers) == {
        "www-authenticate": 'Bearer realm="http://reviews:9080/items?x=1"'
    }


@pytest.mark.parametrize(
    ("tok", "status", "body"),
    [
        (lambda: token(key=RSA_KEY_2), 401, b"Jwt verification fails"),
        (lambda: token(exp=int(time.time()) - 120), 401, b"Jwt is expired"),
        (lambda: token(nbf=int(time.time()) + 120), 401, b"Jwt not yet valid"),
        (lambda: token(iss="https://nobody.example.com"), 401, b"Jwt issuer is not configured"),
        (lambda: "not-a-jwt", 401, BAD_FORMAT),
        (lambda: token(headers={"kid": "two"}), 401, NO_KEY),
    ],
)
def test_a_present_token_that_fails_is_refused(tok: Any, status: int, body: bytes) -> None:
    config = convert_filter(istio_filter(provider()))
    reply, metadata = jwt_authn.jwt_denial(config, head(authorization=f"Bearer {tok()}"))
    assert reply is not None and metadata == {}
    assert (reply.status, reply.body) == (status, body)
    assert reply.details == "jwt_authn_access_denied{" + body.decode().replace(" ", "_") + "}"
    assert dict(reply.headers)["www-authenticate"] == (
        'Bearer realm="http://reviews:9080/items", error="invalid_token"'
    )


def test_the_clock_skew_is_the_providers() -> None:
    late = token(exp=int(time.time()) - 30)  # within the default 60s
    assert (
        check(convert_filter(istio_filter(provider())), head(authorization=f"Bearer {late}"))[0]
        == 200
    )
    strict = convert_filter(istio_filter(provider(clockSkewSeconds=5)))
    assert check(strict, head(authorization=f"Bearer {late}"))[1] == b"Jwt is expired"


def test_a_wrong_audience_is_403() -> None:
    config = convert_filter(istio_filter(provider(audiences=["reviews"])))
    bad = token(aud="ratings")
    status, body, details, _ = check(config, head(authorization=f"Bearer {bad}"))
    assert (status, body) == (403, b"Audiences in Jwt are not allowed")
    assert details == "jwt_authn_access_denied{Audiences_in_Jwt_are_not_allowed}"
    good = token(aud=["ratings", "https://reviews/"])  # scheme and trailing '/' ignored
    assert check(config, head(authorization=f"Bearer {good}"))[0] == 200


def test_the_issuer_picks_the_provider_among_several() -> None:
    config = convert_filter(
        istio_filter(
            provider(),
            provider(OTHER_ISSUER, jwks(_jwk(EC_KEY, pyjwt.algorithms.ECAlgorithm, kid="one"))),
        )
    )
    ec_token = token(key=EC_KEY, alg="ES256", iss=OTHER_ISSUER)
    assert check(config, head(authorization=f"Bearer {ec_token}"))[0] == 200
    wrong = token(key=EC_KEY, alg="ES256")  # ISSUER's provider has only an RS256 key
    assert check(config, head(authorization=f"Bearer {wrong}"))[1] == (
        b"Jwks doesn't have key to match kid or alg from Jwt"
    )


def test_keys_are_chosen_by_kid_for_a_rotation() -> None:
    keys = jwks(
        _jwk(RSA_KEY, pyjwt.algorithms.RSAAlgorithm, kid="one"),
        _jwk(RSA_KEY_2, pyjwt.algorithms.RSAAlgorithm, kid="two"),
    )
    config = convert_filter(istio_filter(provider(keys=keys)))
    for key, kid in ((RSA_KEY, "one"), (RSA_KEY_2, "two")):
        t = token(key=key, headers={"kid": kid})
        assert check(config, head(authorization=f"Bearer {t}"))[0] == 200
    crossed = token(key=RSA_KEY, headers={"kid": "two"})
    assert check(config, head(authorization=f"Bearer {crossed}"))[1] == b"Jwt verification fails"
    no_kid = token(key=RSA_KEY_2, headers={})  # no kid: every key is tried
    assert check(config, head(authorization=f"Bearer {no_kid}"))[0] == 200


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256", "PS512"])
def test_rsa_algorithms(alg: str) -> None:
    keys = jwks(_jwk(RSA_KEY, pyjwt.algorithms.RSAAlgorithm))
    config = convert_filter(istio_filter(provider(keys=keys)))
    assert check(config, head(authorization=f"Bearer {token(alg=alg)}"))[0] == 200


def test_ed25519_and_hmac_keys() -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    oct_key = {"kty": "oct", "k": base64.urlsafe_b64encode(secret).decode().rstrip("=")}
    # With no alg, an Ed25519 key would take the HS256 token too, and Envoy answers
    # "Jwt ED25519 signature is wrong length" (verify.cc checks the length first).
    keys = jwks(_jwk(ED_KEY, pyjwt.algorithms.OKPAlgorithm, alg="EdDSA"), oct_key)
    config = convert_filter(istio_filter(provider(keys=keys)))
    ed = token(key=ED_KEY, alg="EdDSA", headers={})
    assert check(config, head(authorization=f"Bearer {ed}"))[0] == 200
    hs = token(key=secret, alg="HS256", headers={})
    assert check(config, head(authorization=f"Bearer {hs}"))[0] == 200
    quirk = convert_filter(
        istio_filter(provider(keys=jwks(_jwk(ED_KEY, pyjwt.algorithms.OKPAlgorithm), oct_key)))
    )
    assert check(quirk, head(authorization=f"Bearer {hs}"))[1] == (
        b"Jwt ED25519 signature is wrong length"
    )


def test_none_and_hs_without_an_oct_key_are_refused() -> None:
    config = convert_filter(istio_filter(provider()))

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    none = f"{part({'alg': 'none'})}.{part({'iss': ISSUER})}."
    assert check(config, head(authorization=f"Bearer {none}"))[1] == BAD_FORMAT
    signed_none = none + "c2ln"
    assert check(config, head(authorization=f"Bearer {signed_none}"))[1] == (
        b"Jwt header [alg] is not supported"
    )
    forged = pyjwt.encode({"iss": ISSUER}, b"x" * 32, algorithm="HS256")
    assert check(config, head(authorization=f"Bearer {forged}"))[1] == (
        b"Jwks doesn't have key to match kid or alg from Jwt"  # the RSA key says RS256
    )
    keys = jwks(_jwk(RSA_KEY, pyjwt.algorithms.RSAAlgorithm))  # no alg: tried, and fails
    config = convert_filter(istio_filter(provider(keys=keys)))
    assert check(config, head(authorization=f"Bearer {forged}"))[1] == b"Jwt verification fails"


def test_an_unparsable_jwks_leaves_the_provider_without_keys() -> None:
    config = convert_filter(istio_filter(provider(keys="{not json")))
    assert config.providers[0].keys == ()
    status, body, _, _ = check(config, head(authorization=f"Bearer {token()}"))
    assert (status, body) == (401, b"Jwks doesn't have any valid public key")


def test_from_headers_with_a_prefix_and_from_params() -> None:
    p = provider(fromHeaders=[{"name": "x-jwt", "valuePrefix": "Token "}], fromParams=["jwt"])
    config = convert_filter(istio_filter(p, allow_missing=False))
    t = token()
    h = head(x_jwt=f"Token   {t}")
    assert check(config, h)[0] == 200
    assert h.get("x-jwt") is None
    h = head(path=f"/items?z=%2F&jwt={t}&a=1")
    assert check(config, h)[0] == 200
    assert h.target == "/items?a=1&z=/"  # as Envoy writes the query back: sorted, decoded
    h = head(path=f"/items?jwt={t}")
    assert check(config, h)[0] == 200
    assert h.target == "/items"
    # The defaults are not looked at once locations are configured.
    assert check(config, head(authorization=f"Bearer {t}"))[1] == b"Jwt is missing"


def test_default_locations_include_the_access_token_parameter() -> None:
    config = convert_filter(istio_filter(provider(), allow_missing=False))
    assert check(config, head(path=f"/?access_token={token()}"))[0] == 200


def test_from_cookies() -> None:
    config = convert_filter(istio_filter(provider(fromCookies=["session"]), allow_missing=False))
    assert check(config, head(cookie=f"a=b; session={token()}"))[0] == 200


def test_forward_keeps_the_token_and_payload_and_claims_become_headers() -> None:
    p = provider(
        forward=True,
        forwardPayloadHeader="x-jwt-payload",
        claimToHeaders=[
            {"headerName": "x-sub", "claimName": "sub"},
            {"headerName": "x-level", "claimName": "meta.level"},
            {"headerName": "x-admin", "claimName": "admin"},
        ],
    )
    config = convert_filter(istio_filter(p))
    t = token(meta={"level": 3}, admin=True)
    h = head(authorization=f"Bearer {t}", x_sub="forged")
    assert check(config, h)[0] == 200
    assert h.get("authorization") == f"Bearer {t}"
    assert h.get_all("x-sub") == ["alice"]  # the client's own is removed first
    assert (h.get("x-level"), h.get("x-admin")) == ("3", "true")
    assert h.get("x-jwt-payload") == t.split(".")[1]


def test_space_delimited_claims_become_lists_in_the_metadata() -> None:
    p = provider(normalizePayloadInMetadata={"spaceDelimitedClaims": ["scope"]})
    config = convert_filter(istio_filter(p))
    _, _, _, md = check(config, head(authorization=f"Bearer {token(scope='read  write')}"))
    assert md[jwt_authn.FILTER]["payload"]["scope"] == ["read", "write"]


def test_a_cors_preflight_is_bypassed() -> None:
    config = convert_filter(istio_filter(provider(), allow_missing=False))
    h = head(origin="https://a", access_control_request_method="GET")
    h.method = "OPTIONS"
    assert check(config, h)[0] == 200


def test_rules_match_by_prefix_and_requires_all() -> None:
    f = json_format.ParseDict(
        {
            "providers": {
                "a": provider(),
                "b": provider(OTHER_ISSUER, fromHeaders=[{"name": "x-other"}]),
            },
            "rules": [
                {"match": {"prefix": "/public"}},
                {
                    "match": {"prefix": "/"},
                    "requires": {
                        "requiresAll": {
                            "requirements": [{"providerName": "a"}, {"providerName": "b"}]
                        }
                    },
                },
            ],
        },
        config_pb2.JwtAuthentication(),
    )
    config = convert_filter(f)
    assert check(config, head(path="/public/x"))[0] == 200
    a = token()
    assert check(config, head(authorization=f"Bearer {a}"))[1] == b"Jwt is missing"
    b = token(iss=OTHER_ISSUER)
    assert check(config, head(authorization=f"Bearer {a}", x_other=b))[0] == 200


# ------------------------------------------------------------------ conversion


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"remoteJwks": REMOTE}, "remote_jwks"),
        ({"subjects": {"exact": "x"}}, "subjects"),
        ({"maxLifetime": "60s"}, "max_lifetime"),
        ({"requireExpiration": True}, "require_expiration"),
        ({"jwtCacheConfig": {"jwtCacheSize": 10}}, "jwt_cache_config"),
        ({"failedStatusInMetadata": "x"}, "failed_status_in_metadata"),
        ({"localJwks": {"filename": "/etc/jwks"}}, "local_jwks.filename"),
    ],
)
def test_unsupported_provider_fields_are_refused(change: dict[str, Any], field: str) -> None:
    p = provider()
    if "remoteJwks" in change:
        del p["localJwks"]
    p.update(change)
    with pytest.raises(Unsupported, match=rf"providers\[origins-0\]\.{field}"):
        convert_filter(istio_filter(p))


def test_unsupported_filter_fields_are_refused_by_name() -> None:
    f = istio_filter(provider())
    f.requirement_map["x"].provider_name = "origins-0"
    with pytest.raises(Unsupported, match="requirement_map"):
        convert_filter(f)
    f = istio_filter(provider())
    f.rules[0].match.ClearField("prefix")
    f.rules[0].match.path = "/exact"
    with pytest.raises(Unsupported, match=r"rules\[0\]\.match\.path"):
        convert_filter(f)
    f = istio_filter(provider())
    f.rules[0].requires.requires_any.requirements[0].provider_name = "nobody"
    with pytest.raises(Unsupported, match="not configured"):
        convert_filter(f)


def _hcm(*filters: tuple[str, Any]) -> hcm_pb2.HttpConnectionManager:
    h = hcm_pb2.HttpConnectionManager(stat_prefix="s")
    h.rds.route_config_name = "r"
    for name, msg in (*filters, ("envoy.filters.http.router", router_pb2.Router())):
        f = h.http_filters.add(name=name)
        f.typed_config.Pack(msg)
    return h


def test_the_connection_manager_takes_the_filter_first() -> None:
    rbac_filter = http_rbac_pb2.RBAC(rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY))
    manager = convert._hcm(
        _hcm(
            (jwt.HTTP_JWT_AUTHN, istio_filter(provider())), ("envoy.filters.http.rbac", rbac_filter)
        ),
        "hcm",
    )
    assert manager.jwt is not None and manager.jwt.providers[0].name == "origins-0"
    with pytest.raises(Unsupported, match="must be the first filter"):
        convert._hcm(
            _hcm(
                ("envoy.filters.http.rbac", rbac_filter),
                (jwt.HTTP_JWT_AUTHN, istio_filter(provider())),
            ),
            "hcm",
        )


# ------------------------------------------------------------------ through the router, with RBAC


def _rbac_requiring(sub: str) -> Any:
    doc = {
        "action": "ALLOW",
        "policies": {
            "jwt": {
                "permissions": [{"any": True}],
                "principals": [
                    {
                        "metadata": {
                            "filter": jwt_authn.FILTER,
                            "path": [{"key": "payload"}, {"key": "sub"}],
                            "value": {"stringMatch": {"exact": sub}},
                        }
                    }
                ],
            }
        },
    }
    return rbac.rules(json_format.ParseDict(doc, rbac_pb2.RBAC()), "rbac")


def test_rbac_sees_the_payload_as_metadata() -> None:
    config = convert_filter(istio_filter(provider()))
    filters = (_rbac_requiring("alice"),)
    for sub, expected in (("alice", None), ("bob", 403)):
        h = head(authorization=f"Bearer {token(sub=sub)}")
        reply, metadata = jwt_authn.jwt_denial(config, h)
        assert reply is None
        denial = authz.http_denial(filters, {}, h, metadata)
        assert (denial.status if denial else None) == expected


def _with_jwt(
    config: WaypointConfig, jwt_config: j.JwtConfig, rbacs: tuple[Any, ...]
) -> WaypointConfig:
    listeners = {}
    for name, listener in config.listeners.items():
        chains: list[FilterChain] = []
        for chain in listener.chains:
            if isinstance(chain.handler, HttpManager):
                chain = replace(chain, handler=replace(chain.handler, jwt=jwt_config, rbac=rbacs))
            chains.append(chain)
        listeners[name] = replace(listener, chains=tuple(chains))
    return replace(config, listeners=listeners)


def test_through_the_router_a_refused_token_never_reaches_a_pod() -> None:
    async def body() -> None:
        backend = await Backend("v1-a", "127.0.0.11").start()
        try:
            base = config_for(with_backends(world(), {"reviews-v1-a": backend}))
            config = _with_jwt(
                base, convert_filter(istio_filter(provider())), (_rbac_requiring("alice"),)
            )
            async with waypoint(config, REVIEWS) as wp:
                status, headers, data = await request(
                    wp.address, headers={"authorization": f"Bearer {token(key=RSA_KEY_2)}"}
                )
                assert (status, data) == (401, b"Jwt verification fails")
                assert headers["www-authenticate"] == (
                    'Bearer realm="http://reviews.shop.svc.cluster.local:9080/", '
                    'error="invalid_token"'
                )
                assert wp.records[-1].details == "jwt_authn_access_denied{Jwt_verification_fails}"
                status, _, data = await request(wp.address)  # no token: allowed, RBAC says no
                assert (status, data) == (403, b"RBAC: access denied")
                assert backend.requests == []
                status, _, data = await request(
                    wp.address, headers={"authorization": f"Bearer {token()}"}
                )
                assert status == 200
                (seen,) = backend.requests
                assert not any(k == "authorization" for k, _ in seen["headers"])
        finally:
            await backend.stop()

    run(body)


def test_istiods_shape_for_several_issuers() -> None:
    """requires_any[origins-0, origins-1, requires_all[any[origins-i, allow_missing]...]]."""
    p0 = provider()
    p1 = provider(OTHER_ISSUER, jwks(_jwk(EC_KEY, pyjwt.algorithms.ECAlgorithm, kid="one")))
    inner = [
        {"requiresAny": {"requirements": [{"providerName": n}, {"allowMissing": {}}]}}
        for n in ("origins-0", "origins-1")
    ]
    doc = {
        "providers": {
            "origins-0": {"payloadInMetadata": "payload", **p0},
            "origins-1": {"payloadInMetadata": "payload", **p1},
        },
        "rules": [
            {
                "match": {"prefix": "/"},
                "requires": {
                    "requiresAny": {
                        "requirements": [
                            {"providerName": "origins-0"},
                            {"providerName": "origins-1"},
                            {"requiresAll": {"requirements": inner}},
                        ]
                    }
                },
            }
        ],
        "bypassCorsPreflight": True,
    }
    config = convert_filter(json_format.ParseDict(doc, config_pb2.JwtAuthentication()))
    all_req = config.rules[0].requires
    assert isinstance(all_req, j.AnyRequirement)
    last = all_req.requirements[-1]
    assert isinstance(last, j.AllRequirement)
    first = last.requirements[0]
    assert isinstance(first, j.AnyRequirement)
    assert first.requirements[-1] == j.AllowMissing(("origins-0",))
    assert check(config, head())[0] == 200
    ec_token = token(key=EC_KEY, alg="ES256", iss=OTHER_ISSUER)
    _, _, _, md = check(config, head(authorization=f"Bearer {ec_token}"))
    assert md[jwt_authn.FILTER]["payload"]["iss"] == OTHER_ISSUER
    status, body, _, _ = check(config, head(authorization=f"Bearer {token(key=RSA_KEY_2)}"))
    assert (status, body) == (401, b"Jwt verification fails")


def test_a_converted_filter_is_a_value() -> None:
    first = convert_filter(istio_filter(provider()))
    second = convert_filter(istio_filter(provider()))
    assert first == second and hash(first) == hash(second)
    assert first != convert_filter(istio_filter(provider(keys=jwks())))


def test_a_jwks_of_certificates_is_refused() -> None:
    keys = json.dumps({"k1": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"})
    with pytest.raises(Unsupported, match=r"local_jwks\.inline_string: a JWKS of X\.509"):
        convert_filter(istio_filter(provider(keys=keys)))
