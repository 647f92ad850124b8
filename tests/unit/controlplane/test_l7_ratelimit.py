"""EnvoyFilters bound to a waypoint by targetRefs: Istio's local rate limit recipe only."""
# ruff: noqa: E501 (the recipe's YAML is kept verbatim, its type_url lines included)

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as lrl_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from controlplane.l7 import envoy
from controlplane.l7.build import build
from controlplane.sources.kube_convert import KINDS, L7_KINDS
from meshlab.apply import kind_of, read_documents
from tests.support.l7world import world

REVIEWS = "reviews.shop.svc.cluster.local:9080"
LRL = "envoy.filters.http.local_ratelimit"
GATEWAY = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]"

# Istio's "Local rate limit" recipe (istio.io content/en/docs/tasks/policy-enforcement/
# rate-limit/index.md), verbatim but for workloadSelector -> targetRefs (the waypoint's).
RECIPE_PATCHES = """\
configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_INBOUND
      listener:
        filterChain:
          filter:
            name: "envoy.filters.network.http_connection_manager"
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value:
            stat_prefix: http_local_rate_limiter
            token_bucket:
              max_tokens: 4
              tokens_per_fill: 4
              fill_interval: 60s
            filter_enabled:
              runtime_key: local_rate_limit_enabled
              default_value:
                numerator: 100
                denominator: HUNDRED
            filter_enforced:
              runtime_key: local_rate_limit_enforced
              default_value:
                numerator: 100
                denominator: HUNDRED
            response_headers_to_add:
              - append: false
                header:
                  key: x-local-rate-limit
                  value: 'true'
"""

# The recipe's second form: the filter without a bucket, the bucket on the routes.
RECIPE_PER_ROUTE = """\
configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_INBOUND
      listener:
        filterChain:
          filter:
            name: "envoy.filters.network.http_connection_manager"
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value:
            stat_prefix: http_local_rate_limiter
  - applyTo: HTTP_ROUTE
    match:
      context: SIDECAR_INBOUND
      routeConfiguration:
        vhost:
          name: "inbound|http|9080"
          route:
            action: ANY
    patch:
      operation: MERGE
      value:
        typed_per_filter_config:
          envoy.filters.http.local_ratelimit:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
              token_bucket:
                max_tokens: 4
                tokens_per_fill: 4
                fill_interval: 60s
              filter_enabled:
                runtime_key: local_rate_limit_enabled
                default_value:
                  numerator: 100
                  denominator: HUNDRED
              filter_enforced:
                runtime_key: local_rate_limit_enforced
                default_value:
                  numerator: 100
                  denominator: HUNDRED
              response_headers_to_add:
                - append: false
                  header:
                    key: x-local-rate-limit
                    value: 'true'
"""

RECIPE_CONFIG = {
    "stat_prefix": "http_local_rate_limiter",
    "token_bucket": {"max_tokens": 4, "tokens_per_fill": 4, "fill_interval": "60s"},
    "filter_enabled": {
        "runtime_key": "local_rate_limit_enabled",
        "default_value": {"numerator": 100},
    },
    "filter_enforced": {
        "runtime_key": "local_rate_limit_enforced",
        "default_value": {"numerator": 100},
    },
    "response_headers_to_add": [
        {"append": False, "header": {"key": "x-local-rate-limit", "value": "true"}}
    ],
}


def envoy_filter(
    patches: str, targets: str = GATEWAY, name: str = "ratelimit", created: str = ""
) -> str:
    stamp = f", creationTimestamp: '{created}'" if created else ""
    return textwrap.dedent(
        f"""
        apiVersion: networking.istio.io/v1alpha3
        kind: EnvoyFilter
        metadata: {{name: {name}, namespace: shop, generation: 2{stamp}}}
        spec:
          {targets}
        """
    ) + textwrap.indent(patches, "  ")


def translated(*docs: str) -> envoy.EnvoyResources:
    return envoy.translate(build(world("---\n".join(docs))).shares["shop/waypoint"])


def hcm_of(*docs: str) -> hcm_pb2.HttpConnectionManager:
    chains = {c.name: c for c in translated(*docs).listeners["waypoint"].filter_chains}
    (f,) = chains[REVIEWS].filters
    hcm = hcm_pb2.HttpConnectionManager()
    f.typed_config.Unpack(hcm)
    return hcm


def as_dict(packed: Any) -> dict[str, Any]:
    msg = lrl_pb2.LocalRateLimit()
    assert packed.Unpack(msg)
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def statuses(*docs: str) -> dict[str, tuple[bool, str, str]]:
    out = {}
    for s in build(world("---\n".join(docs))).statuses:
        if s.kind == "EnvoyFilter":
            (c,) = s.conditions
            assert c.type == "WaypointAccepted"
            assert s.generation == 2
            out[f"{s.namespace}/{s.name}"] = (c.status, c.reason, c.message)
    return out


def test_the_recipe_unchanged_puts_the_filter_first_as_istiod_does() -> None:
    """INSERT_BEFORE with no subFilter: istiod adds the filter at the beginning
    (listener_patch.go patchHTTPFilters), ahead of RBAC, fault and the router."""
    doc = envoy_filter(RECIPE_PATCHES)
    filters = hcm_of(doc).http_filters
    assert [f.name for f in filters] == [
        LRL,
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]
    assert filters[0].typed_config.type_url.endswith("local_ratelimit.v3.LocalRateLimit")
    assert as_dict(filters[0].typed_config) == RECIPE_CONFIG
    assert statuses(doc) == {
        "shop/ratelimit": (True, "Accepted", "local rate limit bound to waypoint shop/waypoint")
    }


def test_the_direct_type_form_is_the_same() -> None:
    direct = RECIPE_PATCHES.replace(
        '"@type": type.googleapis.com/udpa.type.v1.TypedStruct\n'
        "          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit"
        ".v3.LocalRateLimit\n"
        "          value:\n",
        '"@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit'
        ".v3.LocalRateLimit\n",
    )
    lines = direct.splitlines()
    at = next(i for i, line in enumerate(lines) if "stat_prefix" in line)
    lines[at:] = [line[2:] for line in lines[at:]]  # the value's fields one level up
    direct = "\n".join(lines) + "\n"
    assert "TypedStruct" not in direct
    (f, *_) = hcm_of(envoy_filter(direct)).http_filters
    assert f.name == LRL
    assert as_dict(f.typed_config) == RECIPE_CONFIG


def test_insert_before_the_router_puts_it_after_fault_and_insert_first_first() -> None:
    before_router = RECIPE_PATCHES.replace(
        '            name: "envoy.filters.network.http_connection_manager"\n',
        '            name: "envoy.filters.network.http_connection_manager"\n'
        "            subFilter: {name: envoy.filters.http.router}\n",
    )
    names = [f.name for f in hcm_of(envoy_filter(before_router)).http_filters]
    assert names == ["envoy.filters.http.fault", LRL, "envoy.filters.http.router"]
    first = RECIPE_PATCHES.replace("INSERT_BEFORE", "INSERT_FIRST")
    assert hcm_of(envoy_filter(first)).http_filters[0].name == LRL


def test_the_per_route_form_puts_the_bucket_on_the_routes() -> None:
    res = translated(envoy_filter(RECIPE_PER_ROUTE))
    filters = hcm_of(envoy_filter(RECIPE_PER_ROUTE)).http_filters
    assert filters[0].name == LRL
    assert as_dict(filters[0].typed_config) == {"stat_prefix": "http_local_rate_limiter"}
    rc = res.routes["inbound-vip|9080|http|reviews.shop.svc.cluster.local"]
    (vh,) = rc.virtual_hosts
    assert vh.name == "inbound|http|9080"
    assert vh.routes
    for route in vh.routes:
        assert as_dict(route.typed_per_filter_config[LRL]) == RECIPE_CONFIG
    other = RECIPE_PER_ROUTE.replace('"inbound|http|9080"', '"inbound|http|8080"')
    rc = translated(envoy_filter(other)).routes[
        "inbound-vip|9080|http|reviews.shop.svc.cluster.local"
    ]
    assert all(LRL not in r.typed_per_filter_config for r in rc.virtual_hosts[0].routes)


def test_a_service_target_binds_only_that_service() -> None:
    doc = envoy_filter(RECIPE_PATCHES, targets="targetRefs: [{kind: Service, name: reviews}]")
    assert hcm_of(doc).http_filters[0].name == LRL
    doc = envoy_filter(RECIPE_PATCHES, targets="targetRefs: [{kind: Service, name: nothing}]")
    assert hcm_of(doc).http_filters[0].name != LRL
    ((ok, reason, _),) = statuses(doc).values()
    assert (ok, reason) == (False, "TargetNotFound")


def test_the_oldest_of_two_inserting_wins_and_the_other_says_so() -> None:
    old = envoy_filter(RECIPE_PATCHES, name="a", created="2024-01-01T00:00:00Z")
    new = envoy_filter(
        RECIPE_PATCHES.replace("max_tokens: 4", "max_tokens: 9"),
        name="b",
        created="2025-01-01T00:00:00Z",
    )
    filters = hcm_of(new, old).http_filters
    assert [f.name for f in filters].count(LRL) == 1
    assert as_dict(filters[0].typed_config)["token_bucket"]["max_tokens"] == 4
    s = statuses(old, new)
    assert s["shop/a"][:2] == (True, "Accepted")
    assert s["shop/b"][:2] == (False, "Conflicted")


REFUSED = [
    ("applyTo: HTTP_FILTER", "applyTo: LISTENER", "applyTo"),
    ("operation: INSERT_BEFORE", "operation: ADD", "operation"),
    ("operation: INSERT_BEFORE", "operation: REPLACE", "operation"),
    ("context: SIDECAR_INBOUND", "context: GATEWAY", "context"),
    ("name: envoy.filters.http.local_ratelimit", "name: envoy.filters.http.lua", "value.name"),
    (
        '"envoy.filters.network.http_connection_manager"',
        "envoy.filters.network.tcp_proxy",
        "filter.name",
    ),
    ("stat_prefix: http_local_rate_limiter", "stat_prefix: x\n            stage: 1", "stage"),
    ("fill_interval: 60s", "fill_interval: 0.01s", "fill_interval"),
    ("udpa.type.v1.TypedStruct", "google.protobuf.Struct", "@type"),
    ("max_tokens: 4", "max_tokens: many", "value"),
]


@pytest.mark.parametrize(("old", "new", "field"), REFUSED)
def test_every_other_patch_is_refused_with_a_status_never_ignored(
    old: str, new: str, field: str
) -> None:
    assert old in RECIPE_PATCHES
    doc = envoy_filter(RECIPE_PATCHES.replace(old, new))
    assert all(f.name != LRL for f in hcm_of(doc).http_filters)
    ((ok, reason, message),) = statuses(doc).values()
    assert (ok, reason) == (False, "Invalid")
    assert field in message
    assert "only Istio's local rate limit recipe is supported" in message


def test_a_per_route_patch_without_a_bucket_and_other_route_patches_are_refused() -> None:
    no_bucket = RECIPE_PER_ROUTE.replace(
        "              token_bucket:\n"
        "                max_tokens: 4\n"
        "                tokens_per_fill: 4\n"
        "                fill_interval: 60s\n",
        "",
    )
    ((ok, reason, message),) = statuses(envoy_filter(no_bucket)).values()
    assert (ok, reason) == (False, "Invalid") and "token_bucket" in message
    retry = RECIPE_PER_ROUTE.replace(
        "        typed_per_filter_config:", "        route: {retry_policy: {}}\n        x:"
    )
    ((ok, reason, _),) = statuses(envoy_filter(retry)).values()
    assert (ok, reason) == (False, "Invalid")


def test_a_selector_bound_envoy_filter_is_not_the_waypoints() -> None:
    doc = envoy_filter(RECIPE_PATCHES, targets="workloadSelector: {labels: {app: reviews}}")
    assert statuses(doc) == {}
    assert all(f.name != LRL for f in hcm_of(doc).http_filters)


def test_sources_follow_envoy_filters() -> None:
    (kind,) = [k for k in KINDS if k.name == "envoyfilters"]
    assert kind.args == ("networking.istio.io", "v1alpha3", "envoyfilters")
    assert "envoyfilters" in L7_KINDS
    assert kind_of("envoyfilters") == kind_of("EnvoyFilter") == "EnvoyFilter"


def test_meshlab_apply_reads_the_recipe(tmp_path: Path) -> None:
    path = tmp_path / "ratelimit.yaml"
    path.write_text(envoy_filter(RECIPE_PATCHES))
    (doc,) = read_documents(path)
    assert doc.raw["kind"] == "EnvoyFilter"
    assert doc.raw["spec"]["configPatches"][0]["applyTo"] == "HTTP_FILTER"
