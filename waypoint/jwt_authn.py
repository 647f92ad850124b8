"""JWT authentication, decided: Envoy's ``envoy.filters.http.jwt_authn`` over one request.

Pure but for the request head it edits (as Envoy's filter does) and the clock:
:func:`jwt_denial` takes a :class:`~waypoint.config.jwt_model.JwtConfig` and the
head, and gives the local reply that stops the request (or None) and the dynamic
metadata for the filters after it (RBAC matches ``envoy.filters.http.jwt_authn``).
As Envoy 1.40 (``filter.cc``, ``verifier.cc``, ``authenticator.cc``,
``extractor.cc``, and ``source/common/jwt`` for parsing and signatures):

* a CORS preflight passes untouched when ``bypass_cors_preflight``; otherwise the
  first rule whose prefix starts the path (with its query) applies; none, or a
  rule without a requirement, lets the request through;
* a provider's tokens are looked for in its locations (headers, with an optional
  value prefix, the text after it starting at the first base64url character;
  query parameters; cookies); every token found must verify, the last found
  first; ``allow_missing`` lets a request without any token through, and
  ``allow_missing_or_failed`` any request; ``requires_any`` is satisfied by its
  first requirement that is, ``requires_all`` fails on the first that fails;
  a failed ``requires_any`` answers with its last requirement's failure;
* a token is parsed (three base64url parts, JSON header and payload, the
  registered claims of the right types), its issuer must be one the location
  was configured for, then the time (``nbf`` and ``exp`` with the provider's
  clock skew), the audiences (``http(s)://`` and a trailing ``/`` ignored), and
  the signature with the JWKS's keys that match its ``kid`` and ``alg``
  (PyJWT's algorithms do the cryptography: RS, PS, ES, HS with ``oct`` keys,
  EdDSA with Ed25519);
* a good token: ``forward_payload_header`` and ``claim_to_headers`` are added,
  the token's header (or query parameter) removed unless ``forward``, its payload
  (and header) kept for the metadata under ``payload_in_metadata``
  (``header_in_metadata``), space-delimited claims split into lists; the
  headers a provider would add are removed from the request before it looks;
* a failure answers 401 (403 for audiences) with jwt_verify_lib's message as
  the body, ``www-authenticate: Bearer realm="<scheme>://<host><path>"`` (the
  path cut at 256 characters; ``, error="invalid_token"`` unless the token was
  missing) and the response code details ``jwt_authn_access_denied{<message>}``
  (white space as ``_``); with ``strip_failure_response`` no body, no header.

Where a requirement names no provider (``allow_missing``...), the token's issuer
picks it: the first provider (by name, where Envoy takes its hash map's first) of
that issuer, else one without an issuer. A token from a cookie is never removed
(neither does Envoy remove it).
"""

from __future__ import annotations

import base64
import enum
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from jwt.algorithms import get_default_algorithms

from waypoint.config import jwt_model as j
from waypoint.http.messages import LocalReply, RequestHead

FILTER = "envoy.filters.http.jwt_authn"
MAX_URI_PATH = 256
_ALGORITHMS = get_default_algorithms()
_IMPLEMENTED = {
    "ES256", "ES384", "ES512", "HS256", "HS384", "HS512",
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA",
}  # fmt: skip
_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_B64URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_WHITESPACE = " \t\f\v\n\r"
_UINT64 = float(2**64)


class Status(enum.Enum):
    """jwt_verify_lib's statuses this filter can end with; the value is its message."""

    OK = "OK"
    MISSED = "Jwt is missing"
    NOT_YET_VALID = "Jwt not yet valid"
    EXPIRED = "Jwt is expired"
    BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    HEADER_BAD_BASE64 = "Jwt header is an invalid Base64url encoded"
    HEADER_BAD_JSON = "Jwt header is an invalid JSON"
    HEADER_BAD_ALG = "Jwt header [alg] field is required and must be a string"
    HEADER_NOT_IMPLEMENTED_ALG = "Jwt header [alg] is not supported"
    HEADER_BAD_KID = "Jwt header [kid] field is not a string"
    PAYLOAD_BAD_BASE64 = "Jwt payload is an invalid Base64url encoded"
    ED25519_WRONG_LENGTH = "Jwt ED25519 signature is wrong length"
    PAYLOAD_BAD_JSON = "Jwt payload is an invalid JSON"
    ISS_NOT_STRING = "Jwt payload [iss] field is not a string"
    SUB_NOT_STRING = "Jwt payload [sub] field is not a string"
    IAT_NOT_INTEGER = "Jwt payload [iat] field is not an integer"
    IAT_OUT_OF_RANGE = "Jwt payload [iat] field is not a positive 64 bit integer"
    NBF_NOT_INTEGER = "Jwt payload [nbf] field is not an integer"
    NBF_OUT_OF_RANGE = "Jwt payload [nbf] field is not a positive 64 bit integer"
    EXP_NOT_INTEGER = "Jwt payload [exp] field is not an integer"
    EXP_OUT_OF_RANGE = "Jwt payload [exp] field is not a positive 64 bit integer"
    JTI_NOT_STRING = "Jwt payload [jti] field is not a string"
    AUD_NOT_STRING = "Jwt payload [aud] field is not a string or string list"
    SIGNATURE_BAD_BASE64 = "Jwt signature is an invalid Base64url encoded"
    UNKNOWN_ISSUER = "Jwt issuer is not configured"
    AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
    VERIFICATION_FAIL = "Jwt verification fails"
    JWKS_NO_VALID_KEYS = "Jwks doesn't have any valid public key"
    JWKS_KID_ALG_MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"


class _Invalid(Exception):
    def __init__(self, status: Status) -> None:
        self.status = status


@dataclass(slots=True)
class Jwt:
    header_b64: str
    payload_b64: str
    header: dict[str, Any]
    payload: dict[str, Any]
    signature: bytes
    alg: str
    kid: str = ""
    iss: str = ""
    audiences: list[str] = field(default_factory=list)
    nbf: int = 0
    exp: int = 0


# ------------------------------------------------------------------ parsing (common/jwt/jwt.cc)


def _b64url(text: str) -> bytes | None:
    """absl::WebSafeBase64Unescape: padding optional, nothing but the alphabet."""
    if not _B64URL.fullmatch(text):
        return None
    bare = text.rstrip("=")
    if len(bare) % 4 == 1:
        return None
    try:
        return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))
    except ValueError:
        return None


def _json_object(data: bytes) -> dict[str, Any] | None:
    def no_constant(name: str) -> Any:
        raise ValueError(name)

    try:
        value = json.loads(data.decode("utf-8"), parse_constant=no_constant)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _string(obj: dict[str, Any], name: str, bad: Status) -> str:
    value = obj.get(name, "")
    if not isinstance(value, str):
        raise _Invalid(bad)
    return value


def _uint(obj: dict[str, Any], name: str, wrong: Status, out_of_range: Status) -> int:
    value = obj.get(name)
    if value is None and name not in obj:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(wrong)
    if value < 0 or value >= _UINT64 or (isinstance(value, float) and math.isnan(value)):
        raise _Invalid(out_of_range)
    return int(value)


def parse(token: str) -> Jwt:
    """Jwt::parseFromString; raises :class:`_Invalid` with the status."""
    if token.count(".") != 2:
        raise _Invalid(Status.BAD_FORMAT)
    parts = [p for p in token.split(".") if p]
    if len(parts) != 3:
        raise _Invalid(Status.BAD_FORMAT)
    raw = _b64url(parts[0])
    if raw is None:
        raise _Invalid(Status.HEADER_BAD_BASE64)
    header = _json_object(raw)
    if header is None:
        raise _Invalid(Status.HEADER_BAD_JSON)
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise _Invalid(Status.HEADER_BAD_ALG)
    if alg not in _IMPLEMENTED:
        raise _Invalid(Status.HEADER_NOT_IMPLEMENTED_ALG)
    kid = _string(header, "kid", Status.HEADER_BAD_KID)
    raw = _b64url(parts[1])
    if raw is None:
        raise _Invalid(Status.PAYLOAD_BAD_BASE64)
    payload = _json_object(raw)
    if payload is None:
        raise _Invalid(Status.PAYLOAD_BAD_JSON)
    iss = _string(payload, "iss", Status.ISS_NOT_STRING)
    _string(payload, "sub", Status.SUB_NOT_STRING)
    _uint(payload, "iat", Status.IAT_NOT_INTEGER, Status.IAT_OUT_OF_RANGE)
    nbf = _uint(payload, "nbf", Status.NBF_NOT_INTEGER, Status.NBF_OUT_OF_RANGE)
    exp = _uint(payload, "exp", Status.EXP_NOT_INTEGER, Status.EXP_OUT_OF_RANGE)
    _string(payload, "jti", Status.JTI_NOT_STRING)
    aud = payload.get("aud", [])
    if isinstance(aud, str):
        audiences = [aud]
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        audiences = list(aud)
    else:
        raise _Invalid(Status.AUD_NOT_STRING)
    signature = _b64url(parts[2])
    if signature is None:
        raise _Invalid(Status.SIGNATURE_BAD_BASE64)
    return Jwt(
        header_b64=parts[0],
        payload_b64=parts[1],
        header=header,
        payload=payload,
        signature=signature,
        alg=alg,
        kid=kid,
        iss=iss,
        audiences=audiences,
        nbf=nbf,
        exp=exp,
    )


def time_status(token: Jwt, now: int, skew: int) -> Status:
    """Jwt::verifyTimeConstraint."""
    if now + skew < token.nbf:
        return Status.NOT_YET_VALID
    if token.exp and now > token.exp + skew:
        return Status.EXPIRED
    return Status.OK


def _sanitize_audience(aud: str) -> str:
    for scheme in ("http://", "https://"):
        if aud.startswith(scheme):
            aud = aud[len(scheme) :]
            break
    return aud[:-1] if aud.endswith("/") else aud


def audiences_allowed(allowed: tuple[str, ...], audiences: list[str]) -> bool:
    """jwt_verify::CheckAudience: no configured audience allows any."""
    if not allowed:
        return True
    configured = {_sanitize_audience(a) for a in allowed}
    return any(_sanitize_audience(a) in configured for a in audiences)


def _verifier(kty: str, alg: str) -> str | None:
    """The algorithm verify.cc uses for a key of this type and the token's alg."""
    if kty == "EC":
        return alg if alg in ("ES384", "ES512") else "ES256"
    if kty == "RSA":
        size = "384" if alg[2:] == "384" else "512" if alg[2:] == "512" else "256"
        return f"{alg[:2]}{size}" if alg[:2] in ("RS", "PS") else None
    if kty == "oct":
        return alg if alg in ("HS384", "HS512") else "HS256"
    return "EdDSA"  # OKP, Ed25519


def signature_status(token: Jwt, keys: tuple[j.Key, ...]) -> Status:
    """verifyJwtWithoutTimeChecking over the JWKS's keys."""
    signed = f"{token.header_b64}.{token.payload_b64}".encode("ascii")
    matched = False
    for key in keys:
        if token.kid and key.kid and key.kid != token.kid:
            continue
        if key.alg and key.alg != token.alg:
            continue
        matched = True
        if key.kty == "OKP" and len(token.signature) != 64:
            return Status.ED25519_WRONG_LENGTH
        name = _verifier(key.kty, token.alg)
        if name is None:
            continue
        try:
            if _ALGORITHMS[name].verify(signed, key.key, token.signature):
                return Status.OK
        except Exception:  # a key the algorithm cannot use: not this one
            continue
    return Status.VERIFICATION_FAIL if matched else Status.JWKS_KID_ALG_MISMATCH


# ------------------------------------------------------------------ token locations (extractor.cc)


@dataclass(slots=True)
class _Location:
    token: str
    issuers: frozenset[str] | None  # None: any issuer
    remove: Callable[[RequestHead], None]

    def issuer_allowed(self, iss: str) -> bool:
        return self.issuers is None or iss in self.issuers


def _issuers(found: list[str]) -> frozenset[str] | None:
    return None if "" in found else frozenset(found)


def _after_prefix(value: str, prefix: str) -> str | None:
    if not prefix:
        return value
    pos = value.find(prefix)
    if pos == -1:
        return None
    for i in range(pos + len(prefix), len(value)):
        if value[i] in _B64URL_CHARS:
            return value[i:]
    return value  # nothing token-like after it: the whole value, as Envoy


def _query(target: str) -> list[tuple[str, str]]:
    """QueryParamsMulti::parseAndDecodeQueryString: (key, value), percent-decoded."""
    _, sep, query = target.partition("?")
    if not sep:
        return []
    pairs = []
    for raw in query.split("&"):
        k, _, v = raw.partition("=")
        pairs.append((unquote(k), unquote(v)))
    return pairs


def _remove_param(name: str) -> Callable[[RequestHead], None]:
    """JwtParamLocation::removeJwt: the query parsed, the parameter removed, the rest
    written back as QueryParamsMulti::toString does (by key, decoded, ``k=v``)."""

    def remove(head: RequestHead) -> None:
        path, sep, _ = head.target.partition("?")
        if not sep:
            return
        by_key: dict[str, list[str]] = {}
        for k, v in _query(head.target):
            by_key.setdefault(k, []).append(v)
        by_key.pop(name, None)
        kept = [f"{k}={v}" for k in sorted(by_key) for v in by_key[k]]
        head.target = f"{path}?{'&'.join(kept)}" if kept else path

    return remove


def _remove_header(name: str) -> Callable[[RequestHead], None]:
    return lambda head: head.remove(name)


def _cookies(head: RequestHead) -> dict[str, str]:
    """Http::Utility::parseCookies: the first value of each name."""
    cookies: dict[str, str] = {}
    for value in head.get_all("cookie"):
        for part in value.split(";"):
            k, sep, v = part.strip(" ").partition("=")
            if not sep or not k:
                continue
            if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                v = v[1:-1]
            cookies.setdefault(k, v)
    return cookies


def extract(providers: list[j.Provider], head: RequestHead) -> list[_Location]:
    """ExtractorImpl::extract: headers, then query parameters, then cookies, each kind in
    the order of its (sorted) locations; a location shared by providers takes their issuers."""
    headers: dict[tuple[str, str], list[str]] = {}
    params: dict[str, list[str]] = {}
    cookies: dict[str, list[str]] = {}
    for p in providers:
        for h in p.from_headers:
            headers.setdefault((h.name, h.value_prefix), []).append(p.issuer)
        for name in p.from_params:
            params.setdefault(name, []).append(p.issuer)
        for name in p.from_cookies:
            cookies.setdefault(name, []).append(p.issuer)
    found: list[_Location] = []
    for (name, prefix), issuers in sorted(headers.items(), key=lambda x: x[0][0] + x[0][1]):
        for value in head.get_all(name):
            token = _after_prefix(value, prefix)
            if token is not None:
                found.append(_Location(token, _issuers(issuers), _remove_header(name)))
    if params:
        query = _query(head.target)
        for name, issuers in sorted(params.items()):
            param = next((v for k, v in query if k == name), None)
            if param is not None:
                found.append(_Location(param, _issuers(issuers), _remove_param(name)))
    if cookies:
        jar = _cookies(head)
        for name, issuers in sorted(cookies.items()):
            if name in jar:
                found.append(_Location(jar[name], _issuers(issuers), lambda _head: None))
    return found


def _sanitize(providers: list[j.Provider], head: RequestHead) -> None:
    for p in providers:
        if p.forward_payload_header:
            head.remove(p.forward_payload_header)
        for c in p.claim_to_headers:
            head.remove(c.header)


# ------------------------------------------------------------------ claims: headers, metadata


def _claim(payload: dict[str, Any], path: str) -> Any:
    value: Any = payload
    names = path.split(".")
    for i, name in enumerate(names):
        if not isinstance(value, dict) or name not in value:
            return None
        value = value[name]
        if i < len(names) - 1 and not isinstance(value, dict):
            return None
    return value


def _double_text(d: float) -> str:
    """convertClaimDoubleToString: an unsigned integer as one, else std::to_string."""
    if d < 0 or d >= _UINT64 or not d.is_integer():
        return f"{d:f}"
    return str(int(d))


def _json(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


def claim_text(value: Any) -> str:
    """A claim as Envoy's claim_to_headers writes it ("" writes nothing)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _double_text(float(value))
    if isinstance(value, dict | list):
        text = json.dumps(_json(value), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        return base64.b64encode(text.encode()).decode("ascii")
    return ""


def as_struct(value: Any) -> Any:
    """JSON as a protobuf Struct holds it: every number a double."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {k: as_struct(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_struct(v) for v in value]
    return value


def _normalized(provider: j.Provider, payload: dict[str, Any]) -> dict[str, Any]:
    out = as_struct(payload)
    for claim in provider.space_delimited_claims:
        value = payload.get(claim)
        if isinstance(value, str):
            parts = [p for p in value.split(" ") if p]
            if parts:
                out[claim] = parts
    return out  # type: ignore[no-any-return]


# ------------------------------------------------------------------ verifying (verifier.cc etc.)


@dataclass(slots=True)
class _Context:
    config: j.JwtConfig
    head: RequestHead
    now: int
    metadata: dict[str, Any] = field(default_factory=dict)


def _find_by_issuer(config: j.JwtConfig, iss: str) -> j.Provider | None:
    """JwksCache::findByIssuer: the provider of that issuer, else one without an issuer."""
    for p in config.providers:
        if p.issuer == iss:
            return p
    for p in config.providers:
        if not p.issuer:
            return p
    return None


def _verify_token(
    ctx: _Context,
    location: _Location,
    provider: j.Provider | None,
    audiences: tuple[str, ...] | None,
) -> Status:
    try:
        token = parse(location.token)
    except _Invalid as e:
        return e.status
    if not location.issuer_allowed(token.iss):
        return Status.UNKNOWN_ISSUER
    if provider is None:
        provider = _find_by_issuer(ctx.config, token.iss)
        if provider is None:
            return Status.UNKNOWN_ISSUER
    status = time_status(token, ctx.now, provider.clock_skew_seconds)
    if status is not Status.OK:
        return status
    allowed = provider.audiences if audiences is None else audiences
    if not audiences_allowed(allowed, token.audiences):
        return Status.AUDIENCE_NOT_ALLOWED
    if not provider.keys:
        return Status.JWKS_NO_VALID_KEYS
    status = signature_status(token, provider.keys)
    if status is not Status.OK:
        return status
    _good(ctx, provider, location, token)
    return Status.OK


def _good(ctx: _Context, provider: j.Provider, location: _Location, token: Jwt) -> None:
    """AuthenticatorImpl::handleGoodJwt."""
    head = ctx.head
    if provider.forward_payload_header:
        payload = token.payload_b64
        if provider.pad_forward_payload_header:
            payload += "=" * (-len(payload) % 4)
        head.headers.append((provider.forward_payload_header, payload))
    for c in provider.claim_to_headers:
        text = claim_text(_claim(token.payload, c.claim))
        if text:
            head.headers.append((c.header, text))
    if not provider.forward:
        location.remove(head)
    if provider.header_in_metadata:
        ctx.metadata[provider.header_in_metadata] = as_struct(token.header)
    if provider.payload_in_metadata:
        ctx.metadata[provider.payload_in_metadata] = _normalized(provider, token.payload)


def _authenticate(
    ctx: _Context,
    providers: list[j.Provider],
    *,
    provider: j.Provider | None = None,
    audiences: tuple[str, ...] | None = None,
    allow_missing: bool = False,
    allow_failed: bool = False,
) -> Status:
    _sanitize(providers, ctx.head)
    tokens = extract(providers, ctx.head)
    status = Status.MISSED
    while tokens:
        status = _verify_token(ctx, tokens.pop(), provider, audiences)
        if status is not Status.OK and not allow_failed and not allow_missing:
            break
    if allow_failed or (allow_missing and status is Status.MISSED):
        return Status.OK
    return status


def verify(ctx: _Context, req: j.Requirement) -> Status:
    if isinstance(req, j.ProviderRequirement):
        provider = ctx.config.provider(req.provider)
        return _authenticate(ctx, [provider], provider=provider, audiences=req.audiences)
    if isinstance(req, j.AnyRequirement):
        status = Status.OK
        for child in req.requirements:
            status = verify(ctx, child)
            if status is Status.OK:
                break
        return status
    if isinstance(req, j.AllRequirement):
        for child in req.requirements:
            status = verify(ctx, child)
            if status is not Status.OK:
                return status
        return Status.OK
    if isinstance(req, j.AllowMissing):
        providers = [ctx.config.provider(name) for name in req.providers]
        return _authenticate(ctx, providers, allow_missing=True, allow_failed=req.failed)
    return Status.OK  # AllowAll


def _cors_preflight(head: RequestHead) -> bool:
    return (
        head.method == "OPTIONS"
        and bool(head.get("origin"))
        and bool(head.get("access-control-request-method"))
    )


def response_detail(message: str) -> str:
    """generateRcDetails: StringUtil::replaceAllEmptySpace, in braces."""
    for ch in _WHITESPACE:
        message = message.replace(ch, "_")
    return f"jwt_authn_access_denied{{{message}}}"


def _original_uri(head: RequestHead) -> str:
    """Http::Utility::buildOriginalUri(headers, 256): the :scheme, host and path."""
    return f"{head.scheme}://{head.authority}{head.target[:MAX_URI_PATH]}"


def denied(config: j.JwtConfig, status: Status, uri: str) -> LocalReply:
    code = 403 if status is Status.AUDIENCE_NOT_ALLOWED else 401
    details = response_detail(status.value)
    if config.strip_failure_response:
        return LocalReply(code, b"", details=details)
    realm = f'Bearer realm="{uri}"'
    if status is not Status.MISSED:
        realm += ', error="invalid_token"'
    return LocalReply(
        code, status.value.encode(), details=details, headers=(("www-authenticate", realm),)
    )


def jwt_denial(
    config: j.JwtConfig, head: RequestHead, *, now: float | None = None
) -> tuple[LocalReply | None, dict[str, Any]]:
    """The filter over one request: the reply that stops it (or None), and the dynamic
    metadata it sets (``{FILTER: {...}}``, or {} when it sets none). ``head`` is edited:
    tokens removed, payload and claim headers added, as Envoy's filter does."""
    if config.bypass_cors_preflight and _cors_preflight(head):
        return None, {}
    rule = next((r for r in config.rules if head.target.startswith(r.prefix)), None)
    if rule is None or rule.requires is None:
        return None, {}
    uri = _original_uri(head)
    ctx = _Context(config, head, int(time.time() if now is None else now))
    status = verify(ctx, rule.requires)
    if status is not Status.OK:
        return denied(config, status, uri), {}
    return None, ({FILTER: ctx.metadata} if ctx.metadata else {})
