"""Our Istio CRDs: current with their generator, structural, and right about Istio's objects.

The schemas (``deploy/base/crds/``, written by ``generate.py`` beside them)
are checked for what the API server demands of a structural schema, then
used, through ``jsonschema``, to validate Istio objects the way the API server
would with ``kubectl apply --validate=strict``: unknown fields refused. The
objects are the mesh's own examples (every Istio kind in ``examples/``) and
samples of every kind and version written as Istio's documentation writes
them; malformed variants of them (a misspelt field, a bad enum, two members
of a ``oneof``, a bad duration, a missing required field) must be refused.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from tests.unit.deploy.render import DEPLOY, ROOT, Obj

CRD_DIR = DEPLOY / "base" / "crds"
ISTIO_GROUPS = ("security.istio.io", "networking.istio.io", "telemetry.istio.io")
SERVED = {
    "AuthorizationPolicy": ("v1", "v1beta1"),
    "RequestAuthentication": ("v1", "v1beta1"),
    "PeerAuthentication": ("v1", "v1beta1"),
    "DestinationRule": ("v1", "v1beta1", "v1alpha3"),
    "VirtualService": ("v1", "v1beta1", "v1alpha3"),
    "Telemetry": ("v1",),
    "EnvoyFilter": ("v1alpha3",),
}
# kubectl's client-side apply keeps the whole object in an annotation: 256 KiB at most.
LAST_APPLIED_LIMIT = 256 * 1024


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crd_generate", CRD_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def crds() -> dict[str, Obj]:
    """kind -> its CRD, as the files say (shared: read it, never change it)."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)
        out[crd["spec"]["names"]["kind"]] = crd
    return out


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def test_crd_files_are_what_the_generator_writes() -> None:
    generator = _generator()
    on_disk = {p.name for p in CRD_DIR.glob("*.yaml")}
    assert on_disk == set(generator.CRDS)
    for name, obj in generator.CRDS.items():
        assert (CRD_DIR / name).read_text(encoding="utf-8") == generator.render(obj), (
            f"{name} is stale: run python deploy/base/crds/generate.py"
        )
    kustomization = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    assert {f"crds/{n}" for n in on_disk} <= set(kustomization["resources"])


def test_each_kind_is_served_in_istios_versions_with_istios_storage_version() -> None:
    found = crds()
    assert set(found) == set(SERVED)
    for kind, crd in found.items():
        versions = crd["spec"]["versions"]
        assert tuple(v["name"] for v in versions) == SERVED[kind]
        assert all(v["served"] for v in versions)
        (storage,) = [v["name"] for v in versions if v["storage"]]
        group = crd["spec"]["group"]
        want = {"security.istio.io": "v1beta1", "networking.istio.io": "v1alpha3"}.get(group, "v1")
        assert storage == want, kind
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{group}"
        assert len(json.dumps(crd, separators=(",", ":"))) < LAST_APPLIED_LIMIT, kind


def _nodes(schema: Obj, path: str) -> Iterator[tuple[str, Obj]]:
    """Every schema node that describes a value (not the junctors' constraints)."""
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        yield from _nodes(schema["items"], f"{path}[]")


def _junctors(schema: Obj) -> Iterator[Obj]:
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            yield sub
            yield from _junctors(sub)
    if "not" in schema:
        yield schema["not"]
        yield from _junctors(schema["not"])


FREE_FORM_PATHS = {".status", ".spec.configPatches[].patch.value"}


def test_schemas_are_structural_and_free_form_only_where_istio_is() -> None:
    for kind, crd in crds().items():
        for version in crd["spec"]["versions"]:
            root = version["schema"]["openAPIV3Schema"]
            free = set()
            for path, node in _nodes(root, ""):
                where = f"{kind} {version['name']}{path or ' (root)'}"
                assert "type" in node, f"{where}: no type"
                if node.get("x-kubernetes-preserve-unknown-fields"):
                    free.add(path)
                elif node["type"] == "object":
                    assert "properties" in node or "additionalProperties" in node, where
                    assert not ("properties" in node and "additionalProperties" in node), where
                if node["type"] == "array":
                    assert "items" in node, where
                for sub in _junctors(node):
                    # Junctors may only constrain; fields they name must exist outside them.
                    assert set(sub) <= {"required", "not", "anyOf", "oneOf", "allOf"}, where
                    for field in sub.get("required") or ():
                        assert field in node["properties"], f"{where}: {field}"
            assert free == FREE_FORM_PATHS & {p for p, _ in _nodes(root, "")}, kind


def _strict(schema: Any) -> Any:
    """The OpenAPI schema as a JSON schema that refuses unknown fields, as the API
    server does when asked to validate strictly."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator(kind: str, version: str) -> jsonschema.Draft7Validator | None:
    crd = crds()[kind]
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in served:
        return None
    schema = _strict(served[version]["schema"]["openAPIV3Schema"])
    schema["properties"].update(
        apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"}
    )
    return jsonschema.Draft7Validator(schema)


def errors(obj: Obj) -> list[str]:
    """What the API server would refuse in ``obj`` (an Istio object), as lines."""
    group, _, version = obj["apiVersion"].partition("/")
    assert group == crds()[obj["kind"]]["spec"]["group"], obj["apiVersion"]
    validator = _validator(obj["kind"], version)
    if validator is None:
        return [f"{obj['kind']} is not served in {version}"]
    return sorted(
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in validator.iter_errors(obj)
    )


def _istio_objects(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return [d for d in docs if str(d.get("apiVersion", "")).split("/")[0] in ISTIO_GROUPS]


def test_the_examples_istio_objects_are_valid() -> None:
    examples = [
        (p, o) for p in sorted((ROOT / "examples").glob("*.yaml")) for o in _istio_objects(p)
    ]
    assert examples, "examples/ holds no Istio object"
    for path, obj in examples:
        assert errors(obj) == [], f"{path.name}: {obj['kind']} {obj['metadata']['name']}"


SAMPLES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep"], notIpBlocks: [203.0.113.4]}
    - source: {namespaces: [test], serviceAccounts: [test/sleep]}
    to:
    - operation: {methods: [GET], paths: ["/info*"], ports: ["8080"]}
    when:
    - {key: "request.auth.claims[iss]", values: ["https://accounts.google.com"]}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: istio-system}
spec:
  selector: {matchLabels: {app: istio-ingressgateway}}
  action: CUSTOM
  provider: {name: my-custom-authz}
  rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt-example, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  jwtRules:
  - issuer: issuer-foo
    jwksUri: https://example.com/.well-known/jwks.json
    fromHeaders: [{name: x-jwt-assertion, prefix: "Bearer "}]
    fromParams: [my_token]
    outputClaimToHeaders: [{header: x-jwt-claim-foo, claim: foo}]
    forwardOriginalToken: true
    timeout: 5s
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: finance, namespace: foo}
spec:
  selector: {matchLabels: {app: finance}}
  mtls: {mode: STRICT}
  portLevelMtls:
    "8080": {mode: DISABLE}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpCookie: {name: user, ttl: 0s}, ringHash: {minimumRingSize: 1024}}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 30ms, tcpKeepalive: {time: 7200s, interval: 75s}}
      http: {http1MaxPendingRequests: 1, h2UpgradePolicy: UPGRADE, idleTimeout: 1m30s}
    outlierDetection: {consecutive5xxErrors: 7, interval: 5m, baseEjectionTime: 15m}
    portLevelSettings:
    - port: {number: 80}
      loadBalancer: {simple: LEAST_REQUEST}
      tls: {mode: ISTIO_MUTUAL}
    retryBudget: {percent: 20, minRetryConcurrency: 3}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  exportTo: ["."]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: tunnel, namespace: shop}
spec:
  host: mysql.example.com
  trafficPolicy:
    tunnel: {protocol: CONNECT, targetHost: mysql.example.com, targetPort: 3306}
    loadBalancer:
      localityLbSetting:
        enabled: true
        distribute: [{from: us-west/zone1/*, to: {"us-west/zone1/*": 80, "us-west/zone2/*": 20}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: to-v2
    match:
    - headers: {end-user: {exact: jason}}
      uri: {prefix: /api}
      queryParams: {debug: {regex: "^1$"}}
      withoutHeaders: {x-skip: {exact: "1"}}
      ignoreUriCase: true
    route:
    - destination: {host: reviews, subset: v2, port: {number: 9080}}
      weight: 90
      headers: {request: {set: {x-who: jason}}, response: {remove: [x-internal]}}
    - {destination: {host: reviews, subset: v1}, weight: 10}
    timeout: 10s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "gateway-error,connect-failure"}
    fault: {abort: {httpStatus: 418, percentage: {value: 0.1}}}
    mirrors: [{destination: {host: reviews, subset: v3}, percentage: {value: 50}}]
    corsPolicy: {allowOrigins: [{exact: "https://example.com"}], maxAge: 24h}
  - name: moved
    redirect:
      {uri: /new, authority: elsewhere.example, derivePort: FROM_REQUEST_PORT, redirectCode: 307}
  - name: teapot
    directResponse: {status: 418, body: {string: short and stout}}
  - name: slow
    fault: {delay: {fixedDelay: 0.3s, percentage: {value: 100}}}
    rewrite: {uriRegexRewrite: {match: "^/items/([0-9]+)$", rewrite: "/item?id=\\\\1"}}
    route: [{destination: {host: reviews}}]
  tcp:
  - match: [{port: 27017, sourceLabels: {app: mongo-client}}]
    route: [{destination: {host: mongo.backup.svc.cluster.local, port: {number: 5555}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: tls-routing, namespace: shop}
spec:
  hosts: ["*.bookinfo.com"]
  gateways: [mygateway]
  tls:
  - match: [{port: 443, sniHosts: [login.bookinfo.com]}]
    route: [{destination: {host: login.prod.svc.cluster.local}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: local-rate-limit, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_INBOUND
      listener: {filterChain: {filter: {name: envoy.filters.network.http_connection_manager}}}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: "type.googleapis.com/envoy.extensions.filters.http.\\
            local_ratelimit.v3.LocalRateLimit"
          value:
            stat_prefix: http_local_rate_limiter
            token_bucket: {max_tokens: 4, tokens_per_fill: 4, fill_interval: 60s}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 10.5
    customTags:
      cluster: {literal: {value: east}}
      user: {header: {name: x-user, defaultValue: unknown}}
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_COUNT, mode: CLIENT}
      tagOverrides: {request_host: {operation: REMOVE}}
    - match: {customMetric: my_metric}
      disabled: true
  accessLogging:
  - providers: [{name: envoy}]
    filter: {expression: "response.code >= 400"}
"""


def _samples() -> list[Obj]:
    return [d for d in yaml.safe_load_all(SAMPLES) if d]


def test_samples_of_every_kind_and_version_are_valid() -> None:
    samples = _samples()
    assert {s["kind"] for s in samples} == set(crds())
    for sample in samples:
        assert errors(sample) == [], f"{sample['kind']} {sample['metadata']['name']}"
    # The same objects under every other version each kind is served in.
    for sample in samples:
        for version in SERVED[sample["kind"]]:
            group = sample["apiVersion"].split("/")[0]
            assert errors({**sample, "apiVersion": f"{group}/{version}"}) == []


def _sample(kind: str, name: str) -> Obj:
    (found,) = [s for s in _samples() if s["kind"] == kind and s["metadata"]["name"] == name]
    return found


def _set(obj: Obj, path: str, value: Any) -> Obj:
    """A copy of ``obj`` with the dotted ``path`` (list indexes as numbers) set."""
    out = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node: Any = out
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return out


MALFORMED = [
    # (kind, sample, path, value, what the refusal says)
    ("VirtualService", "reviews", "spec.http.0.timout", "1s", "'timout' was unexpected"),
    ("VirtualService", "reviews", "spec.http.0.timeout", "10 seconds", "does not match"),
    (
        "VirtualService",
        "reviews",
        "spec.http.0.match.0.uri",
        {"exact": "/a", "prefix": "/"},
        "valid under each of",
    ),
    ("VirtualService", "reviews", "spec.http.0.route.0.destination.port.number", 70000, "maximum"),
    ("VirtualService", "reviews", "spec.http.0.route.0.destination", {"subset": "v1"}, "'host'"),
    ("VirtualService", "reviews", "spec.hosts", "reviews", "is not of type 'array'"),
    ("VirtualService", "tls-routing", "spec.tls.0.match.0", {"port": 443}, "'sniHosts'"),
    (
        "DestinationRule",
        "reviews",
        "spec.trafficPolicy.loadBalancer.simple",
        "FASTEST",
        "is not one of",
    ),
    (
        "DestinationRule",
        "reviews",
        "spec.trafficPolicy.loadBalancer.simple",
        "ROUND_ROBIN",  # beside consistentHash: a oneof of the two
        "valid under each of",
    ),
    ("DestinationRule", "reviews", "spec.subsets.0", {"labels": {"version": "v1"}}, "'name'"),
    ("AuthorizationPolicy", "httpbin", "spec.action", "PERMIT", "is not one of"),
    ("AuthorizationPolicy", "httpbin", "spec.rules.0.when.0", {"values": ["x"]}, "'key'"),
    ("AuthorizationPolicy", "httpbin", "spec.rules.0.from.0.source.principal", ["x"], "unexpected"),
    ("AuthorizationPolicy", "httpbin", "spec.targetRefs.0", {"name": "waypoint"}, "'kind'"),
    ("PeerAuthentication", "finance", "spec.mtls.mode", "ON", "is not one of"),
    ("RequestAuthentication", "jwt-example", "spec.jwtRules.0.fromHeaders.0", {}, "'name'"),
    (
        "Telemetry",
        "mesh-default",
        "spec.metrics.0.overrides.0.match.metric",
        "ALL",
        "is not one of",
    ),
    ("EnvoyFilter", "local-rate-limit", "spec.configPatches.0.applyTo", "FILTER", "is not one of"),
]


@pytest.mark.parametrize(("kind", "name", "path", "value", "says"), MALFORMED)
def test_malformed_objects_are_refused(
    kind: str, name: str, path: str, value: Any, says: str
) -> None:
    found = errors(_set(_sample(kind, name), path, value))
    assert any(says in line for line in found), found


def test_free_form_fields_take_anything_and_metadata_is_not_ours_to_check() -> None:
    envoy_filter = _sample("EnvoyFilter", "local-rate-limit")
    odd = _set(envoy_filter, "spec.configPatches.0.patch.value", {"anything": [1, {"at": "all"}]})
    assert errors(odd) == []
    assert errors({**_sample("PeerAuthentication", "finance"), "status": {"conditions": []}}) == []
    assert errors({**envoy_filter, "apiVersion": "networking.istio.io/v1"}) == [
        "EnvoyFilter is not served in v1"
    ]
