"""Envoy's local rate limit filter -> :class:`waypoint.config.model.LocalRateLimit`.

``envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit``, in the
shape of Istio's local rate limit recipe (an EnvoyFilter inserting the filter,
optionally with a per-route ``typed_per_filter_config``): ``stat_prefix``,
``status``, ``token_bucket``, ``filter_enabled``, ``filter_enforced`` (their
``default_value``: this waypoint has no runtime layer, so a ``runtime_key`` is
never overridden) and ``response_headers_to_add``. As Envoy: a filter-level
config may go without a token bucket (it then limits nothing), a per-route one
must have one; ``fill_interval`` is at least 50 ms; a ``status`` below 400 is 429;
``filter_enabled``/``filter_enforced`` left unset are 0% (the filter does
nothing). Refused, naming the field: descriptors and ``rate_limits``,
``stage``, per-connection and cluster-wide buckets, ``x-ratelimit-*`` headers,
``request_headers_to_add_when_not_enforced``, ``vh_rate_limits``,
``rate_limited_as_resource_exhausted``, ``always_consume_default_token_bucket``.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as lrl_pb2
from google.protobuf import any_pb2

from waypoint.config import model as m
from waypoint.config.checks import Unsupported, only, ppm, seconds, unpack

HTTP_LOCAL_RATELIMIT = "envoy.filters.http.local_ratelimit"

_FIELDS = {
    "stat_prefix",
    "status",
    "token_bucket",
    "filter_enabled",
    "filter_enforced",
    "response_headers_to_add",
}
_OPTION = base_pb2.HeaderValueOption
_APPEND = {
    _OPTION.APPEND_IF_EXISTS_OR_ADD: m.AppendAction.APPEND_IF_EXISTS_OR_ADD,
    _OPTION.ADD_IF_ABSENT: m.AppendAction.ADD_IF_ABSENT,
    _OPTION.OVERWRITE_IF_EXISTS_OR_ADD: m.AppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    _OPTION.OVERWRITE_IF_EXISTS: m.AppendAction.OVERWRITE_IF_EXISTS,
}


def http_filter(packed: any_pb2.Any, where: str) -> m.LocalRateLimit:
    """The filter's own config (used where a route has none of its own)."""
    return _config(unpack(packed, lrl_pb2.LocalRateLimit, where), where, per_route=False)


def per_route(packed: any_pb2.Any, where: str) -> m.LocalRateLimit:
    """A route's ``typed_per_filter_config``: it replaces the filter's config whole."""
    return _config(unpack(packed, lrl_pb2.LocalRateLimit, where), where, per_route=True)


def _fraction(f: base_pb2.RuntimeFractionalPercent, where: str) -> int:
    only(f, {"runtime_key", "default_value"}, where)
    return ppm(f.default_value)


def _config(c: lrl_pb2.LocalRateLimit, where: str, *, per_route: bool) -> m.LocalRateLimit:
    only(c, _FIELDS, where)
    if not c.stat_prefix:
        raise Unsupported(f"{where}.stat_prefix: is required")
    bucket: m.TokenBucket | None = None
    if c.HasField("token_bucket"):
        tw = f"{where}.token_bucket"
        tb = c.token_bucket
        only(tb, {"max_tokens", "tokens_per_fill", "fill_interval"}, tw)
        if tb.max_tokens < 1:
            raise Unsupported(f"{tw}.max_tokens: must be at least 1")
        interval = seconds(tb.fill_interval)
        if interval < 0.05:
            # Envoy: "local rate limit token bucket fill timer must be >= 50ms".
            raise Unsupported(f"{tw}.fill_interval: must be at least 50ms (Envoy's minimum)")
        per_fill = tb.tokens_per_fill.value if tb.HasField("tokens_per_fill") else 1
        if per_fill < 1:
            raise Unsupported(f"{tw}.tokens_per_fill: must be at least 1")
        bucket = m.TokenBucket(
            max_tokens=tb.max_tokens, tokens_per_fill=per_fill, fill_interval_s=interval
        )
    elif per_route:
        raise Unsupported(f"{where}.token_bucket: a per-route config must have a token bucket")
    status = c.status.code if c.HasField("status") else 429
    if status < 400:
        status = 429  # Envoy: a status below 400 is replaced by 429
    headers = []
    for i, o in enumerate(c.response_headers_to_add):
        ow = f"{where}.response_headers_to_add[{i}]"
        only(o, {"header", "append", "append_action"}, ow)
        only(o.header, {"key", "value"}, f"{ow}.header")
        if "%" in o.header.value:
            raise Unsupported(f"{ow}.header.value: header formatters (%...%) are not supported")
        if o.HasField("append"):
            # The deprecated bool (Istio's recipe says append: false) wins over append_action.
            action = (
                m.AppendAction.APPEND_IF_EXISTS_OR_ADD
                if o.append.value
                else m.AppendAction.OVERWRITE_IF_EXISTS_OR_ADD
            )
        else:
            action = _APPEND[o.append_action]
        headers.append((o.header.key.lower(), o.header.value, action))
    return m.LocalRateLimit(
        stat_prefix=c.stat_prefix,
        status=status,
        bucket=bucket,
        enabled_ppm=_fraction(c.filter_enabled, f"{where}.filter_enabled")
        if c.HasField("filter_enabled")
        else 0,
        enforced_ppm=_fraction(c.filter_enforced, f"{where}.filter_enforced")
        if c.HasField("filter_enforced")
        else 0,
        response_headers=m.HeaderMutation(add=tuple(headers)),
    )
