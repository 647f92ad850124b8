"""The HTTP filters ahead of the router, explained: what each would do to one request.

:mod:`waypoint.explain` walks them in the router's order (:mod:`waypoint.filters`):
the network RBAC filters of the chain (the connection alone), then the connection
manager's local rate limit when it is first, the JWT authentication filter, the
RBAC filters (DENY, then ALLOW, as configured), and after route selection the
fault filter and the local rate limit when it is last. Each filter is decided
with the waypoint's own code (:mod:`waypoint.ratelimit`, :mod:`waypoint.jwt_authn`,
:mod:`waypoint.authz`), on copies: explaining changes nothing. A rate limit's
tokens left are not known here (they live in the running waypoint), so it is
said when it would refuse (an empty bucket), never that it does.

Each filter gives a :class:`FilterStep`: a line for the text form and a dict for
the JSON form; one that stops the request also gives the verdict (who answered,
with what).
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from waypoint import authz, filters, jwt_authn
from waypoint.config import jwt_model as j
from waypoint.config import rbac_model as r
from waypoint.config.model import FilterChain, HttpManager, LocalRateLimit, Route, RouteConfig
from waypoint.http.messages import LocalReply, RequestHead
from waypoint.match import RequestView, select_route
from waypoint.ratelimit import RateLimiter

MILLION = 1_000_000


@dataclass
class FilterStep:
    text: str
    detail: dict[str, Any]
    verdict: dict[str, Any] | None = None  # set when the filter stops the request
    unless: dict[str, Any] | None = None  # set when it may stop it (a bucket, a fault)


@dataclass
class Walk:
    """What the filters did so far: their steps, the request as the next filter sees it
    (the JWT filter edits it), the dynamic metadata (the JWT filter's, for RBAC)."""

    head: RequestHead
    steps: list[FilterStep] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> dict[str, Any] | None:
        return self.steps[-1].verdict if self.steps else None


# ------------------------------------------------------------------ the connection assumed


def spiffe_id(text: str) -> str:
    """``--as``: a SPIFFE ID; Istio's principal form (``td/ns/x/sa/y``) gets its scheme."""
    text = text.strip()
    if text and "://" not in text:
        text = f"spiffe://{text}"
    return text


def connection(
    chain: FilterChain, host: str, port: int, peer_identity: str, source_ip: str | None
) -> authz.Connection:
    """The connection as the waypoint would see it: the destination the chain's address
    (the VIP the CONNECT names), the source and the peer identity as assumed."""
    destination: authz.IPAddress | None
    try:
        destination = ipaddress.ip_address(host)
    except ValueError:
        exact = [n for n in chain.prefixes if n.prefixlen == n.max_prefixlen]
        destination = exact[0].network_address if exact else None
    source: authz.IPAddress | None = None
    if source_ip:
        try:
            source = ipaddress.ip_address(source_ip.strip("[]"))
        except ValueError as e:
            raise ValueError(f"--from wants an IP address, got {source_ip!r}") from e
    return authz.Connection(
        source=source, destination=destination, port=port, peer_identity=peer_identity
    )


def assumed(conn: authz.Connection) -> tuple[str, dict[str, Any]]:
    identity = conn.peer_identity
    if identity:
        who = f"peer {identity}"
        ns, _, sa = identity.partition("/ns/")[2].partition("/sa/")
        if ns:
            who += f" (namespace {ns}, service account {sa})"
    else:
        who = "no peer identity (an unauthenticated connection; --as SPIFFE_ID names one)"
    source = f"from {conn.source}" if conn.source else "source address unknown (--from IP)"
    return f"assumed: {who}, {source}", {
        "peer_identity": identity or None,
        "source_ip": str(conn.source) if conn.source else None,
        "destination": f"{conn.destination}:{conn.port}" if conn.destination else None,
    }


def _reply(reply: LocalReply, by: str, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "local", "status": reply.status, "by": by, **extra}
    out["body"] = reply.body.decode("latin-1")
    if reply.details:
        out["details"] = reply.details
    if reply.flag != "-":
        out["flag"] = reply.flag
    if reply.headers:
        out["headers"] = dict(reply.headers)
    return out


def _percent(ppm: int) -> str:
    return f"{100.0 * ppm / MILLION:g} %"


# ------------------------------------------------------------------ RBAC


def _rbac(filters_: tuple[r.Rbac, ...], attrs: authz.Attributes, name: str) -> list[FilterStep]:
    """The RBAC filters in order (authz.check), each reported; the first denial stops."""
    out = []
    for rbac in filters_:
        verdict = authz.evaluate(rbac, attrs)
        names = [p.name for p in rbac.policies]
        listed = ", ".join(names) or "none"
        detail: dict[str, Any] = {
            "filter": name,
            "action": rbac.action.name,
            "policies": names,
            "matched": verdict.policy or None,
            "outcome": "pass" if verdict.allowed else "refuse",
        }
        said = f"{verdict.policy} matches" if verdict.policy else "no policy matches"
        text = f"{name} {rbac.action.name} (policies: {listed}): {said}"
        if verdict.allowed:
            out.append(FilterStep(f"{text}: passes", detail))
            continue
        reply = authz.denied(verdict)
        policy = verdict.policy or None
        if name == "network rbac":
            final = {"kind": "reset", "by": name, "policy": policy, "details": reply.details}
            out.append(FilterStep(f"{text}: the connection is closed (reset)", detail, final))
        else:
            final = _reply(reply, "rbac", policy=policy)
            out.append(
                FilterStep(
                    f"{text}: {reply.status} {reply.body.decode()!r} ({reply.details})",
                    detail,
                    final,
                )
            )
        break
    return out


def network_rbac(chain: FilterChain, conn: authz.Connection) -> list[FilterStep]:
    return _rbac(chain.rbac, authz.Attributes(conn), "network rbac")


# ------------------------------------------------------------------ local rate limit


class _Probe(RateLimiter):
    """filters.local_limit's choice of config and bucket, recorded; nothing is counted."""

    def __init__(self) -> None:
        super().__init__(clock=lambda: 0.0)
        self.seen: tuple[LocalRateLimit, Hashable] | None = None

    def check(
        self, config: LocalRateLimit, where: Hashable, rng: random.Random
    ) -> LocalReply | None:
        self.seen = (config, where)
        return None


class _Sampled(random.Random):
    """Every percentage draw taken (the answer when the bucket is empty, if any)."""

    def randrange(self, *args: Any, **kwargs: Any) -> int:
        return 0


def _when_empty(config: LocalRateLimit, where: Hashable) -> LocalReply | None:
    """The waypoint's own answer with this bucket empty: a throwaway limiter, drained."""
    assert config.bucket is not None
    limiter = RateLimiter(clock=lambda: 0.0)
    limiter.bucket(where, config.bucket).tokens = 0.0
    return limiter.check(config, where, _Sampled())


def ratelimit(manager: HttpManager, route: Route | None, position: str) -> FilterStep:
    probe = _Probe()
    filters.local_limit(probe, random.Random(0), manager, route)
    assert probe.seen is not None
    config, where = probe.seen
    name = f"local rate limit ({position})"
    if isinstance(where, tuple) and where and where[0] == "route":
        scope = f"route {route.name if route else ''}'s own bucket (typed_per_filter_config)"
        bucket_of: dict[str, Any] = {"scope": "route", "route": route.name if route else None}
    else:
        scope = f"the filter's bucket ({config.stat_prefix or manager.stat_prefix})"
        bucket_of = {"scope": "filter", "stat_prefix": config.stat_prefix}
    detail: dict[str, Any] = {
        "filter": "local_ratelimit",
        "position": position,
        "bucket": bucket_of,
        "enabled_percent": 100.0 * config.enabled_ppm / MILLION,
        "enforced_percent": 100.0 * config.enforced_ppm / MILLION,
    }
    b = config.bucket
    if b is None:
        detail["outcome"] = "pass"
        return FilterStep(f"{name}: {scope} has no token bucket: nothing is limited", detail)
    bucket_of.update(
        max_tokens=b.max_tokens,
        tokens_per_fill=b.tokens_per_fill,
        fill_interval_s=b.fill_interval_s,
    )
    text = (
        f"{name}: {scope}: {b.max_tokens} tokens, {b.tokens_per_fill} more every "
        f"{b.fill_interval_s:g}s; enabled {_percent(config.enabled_ppm)}, "
        f"enforced {_percent(config.enforced_ppm)}"
    )
    if config.enabled_ppm <= 0:
        detail["outcome"] = "pass"
        return FilterStep(f"{text}: not enabled, the request passes uncounted", detail)
    reply = _when_empty(config, where)
    if reply is None:
        detail["outcome"] = "pass"
        return FilterStep(f"{text}: a token is counted, never refused (not enforced)", detail)
    detail["outcome"] = "refused only when the bucket is empty"
    detail["when_empty"] = _reply(reply, "local_ratelimit")
    sampled = config.enabled_ppm < MILLION or config.enforced_ppm < MILLION
    return FilterStep(
        f"{text}: refused {reply.status} {reply.body.decode()!r} ({reply.flag}) only when the "
        "bucket is empty"
        + (" (and the percentages draw it)" if sampled else "")
        + "; the tokens left are the running waypoint's, not known here (none taken)",
        detail,
        unless={"status": reply.status, "by": "local_ratelimit", "when": "the bucket is empty"},
    )


# ------------------------------------------------------------------ JWT


def _requirement(req: j.Requirement | None, config: j.JwtConfig) -> str:
    if req is None:
        return "nothing (the rule has no requirement)"
    if isinstance(req, j.ProviderRequirement):
        p = config.provider(req.provider)
        audiences = p.audiences if req.audiences is None else req.audiences
        return (
            f"a valid token of {p.name} (issuer {p.issuer or 'any'}"
            + (f", audiences {', '.join(audiences)}" if audiences else "")
            + ")"
        )
    if isinstance(req, j.AnyRequirement):
        return "(" + " or ".join(_requirement(x, config) for x in req.requirements) + ")"
    if isinstance(req, j.AllRequirement):
        return "(" + " and ".join(_requirement(x, config) for x in req.requirements) + ")"
    if isinstance(req, j.AllowMissing):
        return "no token, or any token failing" if req.failed else "no token"
    return "anything"


def _providers_of(req: j.Requirement | None, config: j.JwtConfig) -> list[j.Provider]:
    names: list[str] = []

    def walk(x: j.Requirement | None) -> None:
        if isinstance(x, j.ProviderRequirement):
            names.append(x.provider)
        elif isinstance(x, j.AnyRequirement | j.AllRequirement):
            for child in x.requirements:
                walk(child)
        elif isinstance(x, j.AllowMissing):
            names.extend(x.providers)

    walk(req)
    return [config.provider(n) for n in dict.fromkeys(names)]


def _locations(providers: list[j.Provider]) -> list[str]:
    out: list[str] = []
    for p in providers:
        out += [
            f"header {h.name}: "
            + (f"{h.value_prefix.strip()} <token>" if h.value_prefix else "<token>")
            for h in p.from_headers
        ]
        out += [f"query parameter {name}" for name in p.from_params]
        out += [f"cookie {name}" for name in p.from_cookies]
    return list(dict.fromkeys(out))


def jwt(config: j.JwtConfig, walk: Walk, now: float | None) -> FilterStep:
    head = walk.head
    detail: dict[str, Any] = {"filter": "jwt_authn"}
    if config.bypass_cors_preflight and jwt_authn._cors_preflight(head):
        detail["outcome"] = "pass"
        return FilterStep("jwt_authn: a CORS preflight passes untouched", detail)
    rule = next((x for x in config.rules if head.target.startswith(x.prefix)), None)
    if rule is None:
        detail["outcome"] = "pass"
        return FilterStep(f"jwt_authn: no rule takes {head.target!r}: nothing verified", detail)
    providers = _providers_of(rule.requires, config)
    where = _locations(providers)
    found = len(jwt_authn.extract(providers, _copy(head)))
    requirement = _requirement(rule.requires, config)
    if requirement.startswith("(") and requirement.endswith(")"):
        requirement = requirement[1:-1]
    detail.update(
        rule=rule.prefix,
        requirement=requirement,
        providers=[
            {"name": p.name, "issuer": p.issuer, "audiences": list(p.audiences)} for p in providers
        ],
        locations=where,
        tokens=found,
    )
    text = (
        f"jwt_authn: rule prefix {rule.prefix!r} requires {detail['requirement']}; "
        f"tokens looked for in {', '.join(where) or 'nowhere'}; "
        + (f"{found} found" if found else "none found")
    )
    edited = _copy(head)
    reply, metadata = jwt_authn.jwt_denial(config, edited, now=now)
    if reply is not None:
        detail["outcome"] = "refuse"
        final = _reply(reply, "jwt_authn")
        return FilterStep(
            f"{text}: {reply.status} {reply.body.decode()!r} ({reply.details})", detail, final
        )
    detail["outcome"] = "pass"
    payloads = [
        metadata.get(jwt_authn.FILTER, {}).get(p.payload_in_metadata)
        for p in providers
        if p.payload_in_metadata
    ]
    payload = next((x for x in payloads if isinstance(x, dict)), None)
    walk.head, walk.metadata = edited, metadata
    if payload is not None:
        principal = f"{payload.get('iss', '')}/{payload.get('sub', '')}"
        detail["principal"] = principal
        detail["claims"] = metadata[jwt_authn.FILTER]
        claims = json.dumps(payload)
        text += f": valid, request principal {principal}; RBAC sees the claims {claims}"
    elif found:
        text += ": passes (the requirement is met)"
    else:
        text += ": passes (a missing token is allowed)"
    removed = sorted({k for k, _ in head.headers} - {k for k, _ in edited.headers})
    if removed or edited.target != head.target:
        detail["removed"] = removed + (["query token"] if edited.target != head.target else [])
        text += f"; the token is removed ({', '.join(detail['removed'])})"
    added = [k for k, _ in edited.headers if k not in {n for n, _ in head.headers}]
    if added:
        detail["added_headers"] = added
        text += f"; headers added: {', '.join(added)}"
    return FilterStep(text, detail)


def _copy(head: RequestHead) -> RequestHead:
    return RequestHead(
        method=head.method,
        target=head.target,
        authority=head.authority,
        scheme=head.scheme,
        version=head.version,
        headers=list(head.headers),
    )


# ------------------------------------------------------------------ the walks


def before_route(
    manager: HttpManager,
    routes: RouteConfig,
    head: RequestHead,
    conn: authz.Connection,
    now: float | None,
) -> Walk:
    """filters.before_route, explained: rate limit when first, JWT, RBAC; stops at a refusal."""
    walk = Walk(head)
    if manager.ratelimit is not None and manager.ratelimit_first:
        early = select_route(routes, filters.request_view(head))
        walk.steps.append(ratelimit(manager, early, "first"))
    if manager.jwt is not None:
        walk.steps.append(jwt(manager.jwt, walk, now))
        if walk.verdict is not None:
            return walk
    if manager.rbac:
        forwarded = walk.head.get_all("x-forwarded-for")
        attrs = authz.Attributes(
            conn,
            filters.request_view(walk.head),
            forwarded_for=",".join(forwarded) if forwarded else None,
            metadata=walk.metadata,
        )
        walk.steps += _rbac(manager.rbac, attrs, "rbac")
    return walk


def after_route(manager: HttpManager, route: Route) -> list[FilterStep]:
    """The fault filter (when the route has a fault) and the rate limit when last."""
    out = []
    fault = route.fault
    if manager.fault_filter and fault is not None:
        parts: list[str] = []
        detail: dict[str, Any] = {"filter": "fault", "outcome": "pass"}
        unless: dict[str, Any] | None = None
        final: dict[str, Any] | None = None
        if fault.delay_s is not None and fault.delay_ppm > 0:
            parts.append(f"delay {fault.delay_s:g}s for {_percent(fault.delay_ppm)}")
            detail["delay"] = {"seconds": fault.delay_s, "percent": fault.delay_ppm / 1e4}
        code = fault.abort_grpc_status if fault.abort_grpc_status is not None else None
        if fault.abort_ppm > 0 and (code is not None or fault.abort_status is not None):
            what = f"grpc-status {code}" if code is not None else f"{fault.abort_status}"
            parts.append(f"abort {what} for {_percent(fault.abort_ppm)}")
            detail["abort"] = {
                "status": fault.abort_status,
                "grpc_status": fault.abort_grpc_status,
                "percent": fault.abort_ppm / 1e4,
            }
            answer: dict[str, Any] = {"kind": "local", "by": "fault", "flag": "FI"}
            if code is not None:
                answer.update(status=200, grpc_status=code)
            else:
                answer.update(status=fault.abort_status, body="fault filter abort")
            if fault.abort_ppm >= MILLION:
                final, detail["outcome"] = answer, "refuse"
            else:
                unless = {**answer, "percent": fault.abort_ppm / 1e4}
                detail["outcome"] = "may refuse"
        text = "fault: " + ("; ".join(parts) or "nothing injected")
        if final is not None:
            text += ": every request is aborted"
        out.append(FilterStep(text, detail, final, unless))
        if final is not None:
            return out
    if manager.ratelimit is not None and not manager.ratelimit_first:
        out.append(ratelimit(manager, route, "last, before the router"))
    return out


def view_after(walk: Walk) -> RequestView:
    """What route selection sees after the filters (the JWT filter may edit the request)."""
    return filters.request_view(walk.head)
