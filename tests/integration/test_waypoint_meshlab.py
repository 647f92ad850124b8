"""The waypoint on a meshlab cluster, as a user runs it (the steps of examples/bookstore.yaml).

client/sleep -> its ztunnel -> the waypoint pod of namespace shop -> the
destination ztunnel -> a reviews pod: every hop real (capture, HBONE, mTLS,
xDS, the CA). The route is the canary of examples/canary.yaml.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from mesh.cluster.model import CAPTURE_BACKENDS
from tests.integration.conftest import (
    MESHLAB,
    assert_nothing_left,
    mesh_args,
    meshlab,
    skip_unless_backend_runs,
    unique_name,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REVIEWS = "http://10.96.0.20:9080/"

# Run inside the client pod: N requests, one connection each, the versions that answered.
COUNT = """
import collections, json, sys, urllib.request, urllib.error
url, n, agent = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = collections.Counter()
for _ in range(n):
    req = urllib.request.Request(url, headers={"User-Agent": agent})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            seen[json.load(r).get("version") or r.status] += 1
    except urllib.error.HTTPError as e:
        seen[e.code] += 1
    except OSError as e:
        seen[type(e).__name__] += 1
print(json.dumps(seen))
"""


def count(name: str, n: int, agent: str = "python", url: str = REVIEWS) -> dict[str, int]:
    done = meshlab(
        "exec",
        "--name",
        name,
        "client/sleep",
        "--",
        "python3",
        "-c",
        COUNT,
        url,
        str(n),
        agent,
        timeout=300,
    )
    return dict(json.loads(done.stdout))


def get(name: str, kind: str, obj: str) -> dict[str, Any]:
    return dict(
        json.loads(meshlab("get", "--name", name, kind, obj, "-n", "shop", "-o", "json").stdout)
    )


def eventually(check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s}s: {check}")
        time.sleep(0.3)


@pytest.fixture(scope="module", params=CAPTURE_BACKENDS)
def books(request: pytest.FixtureRequest) -> Iterator[str]:
    """The bookstore with each capture backend: every hop to and from the waypoint is
    captured by the nodes' iptables rules, then by their eBPF programs."""
    with bookstore(request.param) as name:
        yield name


@contextlib.contextmanager
def bookstore(backend: str) -> Iterator[str]:
    """The bookstore cluster, its nodes capturing with ``backend``, the waypoint and the
    canary in force; down (and checked clean) afterwards."""
    skip_unless_backend_runs(backend)
    name = unique_name()
    try:
        meshlab(
            "up",
            "-f",
            str(EXAMPLES / "bookstore.yaml"),
            "--name",
            name,
            *mesh_args(),
            "--capture",
            backend,
        )
        for ns in ("shop", "client"):
            meshlab("label", "--name", name, "namespace", ns, "istio.io/dataplane-mode=ambient")
        meshlab("apply", "--name", name, "-f", str(EXAMPLES / "waypoint.yaml"))
        meshlab("label", "--name", name, "namespace", "shop", "istio.io/use-waypoint=waypoint")
        meshlab("apply", "--name", name, "-f", str(EXAMPLES / "canary.yaml"))
        eventually(lambda: count(name, 5).get("v1", 0) + count(name, 5).get("v2", 0) == 5, 60)
        yield name
    finally:
        meshlab("down", "--name", name, check=False)
        assert_nothing_left(name)


def test_the_canary_splits_90_10_and_iphones_get_v2(books: str) -> None:
    split = count(books, 1000)
    assert set(split) == {"v1", "v2"}, split
    assert abs(split["v2"] / 1000 - 0.10) < 0.05, split
    assert count(books, 50, agent="Mozilla/5.0 (iPhone; CPU iPhone OS 17_0)") == {"v2": 50}


def test_the_gateway_and_route_say_they_are_in_force(books: str) -> None:
    gateway = get(books, "gateway", "waypoint")
    conditions = {c["type"]: c["status"] for c in gateway["status"]["conditions"]}
    assert conditions == {"Accepted": "True", "Programmed": "True"}
    assert gateway["status"]["addresses"][0]["type"] == "IPAddress"
    route = get(books, "httproute", "reviews")
    (parent,) = route["status"]["parents"]
    assert {c["type"]: c["status"] for c in parent["conditions"]} == {
        "Accepted": "True",
        "ResolvedRefs": "True",
    }
    pods = json.loads(meshlab("status", "--name", books, "-o", "json").stdout)["pods"]
    (instance,) = [p for p in pods if p["name"] == "waypoint"]
    assert instance["labels"]["gateway.istio.io/managed"] == "istio.io-mesh-controller"
    assert instance["labels"]["istio.io/dataplane-mode"] == "none"


def test_a_pod_behind_the_waypoint_cannot_be_reached_directly(books: str) -> None:
    state = json.loads(meshlab("status", "--name", books, "-o", "json").stdout)
    ip = next(p["ip"] for p in state["pods"] if p["name"] == "reviews-v1-1")
    done = meshlab(
        "exec",
        "--name",
        books,
        "client/sleep",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "3",
        f"http://{ip}:8080/",
        check=False,
    )
    assert done.returncode != 0 and "version" not in done.stdout


def curl_json(name: str, url: str) -> dict[str, Any] | None:
    """GET ``url`` from the client pod: the echo's JSON, or None when it was not answered."""
    done = meshlab(
        "exec",
        "--name",
        name,
        "client/sleep",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "3",
        url,
        check=False,
    )
    return dict(json.loads(done.stdout)) if done.returncode == 0 else None


def waypoint_chains(name: str) -> set[str]:
    """The filter chains of the waypoint's listener, from its own /config_dump."""
    done = meshlab(
        "exec",
        "--name",
        name,
        "shop/waypoint",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "3",
        "http://127.0.0.1:15000/config_dump",
    )
    dump = json.loads(done.stdout)
    listeners = next(c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump"))
    return {
        chain["name"]
        for listener in listeners["dynamic_listeners"]
        for chain in listener["active_state"]["listener"]["filter_chains"]
    }


def test_a_waypoint_for_workloads_too_takes_what_is_sent_to_a_pods_own_ip(
    books: str, tmp_path: Path
) -> None:
    """``istio.io/waypoint-for: all``: the namespace label now binds shop's pods as well, so
    the client's request to a pod's IP goes to the waypoint, which relays it to that pod."""
    state = json.loads(meshlab("status", "--name", books, "-o", "json").stdout)
    ip = next(p["ip"] for p in state["pods"] if p["name"] == "reviews-v1-1")
    waypoint_ip = next(p["ip"] for p in state["pods"] if p["name"] == "waypoint")
    for_all = tmp_path / "waypoint-all.yaml"
    for_all.write_text(
        (EXAMPLES / "waypoint.yaml")
        .read_text()
        .replace("istio.io/waypoint-for: service", "istio.io/waypoint-for: all")
    )
    meshlab("apply", "--name", books, "-f", str(for_all))
    try:
        seen = eventually(lambda: curl_json(books, f"http://{ip}:8080/"))
        assert (seen["pod"], seen["version"]) == ("reviews-v1-1", "v1")
        # The pod saw the waypoint as its client: the connection came through it.
        assert seen["client"].rsplit(":", 1)[0] == waypoint_ip
        assert {f"direct-tcp|{ip}", f"direct-tcp|{ip}|9080"} <= waypoint_chains(books)
        # The services are served as before.
        assert collections.Counter(count(books, 20)).keys() <= {"v1", "v2"}
    finally:
        meshlab("apply", "--name", books, "-f", str(EXAMPLES / "waypoint.yaml"))
        eventually(lambda: curl_json(books, f"http://{ip}:8080/") is None)


def test_a_route_to_a_missing_backend_answers_500_and_says_why(books: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        (EXAMPLES / "canary.yaml").read_text().replace("name: reviews-v2\n", "name: reviews-v9\n")
    )
    meshlab("apply", "--name", books, "-f", str(broken))
    try:

        def refused() -> bool:
            route = get(books, "httproute", "reviews")
            (parent,) = route["status"]["parents"]
            refs = next(c for c in parent["conditions"] if c["type"] == "ResolvedRefs")
            return bool(refs["status"] == "False" and refs["reason"] == "BackendNotFound")

        eventually(refused)
        eventually(lambda: count(books, 10, agent="iPhone") == {"500": 10})
    finally:
        meshlab("apply", "--name", books, "-f", str(EXAMPLES / "canary.yaml"))
        eventually(lambda: count(books, 5, agent="iPhone") == {"v2": 5})


def test_without_its_waypoint_the_service_is_refused_not_bypassed(books: str) -> None:
    meshlab("delete", "--name", books, "-f", str(EXAMPLES / "waypoint.yaml"))
    try:
        eventually(
            lambda: (
                set(count(books, 5)) <= {"ConnectionResetError", "RemoteDisconnected", "URLError"}
            )
        )
        assert "v1" not in count(books, 20) and "v2" not in count(books, 20)
    finally:
        meshlab("apply", "--name", books, "-f", str(EXAMPLES / "waypoint.yaml"))
        eventually(lambda: sum(count(books, 5).get(v, 0) for v in ("v1", "v2")) == 5, 60)
    assert collections.Counter(count(books, 20)).keys() <= {"v1", "v2"}


def test_the_waypoint_enforces_authorization_policies(books: str, tmp_path: Path) -> None:
    """examples/waypoint-policy.yaml: /admin denied on the whole waypoint, reviews only for
    client/sleep; then the ALLOW names someone else and sleep is refused too."""
    policy = EXAMPLES / "waypoint-policy.yaml"
    someone_else = tmp_path / "someone-else.yaml"
    someone_else.write_text(policy.read_text().replace("sa/sleep", "sa/nobody"))
    meshlab("apply", "--name", books, "-f", str(policy))
    try:
        eventually(lambda: count(books, 5, url=REVIEWS + "admin/users") == {"403": 5})
        for obj, bound in (
            ("no-admin", "waypoint shop/waypoint"),
            ("reviews-readers", "service shop/reviews"),
        ):
            (accepted,) = get(books, "authorizationpolicy", obj)["status"]["conditions"]
            assert accepted["type"] == "WaypointAccepted" and accepted["status"] == "True"
            assert bound in accepted["message"], accepted
        answers = count(books, 20)
        assert answers.keys() <= {"v1", "v2"} and sum(answers.values()) == 20, answers
        # The DENY binds to the waypoint: reviews-v1 (no ALLOW of its own) is denied there too.
        assert count(books, 5, url="http://10.96.0.21:9080/admin") == {"403": 5}
        assert count(books, 5, url="http://10.96.0.21:9080/").get("v1") == 5
        meshlab("apply", "--name", books, "-f", str(someone_else))
        eventually(lambda: count(books, 5) == {"403": 5})
        assert count(books, 5, url="http://10.96.0.21:9080/").get("v1") == 5
    finally:
        meshlab("delete", "--name", books, "-f", str(policy), check=False)
    eventually(lambda: count(books, 5, url=REVIEWS + "admin/users").keys() <= {"v1", "v2"})


def test_the_waypoint_authenticates_tokens(books: str, tmp_path: Path) -> None:
    """A RequestAuthentication with the test's own key and a policy that wants a token on
    /private: a good token passes, a forged or expired one is 401, none is 403; then the
    key is rotated (a new kid) and the old key's tokens fail."""
    old, new = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in "ab")
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(*keys: tuple[Any, str]) -> str:
        algorithm = jwt.get_algorithm_by_name("RS256")
        return json.dumps(
            {
                "keys": [
                    {**json.loads(algorithm.to_jwk(k.public_key())), "kid": kid, "alg": "RS256"}
                    for k, kid in keys
                ]
            }
        )

    def token(key: Any, kid: str, exp_in: int = 600) -> str:
        now = int(time.time())
        claims = {"iss": "https://idp.test", "sub": "alice", "iat": now, "exp": now + exp_in}
        return str(jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid}))

    def policy(keys: str) -> Path:
        path = tmp_path / "jwt.yaml"
        path.write_text(
            f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: "", name: reviews}}]
  jwtRules:
  - issuer: https://idp.test
    jwks: '{keys}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: need-token, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: "", name: reviews}}]
  action: DENY
  rules:
  - from: [{{source: {{notRequestPrincipals: ["*"]}}}}]
    to: [{{operation: {{paths: [/private*]}}}}]
"""
        )
        return path

    def private(t: str | None) -> dict[str, int]:
        query = f"?access_token={t}" if t else ""
        return count(books, 3, url=f"{REVIEWS}private{query}")

    def served(answers: dict[str, int]) -> bool:
        return answers.keys() <= {"v1", "v2"} and sum(answers.values()) == 3

    path = policy(jwks((old, "old")))
    meshlab("apply", "--name", books, "-f", str(path))
    try:
        eventually(lambda: private(None) == {"403": 3})
        assert served(private(token(old, "old")))
        assert private(token(stranger, "old")) == {"401": 3}  # forged: not our key
        assert private(token(old, "old", exp_in=-600)) == {"401": 3}  # expired
        (accepted,) = get(books, "requestauthentication", "idp")["status"]["conditions"]
        assert accepted["status"] == "True" and "service shop/reviews" in accepted["message"]
        meshlab("apply", "--name", books, "-f", str(policy(jwks((new, "new")))))
        eventually(lambda: private(token(old, "old")) == {"401": 3})
        assert served(private(token(new, "new")))
    finally:
        meshlab("delete", "--name", books, "-f", str(path), check=False)
    eventually(lambda: served(private(None)))


def test_the_waypoint_cuts_a_burst_at_its_rate_limit(books: str) -> None:
    """examples/waypoint-ratelimit.yaml (Istio's recipe): 10 tokens, 10 more every 5 s."""
    limit = EXAMPLES / "waypoint-ratelimit.yaml"
    meshlab("apply", "--name", books, "-f", str(limit))
    try:
        eventually(lambda: "429" in count(books, 15), 60)  # in force: the bucket ran dry
        time.sleep(5.5)  # full again
        burst = count(books, 20)
        served = burst.get("v1", 0) + burst.get("v2", 0)
        # The bucket's 10, and what refilled while the burst ran (2 a second).
        assert 10 <= served <= 13 and burst.get("429", 0) == 20 - served, burst
        (accepted,) = get(books, "envoyfilter", "filter-local-ratelimit-svc")["status"][
            "conditions"
        ]
        assert accepted["status"] == "True", accepted
    finally:
        meshlab("delete", "--name", books, "-f", str(limit), check=False)
    eventually(lambda: count(books, 20).keys() <= {"v1", "v2"})


def test_the_waypoint_traces_requests_to_a_collector_service_in_the_mesh(
    books: str, tmp_path: Path
) -> None:
    """examples/waypoint-telemetry.yaml: MeshConfig's OpenTelemetry provider (the istio
    ConfigMap) names a Service; a real OTLP/gRPC receiver runs in its pod (client/sleep, in
    the mesh); every request through the waypoint is a span there, named as istiod names it."""
    out = tmp_path / "spans.jsonl"
    repo = Path(__file__).resolve().parents[2]
    errors = (tmp_path / "receiver.err").open("w")
    receiver = subprocess.Popen(
        [MESHLAB, "exec", "--name", books, "client/sleep", "--", sys.executable, "-m",
         "tests.support.otlp", "--listen", "0.0.0.0:4317", "--out", str(out)],
        cwd=repo, start_new_session=True, stdout=subprocess.DEVNULL, stderr=errors,
    )  # fmt: skip
    example = EXAMPLES / "waypoint-telemetry.yaml"
    try:
        meshlab("apply", "--name", books, "-f", str(example))

        def spans() -> list[dict[str, Any]]:
            count(books, 3)
            if not out.exists():
                return []
            return [json.loads(line) for line in out.read_text().splitlines()]

        got = eventually(spans, 60)
        span = got[-1]
        assert span["name"] == "reviews.shop.svc.cluster.local:9080/*"
        assert span["kind"] == 2  # SERVER
        assert span["attributes"]["http.status_code"] == "200"
        assert span["attributes"]["team"] == "bookstore"
        assert span["resource"]["service.name"] == "waypoint.shop"
        # A request that carries its own trace: the waypoint's span is its child, and the
        # pod gets the waypoint's span as its parent (the links a trace view follows).
        trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        done = meshlab(
            "exec", "--name", books, "client/sleep", "--", "curl", "-sS", "--max-time", "5",
            "-H", f"traceparent: 00-{trace_id}-{parent}-01", REVIEWS,
        )  # fmt: skip
        seen = json.loads(done.stdout)["headers"]["Traceparent"][0].split("-")
        assert seen[1] == trace_id and seen[2] != parent and seen[3] == "01", seen

        def child() -> dict[str, Any] | None:
            if not out.exists():
                return None
            lines = [json.loads(line) for line in out.read_text().splitlines()]
            return next((s for s in lines if s["trace_id"] == trace_id), None)

        linked = eventually(child, 30)
        assert linked["parent_span_id"] == parent and linked["span_id"] == seen[2], linked
        (accepted,) = get(books, "telemetry", "waypoint-tracing")["status"]["conditions"]
        assert accepted["status"] == "True", accepted
        assert "tracing in force on waypoint shop/waypoint" in accepted["message"]
    finally:
        meshlab("delete", "--name", books, "-f", str(example), check=False)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(receiver.pid, signal.SIGTERM)
        receiver.wait(10)
        errors.close()
    assert count(books, 5).keys() <= {"v1", "v2"}
