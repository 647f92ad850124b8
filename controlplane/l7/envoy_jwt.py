"""A chain's RequestAuthentications -> Envoy's ``jwt_authn`` filter, as istiod generates it.

istiod (``pilot/pkg/security/authn/policy_applier.go``, ``convertToEnvoyJwtConfig``;
the waypoint's filter from ``authn.Builder.BuildHTTP``, ahead of the RBAC
filters in ``buildWaypointHTTPFilters``):

* the jwtRules of every RequestAuthentication bound to the chain, in the
  order the policies come (see :func:`controlplane.l7.build.build`), sorted by
  issuer (a stable sort); rule ``i`` is the provider ``origins-<i>``;
* each provider: ``issuer``, ``audiences``, ``forward`` (forwardOriginalToken),
  ``forward_payload_header`` (outputPayloadToHeader), ``payload_in_metadata``
  ``payload`` (where the RBAC filters read ``request.auth.*``),
  ``normalize_payload_in_metadata.space_delimited_claims`` (``permission``,
  ``scope`` and the rule's spaceDelimitedClaims, sorted), ``clear_route_cache``
  (true on every proxy but a sidecar), ``claim_to_headers``, ``from_headers``
  (name, value_prefix), ``from_params``, ``from_cookies``, and the keys inline
  in ``local_jwks`` (istiod fetches a jwksUri and inlines it, and so does
  meshd: :mod:`controlplane.jwks`; until the keys are first fetched such a
  rule gets the fail-closed key set istiod uses while its fetch fails: one
  public RSA key whose private key was discarded, so no token passes);
* one rule for every path (prefix ``/``): with one provider, ``requires_any``
  of the provider and ``allow_missing``; with several, ``requires_any`` of each
  provider alone and of ``requires_all`` of every ``requires_any{provider,
  allow_missing}``. A request without a token passes (an AuthorizationPolicy
  decides whether one is needed), one with an invalid token is refused (401);
* ``bypass_cors_preflight``.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import empty_pb2

from controlplane.l7.envoy_pb import _any
from controlplane.l7.envoy_rbac import JWT_FILTER
from controlplane.l7.request_authn import JwtRule, WaypointAuthentication

PAYLOAD_METADATA = "payload"  # Istio's filters.EnvoyJwtFilterPayload
SPACE_DELIMITED_CLAIMS = ("permission", "scope")  # always, as istiod adds them
# istiod's fail-closed key set (pkg/jwt ``PublicOnlyJwks``): the private key of this
# RSA key was discarded when it was made, so nothing verifies against it.
PUBLIC_ONLY_JWKS = (
    '{"keys":[{"kty":"RSA","e":"AQAB","n":"0xObjM0UvS_oaazjpEYlAbwctEJ4L8pH3OuTb7qth7gUwqet-'
    "EzQB4dgFdvSdMgrLnSncQGRjpEYz3F3viIbH-3EN3TxSlPNviHxeOdyiBVfumN8dMxbLvVJUpfNOnvmMxJcl-8NN"
    "jAwcOjk4otSALaYgYYyOPyvKtgVdrQr-FoubWX4yrjxW-MJ2-7OBeepUUNOsVwGV23YX03sVkkyvY3otRflkBcY3"
    "_HKpBxJl9wk2GyOShN4_PNUF9-vwfnvOXMbCDX-w4PTef4geeb_GiT40YCKHTKMSPVanGRn5GExIWmki-mmqh94-"
    'mPTJyBR74ShspL3BxPZitDL574T1w"}]}'
)


def http_filters(authentications: Sequence[WaypointAuthentication]) -> list[hcm_pb2.HttpFilter]:
    """The chain's ``jwt_authn`` filter (first of its HTTP filters); none without rules."""
    config = jwt_authentication(authentications)
    if config is None:
        return []
    return [hcm_pb2.HttpFilter(name=JWT_FILTER, typed_config=_any(config))]


def jwt_authentication(
    authentications: Sequence[WaypointAuthentication],
) -> config_pb2.JwtAuthentication | None:
    """Istio's JwtAuthentication for these RequestAuthentications (None: no jwtRules)."""
    rules = sorted(
        (rule for a in authentications for rule in a.rules), key=lambda rule: rule.issuer
    )
    if not rules:
        return None
    out = config_pb2.JwtAuthentication(bypass_cors_preflight=True)
    inner_and, outer_or = [], []
    for i, rule in enumerate(rules):
        name = f"origins-{i}"
        out.providers[name].CopyFrom(_provider(rule))
        inner_and.append(
            config_pb2.JwtRequirement(
                requires_any=config_pb2.JwtRequirementOrList(
                    requirements=[
                        config_pb2.JwtRequirement(provider_name=name),
                        config_pb2.JwtRequirement(allow_missing=empty_pb2.Empty()),
                    ]
                )
            )
        )
        outer_or.append(config_pb2.JwtRequirement(provider_name=name))
    if len(inner_and) == 1:
        requires = inner_and[0]
    else:
        outer_or.append(
            config_pb2.JwtRequirement(
                requires_all=config_pb2.JwtRequirementAndList(requirements=inner_and)
            )
        )
        requires = config_pb2.JwtRequirement(
            requires_any=config_pb2.JwtRequirementOrList(requirements=outer_or)
        )
    out.rules.append(
        config_pb2.RequirementRule(
            match=route_components_pb2.RouteMatch(prefix="/"), requires=requires
        )
    )
    return out


def _provider(rule: JwtRule) -> config_pb2.JwtProvider:
    return config_pb2.JwtProvider(
        issuer=rule.issuer,
        audiences=list(rule.audiences),
        forward=rule.forward_original_token,
        forward_payload_header=rule.output_payload_to_header,
        payload_in_metadata=PAYLOAD_METADATA,
        normalize_payload_in_metadata=config_pb2.JwtProvider.NormalizePayload(
            space_delimited_claims=sorted({*rule.space_delimited_claims, *SPACE_DELIMITED_CLAIMS})
        ),
        clear_route_cache=True,  # istiod: on every proxy but a sidecar
        claim_to_headers=[
            config_pb2.JwtClaimToHeader(header_name=header, claim_name=claim)
            for header, claim in rule.output_claim_to_headers
        ],
        from_headers=[
            config_pb2.JwtHeader(name=name, value_prefix=prefix)
            for name, prefix in rule.from_headers
        ],
        from_params=list(rule.from_params),
        from_cookies=list(rule.from_cookies),
        local_jwks=base_pb2.DataSource(inline_string=_keys(rule)),
    )


def _keys(rule: JwtRule) -> str:
    """The inline jwks, else the keys fetched from jwksUri, else none that verify."""
    if rule.jwks:
        return rule.jwks
    return rule.fetched.keys if rule.fetched is not None else PUBLIC_ONLY_JWKS
