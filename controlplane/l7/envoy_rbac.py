"""A waypoint's AuthorizationPolicies -> Envoy's RBAC filters, as Istio generates them.

Istio's builder (``pilot/pkg/security/authz/builder``) and model, for the
policies bound to one filter chain:

* one ``envoy.filters.http.rbac`` filter (``envoy.filters.network.rbac`` on
  a TCP chain) for the DENY policies, then one for the ALLOW policies; the
  ALLOW filter exists whenever an ALLOW policy applies, so a policy whose
  rules all drop (or that has none) denies everything;
* each rule is one RBAC policy ``ns[NS]-policy[NAME]-rule[i]``: its
  permissions are the ``to`` entries (any one), each the AND of its
  attributes (``when`` conditions appended), each attribute the OR of its
  values and the NOT of the OR of its notValues; principals likewise;
* identities are matched on the filter state ``io.istio.peer_principal``
  (the HBONE peer's SPIFFE ID), as Istio's waypoints do; end-user
  attributes on the metadata of ``envoy.filters.http.jwt_authn``;
* on a TCP chain an HTTP attribute cannot be evaluated: an ALLOW rule that
  names one is left out (the policy allows less), a DENY rule is kept
  without it (it denies more), Istio's fail-closed reading.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence

from envoy.config.core.v3 import address_pb2, extension_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import (
    filter_state_pb2,
    metadata_pb2,
    path_pb2,
    regex_pb2,
    string_pb2,
    value_pb2,
)
from google.protobuf import wrappers_pb2

from controlplane.l7 import authz as a
from controlplane.l7.envoy_pb import _any, _quote_meta

HTTP_RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"
PEER_PRINCIPAL = "io.istio.peer_principal"
JWT_FILTER = "envoy.filters.http.jwt_authn"
SPIFFE = "spiffe://"
TCP_STAT_PREFIX = "tcp."


class _NotForTcp(Exception):
    """An HTTP attribute on a TCP chain (Istio's forTCP error)."""


def http_filters(policies: Sequence[a.WaypointPolicy]) -> list[hcm_pb2.HttpFilter]:
    """The RBAC filters of an HTTP chain, DENY first; none when no policy applies."""
    return [
        hcm_pb2.HttpFilter(name=HTTP_RBAC, typed_config=_any(http_rbac_pb2.RBAC(rules=rules)))
        for rules in _rbacs(policies, for_tcp=False)
    ]


def network_filters(policies: Sequence[a.WaypointPolicy]) -> list[listener_components_pb2.Filter]:
    """The RBAC filters of a TCP chain (before its ``tcp_proxy``), DENY first."""
    return [
        listener_components_pb2.Filter(
            name=NETWORK_RBAC,
            typed_config=_any(network_rbac_pb2.RBAC(rules=rules, stat_prefix=TCP_STAT_PREFIX)),
        )
        for rules in _rbacs(policies, for_tcp=True)
    ]


def _rbacs(policies: Sequence[a.WaypointPolicy], *, for_tcp: bool) -> list[rbac_pb2.RBAC]:
    deny = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    allow = rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW)
    any_allow = False
    for policy in policies:
        if policy.fail_closed:
            deny.policies[f"{policy.id_prefix}-rule[0]"].CopyFrom(
                rbac_pb2.Policy(
                    permissions=[rbac_pb2.Permission(any=True)],
                    principals=[rbac_pb2.Principal(any=True)],
                )
            )
            continue
        if policy.action not in ("ALLOW", "DENY"):
            continue  # AUDIT: refused in its status, no decision
        target = allow if policy.action == "ALLOW" else deny
        any_allow |= policy.action == "ALLOW"
        for i, rule in enumerate(policy.rules):
            try:
                generated = _policy(rule, policy, for_tcp=for_tcp)
            except _NotForTcp:
                continue  # ALLOW only: the rule allows nothing on this chain
            target.policies[f"{policy.id_prefix}-rule[{i}]"].CopyFrom(generated)
    out = []
    if deny.policies:
        out.append(deny)
    if any_allow:
        out.append(allow)
    return out


# ------------------------------------------------------------------ model


def _policy(rule: a.RuleModel, policy: a.WaypointPolicy, *, for_tcp: bool) -> rbac_pb2.Policy:
    allow = policy.action == "ALLOW"
    permissions = []
    for attributes in rule.permissions:
        parts: list[rbac_pb2.Permission] = []
        for attribute in attributes:
            parts.extend(_attribute_permissions(attribute, for_tcp=for_tcp, allow=allow))
        parts = parts or [rbac_pb2.Permission(any=True)]
        permissions.append(rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=parts)))
    principals = []
    for attributes in rule.principals:
        ids: list[rbac_pb2.Principal] = []
        for attribute in attributes:
            ids.extend(_attribute_principals(attribute, policy, for_tcp=for_tcp, allow=allow))
        ids = ids or [rbac_pb2.Principal(any=True)]
        principals.append(rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=ids)))
    return rbac_pb2.Policy(permissions=permissions, principals=principals)


def _checked(attribute: a.Attribute, *, for_tcp: bool, allow: bool) -> bool:
    """Whether to generate the attribute: False to drop it (DENY on TCP); raises for ALLOW."""
    if for_tcp and attribute.http_only:
        if allow:
            raise _NotForTcp(attribute.key)
        return False
    return True


def _attribute_permissions(
    attribute: a.Attribute, *, for_tcp: bool, allow: bool
) -> list[rbac_pb2.Permission]:
    if not _checked(attribute, for_tcp=for_tcp, allow=allow):
        return []
    out = []
    if attribute.values:
        ors = [_permission(attribute.key, v) for v in attribute.values]
        out.append(rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=ors)))
    if attribute.not_values:
        ors = [_permission(attribute.key, v) for v in attribute.not_values]
        inner = rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=ors))
        out.append(rbac_pb2.Permission(not_rule=inner))
    return out


def _attribute_principals(
    attribute: a.Attribute, policy: a.WaypointPolicy, *, for_tcp: bool, allow: bool
) -> list[rbac_pb2.Principal]:
    if not _checked(attribute, for_tcp=for_tcp, allow=allow):
        return []
    extended = _extended(attribute.key)
    out = []
    for values, negate in ((attribute.values, False), (attribute.not_values, True)):
        if not values:
            continue
        if extended is not None:
            principal = extended(attribute.key, values)
        else:
            ids = [_principal(attribute.key, v, policy.namespace) for v in values]
            principal = rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ids))
        out.append(rbac_pb2.Principal(not_id=principal) if negate else principal)
    return out


# ------------------------------------------------------------------ generators


def _permission(key: str, value: str) -> rbac_pb2.Permission:
    if key == a.HOST:
        return rbac_pb2.Permission(header=_host_matcher(value))
    if key == a.METHOD:
        return rbac_pb2.Permission(header=_header_matcher(":method", value))
    if key == a.PATH:
        if any(t in value for t in ("{*}", "{**}")):
            template = value.replace("{**}", "**").replace("{*}", "*")
            return rbac_pb2.Permission(
                uri_template=extension_pb2.TypedExtensionConfig(
                    name="uri-template",
                    typed_config=_any(
                        uri_template_match_pb2.UriTemplateMatchConfig(path_template=template)
                    ),
                )
            )
        return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=_string(value)))
    if key == a.DESTINATION_PORT:
        return rbac_pb2.Permission(destination_port=int(value))
    if key == a.DESTINATION_IP:
        return rbac_pb2.Permission(destination_ip=_cidr(value))
    if key == a.CONNECTION_SNI:
        return rbac_pb2.Permission(requested_server_name=_string(value))
    raise AssertionError(f"no permission generator for {key}")  # authz reads only these


def _principal(key: str, value: str, namespace: str) -> rbac_pb2.Principal:
    if key == a.SOURCE_PRINCIPAL:
        return _peer(_string(value, SPIFFE))
    if key == a.SOURCE_NAMESPACE:
        return _peer(_regex(f".*/ns/{value.replace('*', '.*')}/.*"))  # Istio's, unquoted
    if key == a.SOURCE_SERVICE_ACCOUNT:
        ns, sep, sa = value.partition("/")
        if not sep:
            ns, sa = namespace, value
        return _peer(_regex(f"spiffe://.+/ns/{_quote_meta(ns)}/(.+/|)sa/{_quote_meta(sa)}(/.+)?"))
    if key == a.SOURCE_IP:
        return rbac_pb2.Principal(direct_remote_ip=_cidr(value))
    if key == a.REMOTE_IP:
        return rbac_pb2.Principal(remote_ip=_cidr(value))
    if key == a.REQUEST_PRINCIPAL:
        return _request_principal(value)
    if key.startswith(a.REQUEST_HEADERS):
        return rbac_pb2.Principal(header=_header_matcher(a.header_of(key), value))
    raise AssertionError(f"no principal generator for {key}")


def _extended(key: str) -> Callable[[str, Sequence[str]], rbac_pb2.Principal] | None:
    """The generators that take all values at once (Istio's extendedPrincipal)."""
    if key == a.REQUEST_AUDIENCES:
        return lambda _k, values: _jwt_list(["aud"], values)
    if key == a.REQUEST_PRESENTER:
        return lambda _k, values: _jwt_list(["azp"], values)
    if key.startswith(a.REQUEST_CLAIMS):
        return lambda k, values: _jwt_list(a.claims_of(k), values)
    return None


def _peer(m: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(
        filter_state=filter_state_pb2.FilterStateMatcher(key=PEER_PRINCIPAL, string_match=m)
    )


def _request_principal(value: str) -> rbac_pb2.Principal:
    """``iss/sub`` (split at the last ``/``) with Istio's wildcard forms, on the JWT payload."""
    iss, sub = _split_request_principal(value)
    return rbac_pb2.Principal(
        and_ids=rbac_pb2.Principal.Set(ids=[_jwt_string(["iss"], iss), _jwt_string(["sub"], sub)])
    )


def _split_request_principal(
    value: str,
) -> tuple[string_pb2.StringMatcher, string_pb2.StringMatcher]:
    anything = _regex(".+")
    if value == "*":
        return anything, anything
    cut = value.rfind("/")
    if value.startswith("*"):
        if cut >= 0:
            iss, sub = value[:cut], value[cut + 1 :]
            iss_m = anything if iss == "*" else string_pb2.StringMatcher(suffix=iss[1:])
            return iss_m, string_pb2.StringMatcher(exact=sub)
        return anything, string_pb2.StringMatcher(suffix=value[1:])
    if value.endswith("*"):
        if cut >= 0:
            iss, sub = value[:cut], value[cut + 1 :]
            sub_m = anything if sub == "*" else string_pb2.StringMatcher(prefix=sub[:-1])
            return string_pb2.StringMatcher(exact=iss), sub_m
        return string_pb2.StringMatcher(prefix=value[:-1]), anything
    if cut < 0:  # no iss/sub form: matches no token's principal
        return string_pb2.StringMatcher(exact=value), string_pb2.StringMatcher(exact="")
    iss, sub = value[:cut], value[cut + 1 :]
    return string_pb2.StringMatcher(exact=iss), string_pb2.StringMatcher(exact=sub)


def _jwt_path(keys: Iterable[str]) -> list[metadata_pb2.MetadataMatcher.PathSegment]:
    return [metadata_pb2.MetadataMatcher.PathSegment(key=k) for k in ("payload", *keys)]


def _jwt_string(keys: Sequence[str], m: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(
        metadata=metadata_pb2.MetadataMatcher(
            filter=JWT_FILTER, path=_jwt_path(keys), value=value_pb2.ValueMatcher(string_match=m)
        )
    )


def _jwt_list(keys: Sequence[str], values: Sequence[str]) -> rbac_pb2.Principal:
    """A claim that is a string or a list of them: either form matches (Istio's
    MetadataListMatcher with the extended JWT form)."""
    matchers = [value_pb2.ValueMatcher(string_match=_string(v)) for v in values]
    one = (
        matchers[0]
        if len(matchers) == 1
        else value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=matchers))
    )
    either = value_pb2.ValueMatcher(
        or_match=value_pb2.OrMatcher(
            value_matchers=[
                value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=one)),
                one,
            ]
        )
    )
    return rbac_pb2.Principal(
        metadata=metadata_pb2.MetadataMatcher(filter=JWT_FILTER, path=_jwt_path(keys), value=either)
    )


# ------------------------------------------------------------------ matchers


def _string(value: str, prefix: str = "") -> string_pb2.StringMatcher:
    """Istio's StringMatcherWithPrefix: ``*``, ``*suffix``, ``prefix*`` or exact."""
    if value == "*":
        return _regex(".+")
    if value.startswith("*"):
        if not prefix:
            return string_pb2.StringMatcher(suffix=value[1:])
        return _regex(_quote_meta(prefix) + ".*" + _quote_meta(value[1:]))
    if value.endswith("*"):
        return string_pb2.StringMatcher(prefix=prefix + value[:-1])
    return string_pb2.StringMatcher(exact=prefix + value)


def _regex(pattern: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))


def _header_matcher(name: str, value: str) -> route_components_pb2.HeaderMatcher:
    """Istio's HeaderMatcher: ``*`` is presence, then suffix, prefix or exact."""
    if value == "*":
        return route_components_pb2.HeaderMatcher(name=name, present_match=True)
    if value.startswith("*"):
        m = string_pb2.StringMatcher(suffix=value[1:])
    elif value.endswith("*"):
        m = string_pb2.StringMatcher(prefix=value[:-1])
    else:
        m = string_pb2.StringMatcher(exact=value)
    return route_components_pb2.HeaderMatcher(name=name, string_match=m)


def _host_matcher(value: str) -> route_components_pb2.HeaderMatcher:
    """Istio's HostMatcher: the header matcher on ``:authority``, ignoring case."""
    h = _header_matcher(":authority", value)
    if h.HasField("string_match"):
        h.string_match.ignore_case = True
    return h


def _cidr(value: str) -> address_pb2.CidrRange:
    network = ipaddress.ip_network(value, strict=False)
    return address_pb2.CidrRange(
        address_prefix=value.split("/", 1)[0],  # as written; Envoy masks it
        prefix_len=wrappers_pb2.UInt32Value(value=network.prefixlen),
    )
