"""Envoy's RBAC rules as the waypoint's model: frozen matcher trees, compiled at conversion.

One :class:`Rbac` per ``envoy.filters.http.rbac`` or ``envoy.filters.network.rbac``
filter that sets ``rules``; its policies sorted by name (Envoy keeps them in a
``std::map`` and reports the first that matches). A permission or a principal is
a tree of the node types below (:data:`Rule`); they are plain values, evaluated by
:mod:`waypoint.authz`. Strings are matched with :class:`~waypoint.config.model.StringMatcher`,
headers with :class:`~waypoint.config.model.HeaderMatcher`, regular expressions and
URI templates compiled with RE2 here, never per request.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from waypoint.config.model import HeaderMatcher, IPNetwork, StringMatcher


class Action(enum.Enum):
    ALLOW = 0  # allowed iff a policy matches
    DENY = 1  # denied iff a policy matches


# ------------------------------------------------------------------ values (metadata)


@dataclass(frozen=True, slots=True)
class NullValue:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class DoubleValue:
    """``exact`` when set, else ``start <= value < end`` (Envoy's DoubleRange)."""

    exact: float | None = None
    start: float = 0.0
    end: float = 0.0


@dataclass(frozen=True, slots=True)
class StringValue:
    matcher: StringMatcher


@dataclass(frozen=True, slots=True)
class BoolValue:
    value: bool


@dataclass(frozen=True, slots=True)
class PresentValue:
    present: bool


@dataclass(frozen=True, slots=True)
class ListValue:
    """A list value with at least one element that ``one_of`` matches."""

    one_of: ValueMatch


@dataclass(frozen=True, slots=True)
class OrValue:
    matchers: tuple[ValueMatch, ...]


ValueMatch = NullValue | DoubleValue | StringValue | BoolValue | PresentValue | ListValue | OrValue


# ------------------------------------------------------------------ permissions and principals


@dataclass(frozen=True, slots=True)
class AnyRule:
    pass


@dataclass(frozen=True, slots=True)
class AndRule:
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class OrRule:
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class NotRule:
    rule: Rule


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """Envoy's header matching over the request headers (pseudo-headers included);
    a connection-level check sees no headers at all."""

    header: HeaderMatcher


@dataclass(frozen=True, slots=True)
class PathRule:
    """``url_path``: the path without query string and fragment."""

    path: StringMatcher


@dataclass(frozen=True, slots=True)
class UriTemplateRule:
    """``uri_template``: Envoy's pattern template as an RE2 expression over the whole
    path without query string."""

    template: str
    regex: Any  # compiled re2


class Address(enum.Enum):
    DESTINATION = "destination_ip"  # the connection's (original) destination
    SOURCE = "source_ip"  # the downstream connection's peer
    DIRECT_REMOTE = "direct_remote_ip"  # the same, as Envoy has no PROXY protocol here
    REMOTE = "remote_ip"  # Envoy's remote address: the last x-forwarded-for entry, else the peer


@dataclass(frozen=True, slots=True)
class IpRule:
    address: Address
    network: IPNetwork


@dataclass(frozen=True, slots=True)
class PortRule:
    """``destination_port``."""

    port: int


@dataclass(frozen=True, slots=True)
class ServerNameRule:
    """``requested_server_name``: the SNI, always "" (HBONE's inner streams are plaintext)."""

    matcher: StringMatcher


@dataclass(frozen=True, slots=True)
class AuthenticatedRule:
    """The peer's identity (the HBONE peer's SPIFFE ID, as its certificate's URI SAN);
    no matcher: any authenticated peer."""

    principal: StringMatcher | None


@dataclass(frozen=True, slots=True)
class FilterStateRule:
    key: str
    matcher: StringMatcher


@dataclass(frozen=True, slots=True, kw_only=True)
class MetadataRule:
    """The request's dynamic metadata of ``filter`` at ``path``; a missing value is
    matched as absent (only ``present_match: false`` takes it), then ``invert``."""

    filter: str
    path: tuple[str, ...]
    value: ValueMatch
    invert: bool = False


Rule = (
    AnyRule
    | AndRule
    | OrRule
    | NotRule
    | HeaderRule
    | PathRule
    | UriTemplateRule
    | IpRule
    | PortRule
    | ServerNameRule
    | AuthenticatedRule
    | FilterStateRule
    | MetadataRule
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Matches when any permission and any principal match."""

    name: str
    permissions: tuple[Rule, ...]
    principals: tuple[Rule, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Rbac:
    """One RBAC filter's rules; ``policies`` in name order."""

    action: Action
    policies: tuple[Policy, ...] = ()
    stat_prefix: str = ""
