"""Envoy's JWT authentication filter as the waypoint's model: providers, keys, requirements.

One :class:`JwtConfig` per ``envoy.filters.http.jwt_authn`` filter that has rules
(see :mod:`waypoint.config.jwt`). The JWKS of each provider is parsed once, at
conversion, into :class:`Key` values holding the public keys (or the HMAC secret
of an ``oct`` key) as PyJWT prepares them; the requirement tree is built as
Envoy's ``Verifier::create`` builds it (a ``requires_any``'s ``allow_missing`` or
``allow_missing_or_failed`` moved last, with the names of the providers its
siblings use). Everything is evaluated by :mod:`waypoint.jwt_authn`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_CLOCK_SKEW = 60  # jwt_verify::kClockSkewInSecond


@dataclass(frozen=True, slots=True, kw_only=True)
class Key:
    """One usable key of a JWKS: ``kid`` and ``alg`` "" when the JWK does not say.
    Compared (and hashed) by its JWK, as the key objects cannot be hashed."""

    kty: str  # "RSA", "EC", "oct" or "OKP" (Ed25519 only)
    kid: str = ""
    alg: str = ""
    jwk: str = ""  # the JWK as JSON, keys sorted
    key: Any = field(default=None, compare=False)  # a public key, or an "oct" key's secret


@dataclass(frozen=True, slots=True)
class HeaderLocation:
    name: str  # lower case
    value_prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    header: str  # lower case
    claim: str  # a path of '.'-separated names into the payload


@dataclass(frozen=True, slots=True, kw_only=True)
class Provider:
    name: str
    issuer: str = ""  # "" accepts any issuer
    audiences: tuple[str, ...] = ()  # () accepts any audience
    keys: tuple[Key, ...] = ()  # () when the JWKS had no valid key (or was not JSON)
    forward: bool = False
    # Where the token is looked for; none of the three set means Envoy's defaults
    # (``Authorization: Bearer <token>`` and ``?access_token=``), filled in here.
    from_headers: tuple[HeaderLocation, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    forward_payload_header: str = ""
    pad_forward_payload_header: bool = False
    payload_in_metadata: str = ""
    header_in_metadata: str = ""
    space_delimited_claims: tuple[str, ...] = ()
    claim_to_headers: tuple[ClaimToHeader, ...] = ()
    clock_skew_seconds: int = DEFAULT_CLOCK_SKEW  # 0 in the proto means the default


# ------------------------------------------------------------------ requirements


@dataclass(frozen=True, slots=True)
class ProviderRequirement:
    """``provider_name`` (``audiences`` None) or ``provider_and_audiences``."""

    provider: str
    audiences: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class AnyRequirement:
    requirements: tuple[Requirement, ...]


@dataclass(frozen=True, slots=True)
class AllRequirement:
    requirements: tuple[Requirement, ...]


@dataclass(frozen=True, slots=True)
class AllowMissing:
    """``allow_missing`` (``failed`` False) or ``allow_missing_or_failed``. Tokens are
    looked for where ``providers`` look (the siblings of a ``requires_any``; none
    elsewhere, as Envoy); the token's issuer picks the provider."""

    providers: tuple[str, ...] = ()
    failed: bool = False


@dataclass(frozen=True, slots=True)
class AllowAll:
    """A requirement with nothing set: always satisfied."""


Requirement = ProviderRequirement | AnyRequirement | AllRequirement | AllowMissing | AllowAll


@dataclass(frozen=True, slots=True)
class Rule:
    prefix: str  # the route match: the path (with its query) starts with it
    requires: Requirement | None  # None: the rule matches and nothing is verified


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtConfig:
    providers: tuple[Provider, ...]  # sorted by name
    rules: tuple[Rule, ...]  # the first that matches applies; none: nothing verified
    bypass_cors_preflight: bool = False
    strip_failure_response: bool = False

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)
