"""Envoy's JWT authentication filter -> :mod:`waypoint.config.jwt_model`.

``envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication``, in the shape
istiod generates for RequestAuthentication (providers ``origins-N``, one rule
``prefix: /`` requiring any of them or ``allow_missing``, ``bypass_cors_preflight``,
``payload_in_metadata: payload``) and what is close to it. Converted: the
providers' ``issuer``, ``audiences``, an inline ``local_jwks``, ``forward``, the
token locations (headers with prefixes, query parameters, cookies),
``forward_payload_header`` (padded or not), ``payload_in_metadata`` and
``header_in_metadata``, ``normalize_payload_in_metadata``, ``claim_to_headers``,
``clock_skew_seconds`` and ``clear_route_cache`` (nothing to do: the waypoint
picks the route after this filter); rules matched by path prefix with any
requirement (``provider_name``, ``provider_and_audiences``, ``requires_any``,
``requires_all``, ``allow_missing``, ``allow_missing_or_failed``);
``bypass_cors_preflight``, ``strip_failure_response`` and ``stat_prefix``.
Refused, naming the field: remote JWKS, ``subjects``, ``require_expiration``,
``max_lifetime``, ``failed_status_in_metadata``, ``jwt_cache_config``,
``requirement_map`` and per-route requirements, ``filter_state_rules``, route
matches other than a case-sensitive prefix, JWKS from anything but an inline
string, and the X.509 form of a JWKS (``kid`` -> certificate, which Envoy takes).
As Envoy, a JWKS that is not JSON or has no usable key leaves the provider with
no keys (its tokens then fail ``Jwks doesn't have any valid public key``).
"""

from __future__ import annotations

import json
from typing import Any

import jwt as pyjwt
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2
from google.protobuf import any_pb2

from waypoint.config import jwt_model as j
from waypoint.config.checks import Unsupported, only, unpack

HTTP_JWT_AUTHN = "envoy.filters.http.jwt_authn"

_PROVIDER_FIELDS = {
    "issuer",
    "audiences",
    "local_jwks",
    "forward",
    "from_headers",
    "from_params",
    "from_cookies",
    "forward_payload_header",
    "pad_forward_payload_header",
    "payload_in_metadata",
    "header_in_metadata",
    "normalize_payload_in_metadata",
    "claim_to_headers",
    "clear_route_cache",
    "clock_skew_seconds",
}


def http_filter(packed: any_pb2.Any, where: str) -> j.JwtConfig | None:
    """The filter; None when it has no rules (Envoy then verifies nothing)."""
    f = unpack(packed, config_pb2.JwtAuthentication, where)
    only(
        f,
        {"providers", "rules", "bypass_cors_preflight", "strip_failure_response", "stat_prefix"},
        where,
    )
    providers = tuple(
        _provider(name, f.providers[name], f"{where}.providers[{name}]")
        for name in sorted(f.providers)
    )
    names = {p.name for p in providers}
    rules = tuple(_rule(x, names, f"{where}.rules[{i}]") for i, x in enumerate(f.rules))
    if not rules:
        return None
    return j.JwtConfig(
        providers=providers,
        rules=rules,
        bypass_cors_preflight=f.bypass_cors_preflight,
        strip_failure_response=f.strip_failure_response,
    )


def _provider(name: str, p: config_pb2.JwtProvider, where: str) -> j.Provider:
    only(p, _PROVIDER_FIELDS, where)
    if not p.HasField("local_jwks"):
        raise Unsupported(f"{where}.local_jwks: is required (remote_jwks is not supported)")
    only(p.local_jwks, {"inline_string"}, f"{where}.local_jwks")
    only(
        p.normalize_payload_in_metadata,
        {"space_delimited_claims"},
        f"{where}.normalize_payload_in_metadata",
    )
    headers = []
    for i, h in enumerate(p.from_headers):
        only(h, {"name", "value_prefix"}, f"{where}.from_headers[{i}]")
        if not h.name:
            raise Unsupported(f"{where}.from_headers[{i}].name: is required")
        headers.append(j.HeaderLocation(h.name.lower(), h.value_prefix))
    params = tuple(p.from_params)
    if not headers and not params and not p.from_cookies:
        headers = [j.HeaderLocation("authorization", "Bearer ")]  # Envoy's defaults
        params = ("access_token",)
    claims = []
    for i, c in enumerate(p.claim_to_headers):
        only(c, {"header_name", "claim_name"}, f"{where}.claim_to_headers[{i}]")
        if not c.header_name or not c.claim_name:
            raise Unsupported(f"{where}.claim_to_headers[{i}]: header_name and claim_name")
        claims.append(j.ClaimToHeader(c.header_name.lower(), c.claim_name))
    return j.Provider(
        name=name,
        issuer=p.issuer,
        audiences=tuple(p.audiences),
        keys=_local_jwks(p.local_jwks.inline_string, f"{where}.local_jwks.inline_string"),
        forward=p.forward,
        from_headers=tuple(headers),
        from_params=params,
        from_cookies=tuple(p.from_cookies),
        forward_payload_header=p.forward_payload_header.lower(),
        pad_forward_payload_header=p.pad_forward_payload_header,
        payload_in_metadata=p.payload_in_metadata,
        header_in_metadata=p.header_in_metadata,
        space_delimited_claims=tuple(p.normalize_payload_in_metadata.space_delimited_claims),
        claim_to_headers=tuple(claims),
        clock_skew_seconds=p.clock_skew_seconds or j.DEFAULT_CLOCK_SKEW,
    )


def _rule(rule: config_pb2.RequirementRule, providers: set[str], where: str) -> j.Rule:
    only(rule, {"match", "requires"}, where)
    match = rule.match
    only(match, {"prefix"}, f"{where}.match")
    if match.WhichOneof("path_specifier") != "prefix":
        raise Unsupported(f"{where}.match: a prefix is required (the only match supported)")
    requires = (
        requirement(rule.requires, providers, f"{where}.requires")
        if rule.HasField("requires")
        else None
    )
    return j.Rule(prefix=match.prefix, requires=requires)


def requirement(
    r: config_pb2.JwtRequirement,
    providers: set[str],
    where: str,
    siblings: tuple[str, ...] = (),
) -> j.Requirement:
    """Envoy's innerCreate: ``siblings`` are the providers of an enclosing requires_any."""
    kind = r.WhichOneof("requires_type")
    w = f"{where}.{kind}"
    if kind == "provider_name":
        return j.ProviderRequirement(_known(r.provider_name, providers, w))
    if kind == "provider_and_audiences":
        pa = r.provider_and_audiences
        only(pa, {"provider_name", "audiences"}, w)
        return j.ProviderRequirement(
            _known(pa.provider_name, providers, f"{w}.provider_name"), tuple(pa.audiences)
        )
    if kind == "requires_any":
        return _any(r.requires_any.requirements, providers, w)
    if kind == "requires_all":
        reqs = r.requires_all.requirements
        if len(reqs) < 2:
            raise Unsupported(f"{w}.requirements: at least two are required (Envoy's validation)")
        return j.AllRequirement(
            tuple(requirement(x, providers, f"{w}.requirements[{i}]") for i, x in enumerate(reqs))
        )
    if kind == "allow_missing":
        return j.AllowMissing(siblings)
    if kind == "allow_missing_or_failed":
        return j.AllowMissing(siblings, failed=True)
    return j.AllowAll()


def _any(reqs: Any, providers: set[str], where: str) -> j.AnyRequirement:
    if len(reqs) < 2:
        raise Unsupported(f"{where}.requirements: at least two are required (Envoy's validation)")
    regular: list[j.Requirement] = []
    used: list[str] = []
    bypass: str | None = None  # Envoy keeps one: allow_missing_or_failed over allow_missing
    for i, x in enumerate(reqs):
        kind = x.WhichOneof("requires_type")
        if kind in ("allow_missing", "allow_missing_or_failed"):
            if bypass is None or bypass == "allow_missing":
                bypass = kind
            continue
        if kind == "provider_name":
            used.append(x.provider_name)
        elif kind == "provider_and_audiences":
            used.append(x.provider_and_audiences.provider_name)
        regular.append(requirement(x, providers, f"{where}.requirements[{i}]"))
    if bypass is not None:
        regular.append(j.AllowMissing(tuple(used), failed=bypass == "allow_missing_or_failed"))
    return j.AnyRequirement(tuple(regular))


def _known(name: str, providers: set[str], where: str) -> str:
    if name not in providers:
        raise Unsupported(f"{where}: required provider [{name!r}] is not configured")
    return name


# ------------------------------------------------------------------ JWKS


_KEY_ALGS = {
    "RSA": {f"{p}{n}" for p in ("RS", "PS") for n in (256, 384, 512)},
    "EC": {"ES256", "ES384", "ES512"},
    "oct": {"HS256", "HS384", "HS512"},
    "OKP": {"EdDSA"},
}


_EC_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


def _local_jwks(text: str, where: str) -> tuple[j.Key, ...]:
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        doc = None
    if (
        isinstance(doc, dict)
        and doc
        and "keys" not in doc
        and all(isinstance(v, str) and "BEGIN CERTIFICATE" in v for v in doc.values())
    ):
        # Envoy takes this (kid -> X.509 certificate, as Google publishes); we do not.
        raise Unsupported(f"{where}: a JWKS of X.509 certificates is not supported")
    return jwks(text)


def jwks(text: str) -> tuple[j.Key, ...]:
    """The usable keys of a JWKS (jwt_verify_lib's Jwks::createFrom): keys that do not
    parse are skipped; a JWKS that is not JSON, or has no ``keys`` array, has none."""
    if not text:
        return ()
    try:
        doc = json.loads(text)
    except ValueError:
        return ()
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        return ()
    keys = []
    for jwk in doc["keys"]:
        key = _key(jwk)
        if key is not None:
            keys.append(key)
    return tuple(keys)


def _key(jwk: Any) -> j.Key | None:
    if not isinstance(jwk, dict):
        return None
    kty, alg, kid = jwk.get("kty"), jwk.get("alg", ""), jwk.get("kid", "")
    if kty not in _KEY_ALGS or not isinstance(alg, str) or not isinstance(kid, str):
        return None
    if alg and alg not in _KEY_ALGS[kty]:
        return None
    if kty == "OKP" and jwk.get("crv") != "Ed25519":
        return None  # jwt_verify_lib: Ed25519 is the only OKP curve
    if kty == "EC" and (
        jwk.get("crv") not in _EC_CURVES or (alg and _EC_CURVES[jwk["crv"]] != alg)
    ):
        return None  # the curves jwt_verify_lib knows, and the alg of each
    try:
        parsed = pyjwt.PyJWK(jwk)
    except (pyjwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":"))
    return j.Key(kty=kty, kid=kid, alg=alg, jwk=canonical, key=parsed.key)
