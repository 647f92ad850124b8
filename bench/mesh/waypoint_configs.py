"""The waypoint bench's configurations: what is applied to the waypoint, and its token.

Each configuration is a list of objects ``meshlab apply -f`` takes, all bound
by ``targetRefs`` to the waypoint Gateway ``waypoint`` (ours; Envoy gets the
resources meshd sent ours, :mod:`bench.mesh.waypoint_lab`):

* ``plain``: nothing (the routes meshd makes for the Service);
* ``security``: an AuthorizationPolicy ALLOW from the client pod's principal
  to GET ``/*``; a RequestAuthentication whose inline JWKS holds an RSA key
  made at bench start (:class:`JwtIssuer`); an AuthorizationPolicy that
  refuses a request without a request principal (DENY ``notRequestPrincipals:
  ["*"]``, Istio's recipe: ALLOW policies are ORed, so an ALLOW
  ``requestPrincipals: ["*"]`` next to the principal's ALLOW would refuse
  nothing); Istio's local rate limit EnvoyFilter recipe
  (examples/waypoint-ratelimit.yaml) with a bucket too large to run dry
  (10,000,000 tokens a second), so the filter's cost is measured, not its
  refusals. Requests carry ``Authorization: Bearer <token>``;
* ``tracing100`` / ``tracing1``: MeshConfig (the ``istio`` ConfigMap of
  ``istio-system``) with an OpenTelemetry provider naming the Service
  ``otel-collector.telemetry`` (an OTLP/gRPC receiver,
  :mod:`bench.mesh.otlp_sink`, in the pod ``telemetry/collector``) and a
  Telemetry sampling 100 % (the worst case) or 1 % (Istio's default).

``expected`` says what the waypoint's ``/config_dump`` must show before a
configuration is measured (and must no longer show after it is removed).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

# The order they run in by default: tracing1 before tracing100, whose buffers our
# waypoint's heap keeps (its peak RSS is measured from where the one before left it).
CONFIGS = ("plain", "security", "tracing1", "tracing100")
NAMESPACE = "server"
WAYPOINT = "waypoint"
ISSUER = "https://bench.example/issuer"
SUBJECT = "wrk"
COLLECTOR_NS, COLLECTOR_POD, COLLECTOR_SERVICE = "telemetry", "collector", "otel-collector"
COLLECTOR_PORT = 4317
PROVIDER = "otel-bench"
BUCKET = 10_000_000
TARGET_REFS = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": WAYPOINT}]
Obj = dict[str, Any]


def _b64url(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class JwtIssuer:
    """An RSA key made now: its JWKS (for the RequestAuthentication) and a token it signed."""

    kid: str = "bench"
    jwks: str = field(init=False)
    token: str = field(init=False)

    def __post_init__(self) -> None:
        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = key.public_key().public_numbers()
        jwk = {
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": self.kid,
            "n": _b64url(public.n),
            "e": _b64url(public.e),
        }
        self.jwks = json.dumps({"keys": [jwk]})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": SUBJECT, "iat": now, "exp": now + 86400}
        self.token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": self.kid})

    @property
    def header(self) -> str:
        return f"Authorization: Bearer {self.token}"


def _meta(name: str, namespace: str = NAMESPACE) -> Obj:
    return {"name": name, "namespace": namespace}


def security_objects(client_principal: str, issuer: JwtIssuer) -> list[Obj]:
    """``client_principal``: the client pod's, ``cluster.local/ns/NS/sa/SA``."""
    return [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": _meta("bench-allow-client"),
            "spec": {
                "targetRefs": TARGET_REFS,
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [{"source": {"principals": [client_principal]}}],
                        "to": [{"operation": {"methods": ["GET"], "paths": ["/*"]}}],
                    }
                ],
            },
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": _meta("bench-jwt"),
            "spec": {
                "targetRefs": TARGET_REFS,
                "jwtRules": [{"issuer": ISSUER, "jwks": issuer.jwks}],
            },
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": _meta("bench-require-jwt"),
            "spec": {
                "targetRefs": TARGET_REFS,
                "action": "DENY",
                "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1alpha3",
            "kind": "EnvoyFilter",
            "metadata": _meta("bench-local-ratelimit"),
            "spec": {
                "targetRefs": TARGET_REFS,
                "configPatches": [
                    {
                        "applyTo": "HTTP_FILTER",
                        "match": {
                            "context": "SIDECAR_INBOUND",
                            "listener": {
                                "filterChain": {
                                    "filter": {
                                        "name": "envoy.filters.network.http_connection_manager"
                                    }
                                }
                            },
                        },
                        "patch": {
                            "operation": "INSERT_BEFORE",
                            "value": {
                                "name": "envoy.filters.http.local_ratelimit",
                                "typed_config": _local_ratelimit(),
                            },
                        },
                    }
                ],
            },
        },
    ]


def _local_ratelimit() -> Obj:
    enabled = {"numerator": 100, "denominator": "HUNDRED"}
    return {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/"
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "value": {
            "stat_prefix": "http_local_rate_limiter",
            "token_bucket": {
                "max_tokens": BUCKET,
                "tokens_per_fill": BUCKET,
                "fill_interval": "1s",
            },
            "filter_enabled": {"runtime_key": "local_rate_limit_enabled", "default_value": enabled},
            "filter_enforced": {
                "runtime_key": "local_rate_limit_enforced",
                "default_value": enabled,
            },
            "response_headers_to_add": [
                {"append": False, "header": {"key": "x-local-rate-limit", "value": "true"}}
            ],
        },
    }


def tracing_objects(sampling: float) -> list[Obj]:
    mesh = (
        "extensionProviders:\n"
        f"- name: {PROVIDER}\n"
        "  opentelemetry:\n"
        f"    service: {COLLECTOR_SERVICE}.{COLLECTOR_NS}.svc.cluster.local\n"
        f"    port: {COLLECTOR_PORT}\n"
    )
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(COLLECTOR_SERVICE, COLLECTOR_NS),
            "spec": {
                "selector": {"app": COLLECTOR_POD},
                "ports": [
                    {"name": "grpc-otlp", "port": COLLECTOR_PORT, "targetPort": COLLECTOR_PORT}
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta("istio", "istio-system"),
            "data": {"mesh": mesh},
        },
        {
            "apiVersion": "telemetry.istio.io/v1",
            "kind": "Telemetry",
            "metadata": _meta("bench-tracing"),
            "spec": {
                "targetRefs": TARGET_REFS,
                "tracing": [
                    {"providers": [{"name": PROVIDER}], "randomSamplingPercentage": sampling}
                ],
            },
        },
    ]


def sampling_of(config: str) -> float | None:
    """The sampling percentage of a tracing configuration (None: not one)."""
    return float(config.removeprefix("tracing")) if config.startswith("tracing") else None


def objects(config: str, client_principal: str, issuer: JwtIssuer) -> list[Obj]:
    if config == "plain":
        return []
    if config == "security":
        return security_objects(client_principal, issuer)
    sampling = sampling_of(config)
    if sampling is None:
        raise ValueError(f"no configuration {config!r} (known: {', '.join(CONFIGS)})")
    return tracing_objects(sampling)


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def applied(dump: Obj, config: str, collector: str | None = None) -> str | None:
    """Whether the waypoint's config dump shows ``config`` (None), else what it lacks.

    ``collector``: for a tracing configuration, the receiver's ``ip:port``."""
    text = json.dumps(dump)
    if config == "security":
        for needle in (
            "envoy.filters.http.jwt_authn",
            "envoy.filters.http.rbac",
            "envoy.filters.http.local_ratelimit",
            "bench-allow-client",
            "bench-require-jwt",
        ):
            if needle not in text:
                return f"no {needle} in the waypoint's config yet"
        return None
    sampling = sampling_of(config)
    if sampling is None:  # plain: nothing of the others left
        for needle in ("envoy.filters.http.jwt_authn", "local_ratelimit", "opentelemetry"):
            if needle in text:
                return f"{needle} still in the waypoint's config"
        return None
    tracings = [d["tracing"] for d in _walk(dump) if isinstance(d.get("tracing"), dict)]
    if not tracings:
        return "no connection manager traces yet"
    for tracing in tracings:
        got = (tracing.get("random_sampling") or {}).get("value")
        if got is None or abs(float(got) - sampling) > 1e-9:
            return f"random_sampling {got}, not {sampling:g}"
        if collector and collector not in json.dumps(tracing):
            return f"the tracing provider does not name the collector {collector} yet"
    return None


__all__ = ["CONFIGS", "JwtIssuer", "applied", "objects", "sampling_of"]
