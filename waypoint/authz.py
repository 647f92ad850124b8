"""RBAC, decided: Envoy's RoleBasedAccessControlEngineImpl over one request or connection.

Pure: :class:`Attributes` (what the request and its connection are) against the
rules of :mod:`waypoint.config.rbac_model`, a :class:`Verdict` out. As Envoy:

* a filter's policies are tried in name order; a policy matches when one of its
  permissions and one of its principals match; ALLOW lets through what a policy
  matches, DENY stops it; the first policy that matched is the one reported;
* the filters of a connection manager run in order, the first denial answers
  403 ``RBAC: access denied`` with the response code details
  ``rbac_access_denied_matched_policy[<policy>]`` (``[none]`` when an ALLOW
  filter matched nothing) and no response flag (Envoy sets none);
* a network filter sees the connection only: no headers (a header matcher
  sees every header missing, a path matcher never matches), no metadata.

Where the attributes come from: the destination is the connection's original
destination (the CONNECT authority, the chain's address); the source (for
``source_ip`` and ``direct_remote_ip``) the downstream peer, as the HBONE
``Forwarded`` header names it; ``remote_ip`` Envoy's remote address, which with
``use_remote_address: false`` and no trusted hops (the only HCM this waypoint
takes) is the last valid address of ``x-forwarded-for``, else the peer; the peer
identity is the HBONE client's SPIFFE ID, for ``authenticated`` (as the URI SAN
of a TLS peer) and the filter state ``io.istio.peer_principal``, the only filter
state key there is; the SNI is always "" (the streams are plaintext here); the
dynamic metadata of a request is what the JWT filter set before RBAC runs
(``envoy.filters.http.jwt_authn``: the verified tokens' payloads).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from waypoint.config import rbac_model as r
from waypoint.http.messages import LocalReply, RequestHead
from waypoint.match import RequestView, header_matches

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PEER_PRINCIPAL = "io.istio.peer_principal"
DENIED_BODY = b"RBAC: access denied"
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_MISSING = object()
_CONNECTION = "_authz"  # where a connection's facts are kept in its info


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    policy: str = ""  # the policy that matched; "" when none did


class _NoHeaders(RequestView):
    """A connection's "request": every header missing (Envoy's empty header map)."""

    __slots__ = ()

    def values(self, name: str) -> list[str] | None:
        return None


_NO_HEADERS = _NoHeaders(method="", path="", authority="", scheme="", headers=())


@dataclass(frozen=True, slots=True, kw_only=True)
class Connection:
    """What a connection is, for RBAC: worked out once per connection."""

    source: IPAddress | None = None
    destination: IPAddress | None = None
    port: int = 0
    peer_identity: str = ""
    server_name: str = ""


class Attributes:
    """One request (or a connection alone: ``request`` None) as RBAC sees it."""

    __slots__ = ("_remote", "connection", "forwarded_for", "metadata", "path", "request")

    def __init__(
        self,
        connection: Connection,
        request: RequestView | None = None,
        *,
        forwarded_for: str | None = None,
        metadata: Mapping[str, Any] = _EMPTY,
    ) -> None:
        self.connection = connection
        self.request = request
        self.forwarded_for = forwarded_for
        self.metadata = metadata  # filter name -> a Struct as nested dicts and lists
        self.path: str | None = None
        self._remote: Any = _MISSING

    def remote(self) -> IPAddress | None:
        """Envoy's remote address (getLastAddressFromXFF with no trusted hops)."""
        if self._remote is _MISSING:
            self._remote = _last_forwarded(self.forwarded_for) or self.connection.source
        return self._remote  # type: ignore[no-any-return]

    def path_only(self) -> str | None:
        """The path without query string and fragment (PathUtil::removeQueryAndFragment)."""
        if self.request is None:
            return None
        if self.path is None:
            self.path = self.request.path.split("?", 1)[0].split("#", 1)[0]
        return self.path


# ------------------------------------------------------------------ the engine


def evaluate(rbac: r.Rbac, attrs: Attributes) -> Verdict:
    """One filter's verdict."""
    matched = ""
    for policy in rbac.policies:
        if any(matches(p, attrs) for p in policy.permissions) and any(
            matches(p, attrs) for p in policy.principals
        ):
            matched = policy.name
            break
    if rbac.action is r.Action.ALLOW:
        return Verdict(bool(matched), matched)
    return Verdict(not matched, matched)


def check(filters: Sequence[r.Rbac], attrs: Attributes) -> Verdict:
    """The filters in order: the first denial, else allowed."""
    verdict = Verdict(True)
    for rbac in filters:
        verdict = evaluate(rbac, attrs)
        if not verdict.allowed:
            return verdict
    return verdict


def matches(rule: r.Rule, a: Attributes) -> bool:
    return _MATCHERS[type(rule)](rule, a)


def _ip(rule: r.IpRule, a: Attributes) -> bool:
    address = rule.address
    if address is r.Address.DESTINATION:
        ip = a.connection.destination
    elif address is r.Address.REMOTE:
        ip = a.remote()
    else:
        ip = a.connection.source
    return ip is not None and ip in rule.network


def _header(rule: r.HeaderRule, a: Attributes) -> bool:
    return header_matches(a.request if a.request is not None else _NO_HEADERS, rule.header)


def _path(rule: r.PathRule, a: Attributes) -> bool:
    path = a.path_only()
    return path is not None and rule.path.matches(path)


def _template(rule: r.UriTemplateRule, a: Attributes) -> bool:
    path = a.path_only()
    return path is not None and rule.regex.fullmatch(path) is not None


def _authenticated(rule: r.AuthenticatedRule, a: Attributes) -> bool:
    identity = a.connection.peer_identity
    if not identity:
        return False  # no TLS peer: Envoy's AuthenticatedMatcher never matches
    return rule.principal is None or rule.principal.matches(identity)


def _filter_state(rule: r.FilterStateRule, a: Attributes) -> bool:
    value = a.connection.peer_identity if rule.key == PEER_PRINCIPAL else ""
    return bool(value) and rule.matcher.matches(value)  # absent: no match


def _metadata(rule: r.MetadataRule, a: Attributes) -> bool:
    value: Any = a.metadata.get(rule.filter, _MISSING)
    for key in rule.path:
        value = value.get(key, _MISSING) if isinstance(value, Mapping) else _MISSING
    return value_matches(rule.value, value) != rule.invert


_MATCHERS: dict[type, Callable[[Any, Attributes], bool]] = {
    r.AnyRule: lambda _rule, _a: True,
    r.AndRule: lambda rule, a: all(matches(x, a) for x in rule.rules),
    r.OrRule: lambda rule, a: any(matches(x, a) for x in rule.rules),
    r.NotRule: lambda rule, a: not matches(rule.rule, a),
    r.HeaderRule: _header,
    r.PathRule: _path,
    r.UriTemplateRule: _template,
    r.IpRule: _ip,
    r.PortRule: lambda rule, a: a.connection.port == rule.port,
    r.ServerNameRule: lambda rule, a: rule.matcher.matches(a.connection.server_name),
    r.AuthenticatedRule: _authenticated,
    r.FilterStateRule: _filter_state,
    r.MetadataRule: _metadata,
}


def value_matches(m: r.ValueMatch, value: Any) -> bool:
    """Envoy's ValueMatcher over a Struct value (None is null; a missing one is absent)."""
    if isinstance(m, r.PresentValue):
        return m.present == (value is not _MISSING)
    if isinstance(m, r.StringValue):
        return isinstance(value, str) and m.matcher.matches(value)
    if isinstance(m, r.OrValue):
        return any(value_matches(x, value) for x in m.matchers)
    if isinstance(m, r.ListValue):
        return isinstance(value, list) and any(value_matches(m.one_of, x) for x in value)
    if isinstance(m, r.BoolValue):
        return isinstance(value, bool) and value == m.value
    if isinstance(m, r.DoubleValue):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if m.exact is not None:
            return bool(value == m.exact)
        return bool(m.start <= value < m.end)
    return value is None  # NullValue


# ------------------------------------------------------------------ the data path's side


def connection(info: dict[str, Any]) -> Connection:
    """The connection's facts from a codec's ``info`` (kept there: once per connection)."""
    found = info.get(_CONNECTION)
    if found is None:
        source = info.get("source_ip") or str(info.get("peer") or "").rsplit(":", 1)[0]
        host, _, port = str(info.get("authority") or "").rpartition(":")
        found = Connection(
            source=_address(source),
            destination=_address(host),
            port=int(port) if port.isdigit() else 0,
            peer_identity=str(info.get("peer_identity") or ""),
        )
        info[_CONNECTION] = found
    return found


def http_denial(
    filters: Sequence[r.Rbac],
    info: dict[str, Any],
    head: RequestHead,
    metadata: Mapping[str, Any] = _EMPTY,
) -> LocalReply | None:
    """The connection manager's RBAC filters over one request: Envoy's 403, or None.
    ``metadata`` is the request's dynamic metadata so far (the JWT filter's)."""
    forwarded = head.get_all("x-forwarded-for")
    view = RequestView(
        method=head.method,
        path=head.target,
        authority=head.authority,
        scheme=head.scheme,
        headers=head.headers,
    )
    attrs = Attributes(
        connection(info),
        view,
        forwarded_for=",".join(forwarded) if forwarded else None,
        metadata=metadata,
    )
    verdict = check(filters, attrs)
    return None if verdict.allowed else denied(verdict)


def denied(verdict: Verdict) -> LocalReply:
    return LocalReply(403, DENIED_BODY, details=response_detail(verdict.policy or "none"))


def response_detail(policy: str) -> str:
    """Envoy's RBAC::responseDetail: white space in the name becomes ``_``."""
    for ch in " \t\f\v\n\r":
        policy = policy.replace(ch, "_")
    return f"rbac_access_denied_matched_policy[{policy}]"


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _last_forwarded(xff: str | None) -> IPAddress | None:
    """Utility::getLastAddressFromXFF(headers, 0): the text after the last comma (all of
    it when the comma ends it), trimmed, if it is an IP address."""
    if xff is None:
        return None
    comma = xff.rfind(",")
    if comma != -1 and comma + 1 < len(xff):
        xff = xff[comma + 1 :]
    try:
        return ipaddress.ip_address(xff.strip(" \t\f\v\n\r"))
    except ValueError:
        return None
