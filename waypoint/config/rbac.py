"""Envoy's RBAC filters -> :mod:`waypoint.config.rbac_model` (see :mod:`waypoint.config.convert`).

The HTTP filter (``envoy.extensions.filters.http.rbac.v3.RBAC``) and the network
filter (``envoy.extensions.filters.network.rbac.v3.RBAC``) both carry one
``envoy.config.rbac.v3.RBAC``: ALLOW or DENY, and policies of permissions and
principals. What is converted is what the waypoint enforces as Envoy does; the
rest is refused naming the field: shadow rules, the matcher API, per-rule stats,
audit logging, the LOG action, CEL conditions, the network filter's CONTINUOUS
enforcement and ``delay_deny``, and the permission and principal kinds not listed
in the module's ``_permission`` and ``_principal``. Envoy's own validation rules
(at least one permission, principal, rule and id; ``any`` only ever true; an
``or_match`` of two or more) are checked too: Envoy would NACK such a resource.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import re2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import metadata_pb2, value_pb2
from google.protobuf import any_pb2

from waypoint.config import rbac_model as r
from waypoint.config.checks import Unsupported, only, unpack
from waypoint.config.model import IPNetwork
from waypoint.config.routes import header_matcher, string_matcher

HTTP_RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"


def http_filter(packed: any_pb2.Any, where: str) -> r.Rbac | None:
    """An HTTP RBAC filter; None when it sets no ``rules`` (Envoy: it does nothing)."""
    f = unpack(packed, http_rbac_pb2.RBAC, where)
    only(f, {"rules", "rules_stat_prefix"}, where)
    if not f.HasField("rules"):
        return None
    return rules(f.rules, f"{where}.rules", stat_prefix=f.rules_stat_prefix)


def network_filter(packed: any_pb2.Any, where: str) -> r.Rbac | None:
    """A network RBAC filter, enforced once per connection (ONE_TIME_ON_FIRST_BYTE)."""
    f = unpack(packed, network_rbac_pb2.RBAC, where)
    only(f, {"rules", "stat_prefix", "enforcement_type"}, where)
    if f.enforcement_type != network_rbac_pb2.RBAC.ONE_TIME_ON_FIRST_BYTE:
        raise Unsupported(f"{where}.enforcement_type: only ONE_TIME_ON_FIRST_BYTE")
    if not f.stat_prefix:
        raise Unsupported(f"{where}.stat_prefix: is required (Envoy's validation)")
    if not f.HasField("rules"):
        return None
    return rules(f.rules, f"{where}.rules", stat_prefix=f.stat_prefix)


def rules(msg: rbac_pb2.RBAC, where: str, *, stat_prefix: str = "") -> r.Rbac:
    only(msg, {"action", "policies"}, where)
    if msg.action == rbac_pb2.RBAC.ALLOW:
        action = r.Action.ALLOW
    elif msg.action == rbac_pb2.RBAC.DENY:
        action = r.Action.DENY
    else:
        raise Unsupported(f"{where}.action: only ALLOW and DENY (no LOG)")
    policies = tuple(
        _policy(name, msg.policies[name], f"{where}.policies[{name}]")
        for name in sorted(msg.policies)  # Envoy's std::map: the first match by name
    )
    return r.Rbac(action=action, policies=policies, stat_prefix=stat_prefix)


def _policy(name: str, p: rbac_pb2.Policy, where: str) -> r.Policy:
    only(p, {"permissions", "principals"}, where)
    if not p.permissions:
        raise Unsupported(f"{where}.permissions: at least one is required")
    if not p.principals:
        raise Unsupported(f"{where}.principals: at least one is required")
    return r.Policy(
        name=name,
        permissions=tuple(
            _permission(x, f"{where}.permissions[{i}]") for i, x in enumerate(p.permissions)
        ),
        principals=tuple(
            _principal(x, f"{where}.principals[{i}]") for i, x in enumerate(p.principals)
        ),
    )


def _permission(p: rbac_pb2.Permission, where: str) -> r.Rule:
    kind = p.WhichOneof("rule")
    w = f"{where}.{kind}"
    if kind == "and_rules" or kind == "or_rules":
        rules_ = getattr(p, kind).rules
        if not rules_:
            raise Unsupported(f"{w}.rules: at least one is required")
        parts = tuple(_permission(x, f"{w}.rules[{i}]") for i, x in enumerate(rules_))
        return r.AndRule(parts) if kind == "and_rules" else r.OrRule(parts)
    if kind == "any":
        return _any(p.any, w)
    if kind == "not_rule":
        return r.NotRule(_permission(p.not_rule, w))
    if kind == "header":
        return r.HeaderRule(header_matcher(p.header, w))
    if kind == "url_path":
        return _url_path(p.url_path, w)
    if kind == "destination_ip":
        return r.IpRule(r.Address.DESTINATION, _cidr(p.destination_ip, w))
    if kind == "destination_port":
        if p.destination_port > 65535:
            raise Unsupported(f"{w}: {p.destination_port} is not a port")
        return r.PortRule(p.destination_port)
    if kind == "requested_server_name":
        return r.ServerNameRule(string_matcher(p.requested_server_name, w))
    if kind == "metadata":
        return _metadata(p.metadata, w)
    if kind == "uri_template":
        return _uri_template(p.uri_template, w)
    if kind is None:
        raise Unsupported(f"{where}: a permission needs a rule")
    raise Unsupported(f"{w}: not supported by this waypoint")


def _principal(p: rbac_pb2.Principal, where: str) -> r.Rule:
    kind = p.WhichOneof("identifier")
    w = f"{where}.{kind}"
    if kind == "and_ids" or kind == "or_ids":
        ids = getattr(p, kind).ids
        if not ids:
            raise Unsupported(f"{w}.ids: at least one is required")
        parts = tuple(_principal(x, f"{w}.ids[{i}]") for i, x in enumerate(ids))
        return r.AndRule(parts) if kind == "and_ids" else r.OrRule(parts)
    if kind == "any":
        return _any(p.any, w)
    if kind == "not_id":
        return r.NotRule(_principal(p.not_id, w))
    if kind == "authenticated":
        only(p.authenticated, {"principal_name"}, w)
        name = p.authenticated
        matcher = (
            string_matcher(name.principal_name, f"{w}.principal_name")
            if name.HasField("principal_name")
            else None
        )
        return r.AuthenticatedRule(matcher)
    if kind in ("source_ip", "direct_remote_ip", "remote_ip"):
        return r.IpRule(r.Address(kind), _cidr(getattr(p, kind), w))
    if kind == "header":
        return r.HeaderRule(header_matcher(p.header, w))
    if kind == "url_path":
        return _url_path(p.url_path, w)
    if kind == "metadata":
        return _metadata(p.metadata, w)
    if kind == "filter_state":
        fs = p.filter_state
        only(fs, {"key", "string_match"}, w)
        if not fs.key:
            raise Unsupported(f"{w}.key: is required")
        if not fs.HasField("string_match"):
            raise Unsupported(f"{w}: a filter state matcher needs string_match")
        return r.FilterStateRule(fs.key, string_matcher(fs.string_match, f"{w}.string_match"))
    if kind is None:
        raise Unsupported(f"{where}: a principal needs an identifier")
    raise Unsupported(f"{w}: not supported by this waypoint")


def _any(value: bool, where: str) -> r.AnyRule:
    if not value:
        raise Unsupported(f"{where}: must be true (Envoy's validation)")
    return r.AnyRule()


def _url_path(p: Any, where: str) -> r.PathRule:
    only(p, {"path"}, where)
    if not p.HasField("path"):
        raise Unsupported(f"{where}: a path matcher needs path")
    return r.PathRule(string_matcher(p.path, f"{where}.path"))


def _cidr(c: Any, where: str) -> IPNetwork:
    only(c, {"address_prefix", "prefix_len"}, where)
    length = c.prefix_len.value
    try:
        address = ipaddress.ip_address(c.address_prefix)
        if length > address.max_prefixlen:
            raise ValueError(f"prefix length {length} is too long for {address}")
        return ipaddress.ip_network(f"{address}/{length}", strict=False)  # Envoy masks it
    except ValueError as e:
        raise Unsupported(f"{where}: {e}") from None


def _metadata(mm: metadata_pb2.MetadataMatcher, where: str) -> r.MetadataRule:
    only(mm, {"filter", "path", "value", "invert"}, where)
    if not mm.filter:
        raise Unsupported(f"{where}.filter: is required")
    if not mm.path:
        raise Unsupported(f"{where}.path: at least one segment is required")
    keys = []
    for i, segment in enumerate(mm.path):
        only(segment, {"key"}, f"{where}.path[{i}]")
        if not segment.key:
            raise Unsupported(f"{where}.path[{i}].key: is required")
        keys.append(segment.key)
    if not mm.HasField("value"):
        raise Unsupported(f"{where}.value: is required")
    return r.MetadataRule(
        filter=mm.filter,
        path=tuple(keys),
        value=_value(mm.value, f"{where}.value"),
        invert=mm.invert,
    )


def _value(v: value_pb2.ValueMatcher, where: str) -> r.ValueMatch:
    kind = v.WhichOneof("match_pattern")
    w = f"{where}.{kind}"
    if kind == "null_match":
        return r.NullValue()
    if kind == "double_match":
        d = v.double_match
        which = d.WhichOneof("match_pattern")
        if which == "exact":
            return r.DoubleValue(exact=d.exact)
        if which == "range":
            return r.DoubleValue(start=d.range.start, end=d.range.end)
        raise Unsupported(f"{w}: needs range or exact")
    if kind == "string_match":
        return r.StringValue(string_matcher(v.string_match, w))
    if kind == "bool_match":
        return r.BoolValue(v.bool_match)
    if kind == "present_match":
        return r.PresentValue(v.present_match)
    if kind == "list_match":
        if not v.list_match.HasField("one_of"):
            raise Unsupported(f"{w}: needs one_of")
        return r.ListValue(_value(v.list_match.one_of, f"{w}.one_of"))
    if kind == "or_match":
        matchers = v.or_match.value_matchers
        if len(matchers) < 2:
            raise Unsupported(f"{w}.value_matchers: at least two are required")
        return r.OrValue(
            tuple(_value(x, f"{w}.value_matchers[{i}]") for i, x in enumerate(matchers))
        )
    raise Unsupported(f"{where}: a value matcher needs a pattern")


def _uri_template(ext: Any, where: str) -> r.UriTemplateRule:
    only(ext, {"name", "typed_config"}, where)
    config = unpack(ext.typed_config, uri_template_match_pb2.UriTemplateMatchConfig, where)
    only(config, {"path_template"}, f"{where}.typed_config")
    template = config.path_template
    try:
        pattern = uri_template_regex(template)
    except ValueError as e:
        raise Unsupported(f"{where}.typed_config.path_template: {template!r}: {e}") from None
    return r.UriTemplateRule(template, re2.compile(pattern))


# ------------------------------------------------------------------ URI templates

# Envoy's uri_template_lib: a literal is pchars (RFC 3986) but '*' and '='.
_LITERAL = "a-zA-Z0-9-._~%!$&'()+,;:@"
_PATH_GLOB = f"[{_LITERAL}]+"  # '*': one segment
_TEXT_GLOB = f"[{_LITERAL}/]*"  # '**': anything, '/' included, even nothing
_LITERAL_RE = re2.compile(f"[{_LITERAL}]+")
_NAME_RE = re2.compile("[a-zA-Z][a-zA-Z0-9_]*")
_GRAPH_RE = re2.compile("/[[:graph:]]*")
_MAX_VARIABLES = 5
_MAX_NAME = 16


def _escape(literal: str) -> str:
    """Envoy's toRegexPattern for a literal: only these are special in one."""
    for ch in "$()+.":
        literal = literal.replace(ch, "\\" + ch)
    return literal


def _literal(text: str) -> tuple[str, str]:
    """consumeLiteral: up to the next '/', which must be a valid literal."""
    lit = text.split("/", 1)[0]
    if not _LITERAL_RE.fullmatch(lit):
        raise ValueError(f"invalid literal {lit!r}")
    return _escape(lit), text[len(lit) :]


def _operator(text: str) -> tuple[str, str, bool]:
    """The regex of a leading '**' or '*', the rest, and whether it was '**'."""
    if text.startswith("**"):
        return _TEXT_GLOB, text[2:], True
    return _PATH_GLOB, text[1:], False


def uri_template_regex(template: str) -> str:
    """Envoy's convertPathPatternSyntaxToRegex (``uri_template_internal.cc``): the same
    grammar (literals, ``*``, ``**``, ``{name}``, ``{name=...}``, a suffix after the
    last glob), the same refusals, the same expression."""
    if not 1 <= len(template) <= 256 or not _GRAPH_RE.fullmatch(template):
        raise ValueError("a template is '/' and printable characters, up to 256")
    rest = template[1:]
    segments: list[str] = []
    suffix = ""
    names: set[str] = set()
    seen_text_glob = False
    while rest:
        if rest[0] == "*":
            regex, rest, text = _operator(rest)
            if seen_text_glob:
                raise ValueError("a glob after '**'")
            seen_text_glob = text
        elif rest[0] == "{":
            regex, rest, seen_text_glob = _variable(rest, names, seen_text_glob)
        else:
            regex, rest = _literal(rest)
        segments.append(regex)
        if not rest:
            break
        if rest == "/":
            segments.append("")  # a trailing '/'
            break
        if rest[0] == "/":
            rest = rest[1:]
            continue
        suffix, rest = _literal(rest)  # text right after the segment: a suffix
        if rest:
            raise ValueError("a suffix must end the template")
        break
    return "/" + "/".join(segments) + suffix


def _variable(text: str, names: set[str], seen_text_glob: bool) -> tuple[str, str, bool]:
    body, sep, rest = text[1:].partition("}")
    if not sep:
        raise ValueError("unmatched variable bracket")
    name, has_match, match = body.partition("=")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid variable name {name!r}")
    if len(names) >= _MAX_VARIABLES:
        raise ValueError(f"more than {_MAX_VARIABLES} variables")
    if len(name) > _MAX_NAME:
        raise ValueError(f"variable name {name!r} longer than {_MAX_NAME}")
    if name in names:
        raise ValueError(f"variable {name!r} repeated")
    names.add(name)
    if not has_match:
        if seen_text_glob:
            raise ValueError("a variable (a '*') after '**'")
        return f"(?P<{name}>{_PATH_GLOB})", rest, False
    if not match:
        raise ValueError("empty variable match")
    parts = []
    while match:
        if match[0] == "*":
            regex, match, text_glob = _operator(match)
            if seen_text_glob:
                raise ValueError("a glob after '**'")
            seen_text_glob = text_glob
        else:
            regex, match = _literal(match)
        parts.append(regex)
        if match:
            if match[0] != "/" or len(match) == 1:
                raise ValueError("invalid variable match")
            match = match[1:]
    return f"(?P<{name}>{'/'.join(parts)})", rest, seen_text_glob
