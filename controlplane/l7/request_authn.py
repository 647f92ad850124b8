"""Istio ``RequestAuthentication`` objects bound to a waypoint by ``targetRefs``, read as Istio.

A RequestAuthentication (``security.istio.io/v1``, or v1beta1) with
``targetRef`` or ``targetRefs`` is the waypoint's, bound as an
AuthorizationPolicy is (:mod:`controlplane.l7.authz`): a ``Gateway`` (the
waypoint, all its chains), a ``Service`` (that service's chains) or, from the
root namespace, the ``GatewayClass`` ``istio-waypoint`` (every waypoint).
One with a ``selector`` (or neither) is for sidecars and workloads, which
Istio never attaches to a waypoint (``ShouldAttachPolicy``: waypoints never
use a selector); ztunnel does no JWT, so such a one is in force nowhere, and
its ``ZtunnelAccepted`` condition says so.

Each ``jwtRules`` entry is read with Istio's field names and checks
(``pkg/config/validation``: ``issuer`` or ``jwksUri`` set, audiences and
token locations non-empty, ``jwks`` a key set, ``jwksUri`` an http(s) URL,
claim headers valid header names); :mod:`controlplane.l7.envoy_jwt` turns the
rules into Envoy's ``jwt_authn`` filter as istiod does.

What is refused says so in the object's ``WaypointAccepted`` condition: an
unknown field or a value Istio's validation refuses leaves the object bound
nowhere (as the API server's webhook would have refused it), and says which
field. A rule with ``jwksUri`` and no inline ``jwks`` gets the keys meshd
fetched from it (:mod:`controlplane.jwks`, given here as
``SourceState.jwks``), and the condition says from where and since when;
with neither, meshd finds them as istiod does, by OpenID discovery (the
issuer's ``/.well-known/openid-configuration``, its ``jwks_uri``). Until they
are first fetched (or when there is nowhere to fetch them from: an issuer
that is no http(s) URL) the rule gets a key set nobody can sign for (Istio's
own fallback while its fetch fails), so a token from that issuer is refused
and never accepted, and the condition says so (``KeysNotFetched`` while not
fetched yet, ``UnsupportedValue`` when there is nowhere to fetch from).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from types import MappingProxyType
from urllib.parse import urlsplit

from controlplane.l7.authz import Target, has_target_refs, read_targets
from controlplane.l7.istio_object import created_of, generation_of
from controlplane.l7.reader import InvalidObject, Reader, go_duration
from controlplane.l7.status import Condition, ObjectStatus, waypoint_accepted
from controlplane.state import FetchedJwks, L7Object

KIND = "RequestAuthentication"
_API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
_RULE_FIELDS = {
    "issuer",
    "audiences",
    "jwks",
    "jwksUri",
    "jwks_uri",  # the proto name, which Istio accepts too
    "fromHeaders",
    "fromParams",
    "fromCookies",
    "outputPayloadToHeader",
    "outputClaimToHeaders",
    "forwardOriginalToken",
    "timeout",
    "spaceDelimitedClaims",
}
# Istio's ValidateStrictHTTPHeaderName.
_HEADER_NAME = re.compile(r"^[a-zA-Z0-9-]+$")

OPENID_CONFIGURATION = "/.well-known/openid-configuration"


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtRule:
    """One ``jwtRules`` entry, with Istio's defaults."""

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str = ""  # the inline key set, as written
    jwks_uri: str = ""  # without jwks and jwksUri, Istio finds the keys by OpenID discovery
    from_headers: tuple[tuple[str, str], ...] = ()  # (name, prefix)
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)
    forward_original_token: bool = False
    timeout_s: float | None = None  # for fetching jwksUri (controlplane.jwks)
    space_delimited_claims: tuple[str, ...] = ()
    fetched: FetchedJwks | None = None  # jwksUri's keys as meshd fetched them

    @property
    def fetches(self) -> bool:
        """Whether meshd fetches this rule's keys: no inline jwks, and a jwksUri or an
        issuer that is an http(s) URL (OpenID discovery)."""
        return not self.jwks and bool(self.fetch_uri)

    @property
    def fetch_uri(self) -> str:
        """Where the keys come from: the jwksUri, else (istiod's ``resolveJwksURIUsingOpenID``)
        the issuer's ``/.well-known/openid-configuration``, whose ``jwks_uri`` meshd follows."""
        if self.jwks_uri:
            return self.jwks_uri
        if urlsplit(self.issuer).scheme in ("http", "https") and urlsplit(self.issuer).netloc:
            return self.issuer.rstrip("/") + OPENID_CONFIGURATION
        return ""

    @property
    def unfetched(self) -> bool:
        """No keys (not fetched yet, or nowhere to fetch them from): the rule refuses
        every token of its issuer."""
        return not self.jwks and self.fetched is None


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointAuthentication:
    namespace: str
    name: str
    targets: tuple[Target, ...]
    rules: tuple[JwtRule, ...]
    problem: str = ""  # what is not done as written (the status message), "" when all is
    problem_reason: str = "UnsupportedValue"
    notes: tuple[str, ...] = ()  # where fetched keys come from (said in the status)
    generation: int = 0
    created: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


_NO_JWKS: Mapping[str, FetchedJwks] = MappingProxyType({})


def parse_all(
    objects: Iterable[L7Object], root_namespace: str, jwks: Mapping[str, FetchedJwks] = _NO_JWKS
) -> tuple[list[WaypointAuthentication], list[ObjectStatus]]:
    """The waypoints' RequestAuthentications in Istio's order (creation time, name,
    namespace), and the statuses of those that cannot be used (bound nowhere).
    Selector-bound ones (and those with neither) are not the waypoint's: only their
    status, saying they are in force nowhere.
    ``jwks``: the key sets meshd fetched, by jwksUri."""
    out, refused = [], []
    for obj in sorted(objects, key=lambda o: (created_of(o.raw), o.name, o.namespace)):
        if obj.kind != KIND:
            continue
        if not has_target_refs(obj.raw):
            refused.append(_not_for_ztunnel(obj))
            continue
        try:
            out.append(parse(obj, root_namespace, jwks))
        except InvalidObject as e:
            refused.append(
                _status(obj.namespace, obj.name, generation_of(obj.raw), False, "Invalid",
                        f"{e.path}: {e.reason}; it is not in force anywhere until it is fixed")
            )  # fmt: skip
    return out, refused


NOT_FOR_ZTUNNEL = (
    "ztunnel does not authenticate end users (a JWT is HTTP, ztunnel sees L4): a "
    "RequestAuthentication bound by selector (or to a whole namespace) is in force "
    "nowhere in ambient mode; bind it to a waypoint with targetRefs"
)


def _not_for_ztunnel(obj: L7Object) -> ObjectStatus:
    """Said, not silently ignored: there are no sidecars here to take it."""
    return ObjectStatus(
        kind=KIND,
        namespace=obj.namespace,
        name=obj.name,
        generation=generation_of(obj.raw),
        conditions=(
            Condition(
                type="ZtunnelAccepted", status=False, reason="UnsupportedValue",
                message=NOT_FOR_ZTUNNEL,
            ),
        ),
    )  # fmt: skip


def jwks_uris(objects: Iterable[L7Object], root_namespace: str) -> dict[str, float | None]:
    """The jwksUri meshd must fetch for the waypoints' RequestAuthentications, each with
    the longest ``timeout`` of its rules (None: none says)."""
    out: dict[str, float | None] = {}
    for authn in parse_all(objects, root_namespace)[0]:
        for rule in authn.rules:
            if not rule.fetches:
                continue
            uri = rule.fetch_uri
            timeouts = [t for t in (out.get(uri), rule.timeout_s) if t is not None]
            out[uri] = max(timeouts) if timeouts else None
    return out


def parse(
    obj: L7Object, root_namespace: str, jwks: Mapping[str, FetchedJwks] = _NO_JWKS
) -> WaypointAuthentication:
    """One RequestAuthentication with targetRefs; raises :class:`InvalidObject`."""
    r = Reader(obj.raw, KIND, f"{obj.namespace}/{obj.name}")
    if r.raw.get("kind") not in (None, KIND):
        raise r.error(f"must be {KIND}", "kind")
    api = r.raw.get("apiVersion", _API_VERSIONS[0])
    if api not in _API_VERSIONS:
        raise r.error(f"{api!r} is not one of {', '.join(_API_VERSIONS)}", "apiVersion")
    spec = r.child("spec")
    spec.only({"targetRef", "targetRefs", "selector", "jwtRules"})
    if spec.has("selector"):
        raise spec.error("cannot be combined with targetRefs (Istio refuses both)", "selector")
    targets = read_targets(r, obj.namespace, root_namespace)
    rules = tuple(
        replace(rule, fetched=jwks.get(rule.fetch_uri)) if rule.fetches else rule
        for rule in (_rule(c) for c in spec.children("jwtRules"))
    )
    pending = [
        f"spec.jwtRules[{i}] (issuer {rule.issuer!r}, "
        + (f"jwksUri {rule.jwks_uri})" if rule.jwks_uri else "keys by OpenID discovery)")
        for i, rule in enumerate(rules)
        if rule.unfetched and rule.fetches
    ]
    nowhere = [
        f"spec.jwtRules[{i}] (issuer {rule.issuer!r})"
        for i, rule in enumerate(rules)
        if rule.unfetched and not rule.fetches
    ]
    notes = tuple(
        f"spec.jwtRules[{i}]: keys fetched from {rule.fetch_uri} at {rule.fetched.fetched}"
        for i, rule in enumerate(rules)
        if rule.fetched is not None
    )
    problems = []
    if nowhere:
        problems.append(
            f"{', '.join(nowhere)}: no keys and nowhere to find them (neither jwks nor jwksUri, "
            "and the issuer is not an http(s) URL for OpenID discovery): a token from that "
            "issuer is refused, never accepted"
        )
    if pending:
        problems.append(
            f"{', '.join(pending)}: the keys are not fetched yet (meshd retries): a token "
            "from that issuer is refused, never accepted, until they are"
        )
    return WaypointAuthentication(
        namespace=obj.namespace,
        name=obj.name,
        targets=targets,
        rules=rules,
        problem="; ".join(problems),
        problem_reason="UnsupportedValue" if nowhere else "KeysNotFetched",
        notes=notes,
        generation=generation_of(obj.raw),
        created=created_of(obj.raw),
    )


def status_of(authn: WaypointAuthentication, bound: Sequence[str]) -> ObjectStatus:
    """The ``WaypointAccepted`` condition: where it is in force, or why not."""
    notes = "".join(f"; {note}" for note in authn.notes)
    if authn.problem:
        where = f" (bound to {', '.join(bound)})" if bound else ""
        return _status(authn.namespace, authn.name, authn.generation, False,
                       authn.problem_reason, authn.problem + where + notes)  # fmt: skip
    if not bound:
        targets = ", ".join(str(t) for t in authn.targets)
        return _status(authn.namespace, authn.name, authn.generation, False,
                       "TargetNotFound", f"no waypoint serves {targets}" + notes)  # fmt: skip
    return _status(authn.namespace, authn.name, authn.generation, True, "Accepted",
                   f"bound to {', '.join(bound)}" + notes)  # fmt: skip


_status = partial(waypoint_accepted, KIND)  # namespace, name, generation, ok, reason, message


# ------------------------------------------------------------------ reading


def _rule(r: Reader) -> JwtRule:
    r.only(_RULE_FIELDS)
    issuer = r.text("issuer", "")
    uri_field = "jwks_uri" if r.has("jwks_uri") and not r.has("jwksUri") else "jwksUri"
    if r.has("jwks_uri") and r.has("jwksUri"):
        raise r.error("set jwksUri or jwks_uri, not both", "jwks_uri")
    jwks_uri = r.text(uri_field, "")
    jwks = r.text("jwks", "")
    if not issuer and not jwks_uri:
        raise r.error("issuer or jwksUri must be set", "issuer")
    audiences = _non_empty(r, "audiences")
    if jwks_uri:
        _check_uri(r, uri_field, jwks_uri)
    if jwks:
        _check_jwks(r, jwks)
    headers = []
    for h in r.children("fromHeaders"):
        h.only({"name", "prefix"})
        name = h.text("name", "")
        if not name:
            raise h.error("must be a non-empty header name", "name")
        headers.append((name, h.text("prefix", "")))
    claims = []
    for c in r.children("outputClaimToHeaders"):
        c.only({"header", "claim"})
        header, claim = c.text("header", ""), c.text("claim", "")
        if not header or not claim:
            raise c.error("header and claim must both be non-empty")
        if not _HEADER_NAME.match(header):
            raise c.error(f"{header!r} is not a valid header name", "header")
        claims.append((header, claim))
    payload_header = r.text("outputPayloadToHeader", "")
    if payload_header and not _HEADER_NAME.match(payload_header):
        raise r.error(f"{payload_header!r} is not a valid header name", "outputPayloadToHeader")
    return JwtRule(
        issuer=issuer,
        audiences=audiences,
        jwks=jwks,
        jwks_uri=jwks_uri,
        from_headers=tuple(headers),
        from_params=_non_empty(r, "fromParams"),
        from_cookies=_non_empty(r, "fromCookies"),
        output_payload_to_header=payload_header,
        output_claim_to_headers=tuple(claims),
        forward_original_token=r.boolean("forwardOriginalToken"),
        timeout_s=go_duration(r, "timeout"),
        space_delimited_claims=_non_empty(r, "spaceDelimitedClaims"),
    )


def _non_empty(r: Reader, key: str) -> tuple[str, ...]:
    values = r.strings(key)
    for i, v in enumerate(values):
        if not v:
            raise r.error("must be a non-empty string", f"{key}[{i}]")
    return values


def _check_uri(r: Reader, key: str, uri: str) -> None:
    """Istio's ParseJwksURI: an http or https URL with a host."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError as e:
        raise r.error(f"{uri!r} is not a URL: {e}", key) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise r.error(f"{uri!r} is not an http or https URL", key)


def _check_jwks(r: Reader, jwks: str) -> None:
    try:
        doc = json.loads(jwks)
    except ValueError as e:
        raise r.error(f"is not valid JSON: {e}", "jwks") from None
    keys = doc.get("keys") if isinstance(doc, Mapping) else None
    if not isinstance(keys, list) or not all(isinstance(k, Mapping) for k in keys):
        raise r.error('is not a JSON Web Key Set (an object with a "keys" list)', "jwks")
    for i, key in enumerate(keys):
        if not isinstance(key.get("kty"), str):
            raise r.error(f'keys[{i}] has no "kty" (key type)', "jwks")
