"""The GAMMA suite's harness: requests run in a client pod, what each case expects,
and applying routes until the waypoint carries them (see the package docstring)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from tests.integration.conftest import meshlab

NS = "gateway-conformance-mesh"
CONSUMER_NS = "gateway-conformance-mesh-consumer"
CLIENT = f"{NS}/echo-v1-1"  # upstream's client: the first pod labelled app=echo,version=v1
CONSUMER_CLIENT = f"{CONSUMER_NS}/echo-v1-1"
CLUSTER_FILE = Path(__file__).with_name("cluster.yaml")
WAYPOINT_CTL = str(Path(sys.executable).parent / "waypoint-ctl")
STATE_DIR = Path(os.environ.get("MESHLAB_STATE_DIR", "/run/meshlab"))

# upstream's timeouts (conformance/utils/config/timeout.go) and weight tolerance
CONSISTENT_ROUNDS = 3
MAX_TIME_TO_CONSISTENCY_S = 30.0
WEIGHT_REQUESTS = 500
WEIGHT_TOLERANCE = 0.05
# Upstream allows 10 attempts at a distribution; 3 keep the file in its CI budget.
# A correct 70/30 split misses +-0.05 in 500 draws about 1.5% of the time: three
# misses in a row, about 3 in a million.
WEIGHT_ATTEMPTS = 3

WAYPOINT = f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: {NS}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"""

# Run inside a client pod: argv[1] is a JSON list of requests; prints a JSON list
# of answers, one per request ({"tally": N} requests: a count by pod or status).
# http.client rather than urllib: it follows no redirect (upstream's client
# neither) and lets a Host header name another service than the one dialled.
SEND = r"""
import collections, http.client, json, sys, urllib.parse

def http_one(r):
    url = urllib.parse.urlsplit(r["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=5)
    target = (url.path or "/") + ("?" + url.query if url.query else "")
    try:
        named = {k.lower() for k, _ in r["headers"]}
        conn.putrequest(r["method"], target, skip_host="host" in named, skip_accept_encoding=True)
        for k, v in r["headers"]:
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        headers = {}
        for k, v in resp.getheaders():
            headers.setdefault(k.lower(), []).append(v)
        try:
            echo = json.loads(body)
        except ValueError:
            echo = None
        return {"status": resp.status, "headers": headers, "echo": echo}
    except OSError as e:
        return {"status": type(e).__name__, "error": str(e)}
    finally:
        conn.close()

channels = {}

def grpc_one(r):
    import grpc
    from meshlab.apps.echo import GRPC_SERVICE, decode_echo_response
    if r["target"] not in channels:
        channels[r["target"]] = grpc.insecure_channel(r["target"])
    call = channels[r["target"]].unary_unary(f"/{GRPC_SERVICE}/{r['method']}")
    try:
        reply, c = call.with_call(b"", metadata=[tuple(m) for m in r["metadata"]], timeout=5)
    except grpc.RpcError as e:
        return {"status": e.code().name, "error": e.details()}
    headers = {}
    for k, v in c.initial_metadata() or ():
        headers.setdefault(k.lower(), []).append(v)
    return {"status": "OK", "headers": headers, "echo": decode_echo_response(reply)}

def key(answer):
    echo = answer.get("echo")
    if answer["status"] in (200, "OK") and isinstance(echo, dict):
        where = echo.get("context", echo)
        return f"{where.get('namespace')}/{where.get('pod')}"
    return str(answer["status"])

out = []
for r in json.loads(sys.argv[1]):
    one = grpc_one if "target" in r else http_one
    if r.get("tally"):
        out.append(collections.Counter(key(one(r)) for _ in range(r["tally"])))
    else:
        out.append(one(r))
print(json.dumps(out))
"""


# ------------------------------------------------------------------ requests and expectations


@dataclass(frozen=True, slots=True, kw_only=True)
class Http:
    """One HTTP/1.1 request, as upstream's ``client URL [-H K:V]...`` sends it."""

    url: str
    headers: tuple[tuple[str, str], ...] = ()
    method: str = "GET"

    def wire(self) -> dict[str, Any]:
        return {"url": self.url, "headers": [list(h) for h in self.headers], "method": self.method}

    @property
    def host(self) -> str:
        """The Host the request carries: a ``Host`` header wins over the URL's."""
        for k, v in self.headers:
            if k.lower() == "host":
                return v
        return urlsplit(self.url).netloc

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/"


@dataclass(frozen=True, slots=True, kw_only=True)
class Grpc:
    """One unary call to the echo's GrpcEcho service, metadata as the request's headers."""

    target: str = "echo:7070"
    method: str = "Echo"
    metadata: tuple[tuple[str, str], ...] = ()

    def wire(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "method": self.method,
            "metadata": [list(m) for m in self.metadata],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Location:
    """A redirect's expected ``Location``; a part left None is the request's own.

    The gateway harness's rules (``setRedirectRequestDefaults``): an unset host,
    scheme or path is the request's; an unset port may be absent or the
    scheme's well-known one.
    """

    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Expect:
    """What one answer must show. Header names are case-insensitive."""

    status: int | str = 200  # HTTP status, or the gRPC status code's name
    backend: str | None = None  # the answering pod's name prefix (upstream's Backend)
    namespace: str = NS  # beyond upstream: the namespace of the pod that answered
    path: str | None = None  # beyond upstream: the request target the backend saw
    host: str | None = None  # beyond upstream: the Host the backend saw
    headers: Mapping[str, str] = field(default_factory=dict)  # backend-seen, values ","-joined
    absent: tuple[str, ...] = ()  # request headers the backend must not see
    response_headers: Mapping[str, str] = field(default_factory=dict)
    absent_response_headers: tuple[str, ...] = ()
    redirect: Location | None = None


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    request: Http | Grpc
    expect: Expect


def _backend_view(answer: Mapping[str, Any]) -> tuple[str, str, str, str, dict[str, list[str]]]:
    """(pod, namespace, path, host, request headers) as the echo saw them, over HTTP or gRPC."""
    echo = answer["echo"]
    if "context" in echo:  # gRPC: metadata in order, no path or authority
        headers: dict[str, list[str]] = {}
        for k, v in echo["headers"]:
            headers.setdefault(k.lower(), []).append(v)
        ctx = echo["context"]
        return ctx["pod"], ctx["namespace"], "", "", headers
    seen = {k.lower(): list(v) for k, v in echo["headers"].items()}
    return echo["pod"], echo["namespace"], echo["path"], echo["host"], seen


def problems(case: Case, answer: Mapping[str, Any]) -> list[str]:
    """Everything in ``answer`` that ``case`` does not expect; empty: it passes."""
    e = case.expect
    if answer["status"] != e.status:
        detail = answer.get("error") or (answer.get("echo") or {}).get("pod", "")
        return [f"status {answer['status']!r}, want {e.status!r} {detail}".rstrip()]
    out = []
    got_headers: dict[str, list[str]] = answer.get("headers") or {}
    for name, want in e.response_headers.items():
        if got_headers.get(name.lower()) != [want]:
            out.append(f"response header {name}: {got_headers.get(name.lower())}, want [{want!r}]")
    for name in e.absent_response_headers:
        if name.lower() in got_headers:
            out.append(f"response header {name} present: {got_headers[name.lower()]}")
    if e.redirect is not None:
        out += _location_problems(case, got_headers.get("location"))
    if e.status not in (200, "OK"):
        return out
    if not isinstance(answer.get("echo"), dict):
        return [*out, f"no echo in the answer: {answer}"]
    pod, namespace, path, host, seen = _backend_view(answer)
    if e.backend is not None and not pod.startswith(e.backend + "-"):
        out.append(f"answered by {pod}, want {e.backend}")
    if namespace != e.namespace:
        out.append(f"answered from namespace {namespace!r}, want {e.namespace!r}")
    if e.path is not None and path != e.path:
        out.append(f"backend saw path {path!r}, want {e.path!r}")
    if e.host is not None and host != e.host:
        out.append(f"backend saw Host {host!r}, want {e.host!r}")
    for name, want in e.headers.items():
        got = seen.get(name.lower())
        if got is None or ",".join(got) != want:
            out.append(f"backend saw {name}: {got}, want {want!r}")
    for name in e.absent:
        if name.lower() in seen:
            out.append(f"backend saw {name}: {seen[name.lower()]}, want it absent")
    return out


def _location_problems(case: Case, location: list[str] | None) -> list[str]:
    want = case.expect.redirect
    assert want is not None and isinstance(case.request, Http)
    if not location or len(location) != 1:
        return [f"Location {location}, want one"]
    got = urlsplit(location[0])
    scheme = want.scheme or urlsplit(case.request.url).scheme
    host = want.host or case.request.host.rsplit(":", 1)[0]
    path = want.path or case.request.path
    ports = (want.port,) if want.port is not None else (None, {"http": 80, "https": 443}[scheme])
    out = []
    if got.scheme != scheme:
        out.append(f"Location {location[0]}: scheme {got.scheme!r}, want {scheme!r}")
    if got.hostname != host:
        out.append(f"Location {location[0]}: host {got.hostname!r}, want {host!r}")
    if got.port not in ports:
        out.append(f"Location {location[0]}: port {got.port}, want one of {ports}")
    if got.path != path:
        out.append(f"Location {location[0]}: path {got.path!r}, want {path!r}")
    return out


# ------------------------------------------------------------------ talking to the cluster


def send(cluster: str, requests: Sequence[Http | Grpc], client: str = CLIENT) -> list[Any]:
    """Every request in one exec of the client pod, in order; one answer each."""
    done = meshlab(
        "exec",
        "--name",
        cluster,
        client,
        "--",
        "python3",
        "-c",
        SEND,
        json.dumps([r.wire() for r in requests]),
        timeout=300,
    )
    return list(json.loads(done.stdout))


def tally(cluster: str, request: Http | Grpc, n: int, client: str = CLIENT) -> dict[str, int]:
    """``n`` requests; how many each ``namespace/pod`` (or each failure) answered."""
    done = meshlab(
        "exec",
        "--name",
        cluster,
        client,
        "--",
        "python3",
        "-c",
        SEND,
        json.dumps([{**request.wire(), "tally": n}]),
        timeout=300,
    )
    (counts,) = json.loads(done.stdout)
    return dict(counts)


def converge(
    cluster: str,
    cases: Sequence[Case],
    *,
    client: str = CLIENT,
    timeout_s: float = MAX_TIME_TO_CONSISTENCY_S,
) -> None:
    """Until every case passes ``CONSISTENT_ROUNDS`` rounds in a row (upstream's convergence)."""
    deadline = time.monotonic() + timeout_s
    batch = list(cases) * CONSISTENT_ROUNDS
    while True:
        answers = send(cluster, [c.request for c in batch], client)
        failures = sorted(
            {f"{c.name}: {p}" for c, a in zip(batch, answers, strict=True) for p in problems(c, a)}
        )
        if not failures:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not consistent within {timeout_s}s (client {client}):\n  " + "\n  ".join(failures)
            )
        time.sleep(0.5)


def assert_split(
    cluster: str, request: Http | Grpc, want: Mapping[str, float], n: int = WEIGHT_REQUESTS
) -> None:
    """Upstream's weight check: each backend's share of ``n`` within the tolerance."""
    tries = []
    for _ in range(WEIGHT_ATTEMPTS):
        seen = tally(cluster, request, n)
        shares: collections.Counter[str] = collections.Counter()
        for where, count in seen.items():
            namespace, _, pod = where.partition("/")
            backend = next((b for b in want if pod.startswith(b + "-")), None)
            shares[backend if namespace == NS and backend else f"unexpected {where}"] += count
        expected = {b for b, w in want.items() if w > 0}
        if set(shares) == expected and all(
            abs(shares[b] / n - w) <= WEIGHT_TOLERANCE for b, w in want.items()
        ):
            return
        tries.append(dict(seen))
    raise AssertionError(f"split {tries}, want {dict(want)} +-{WEIGHT_TOLERANCE} of {n}")


def eventually(check: Callable[[], Any], timeout_s: float = MAX_TIME_TO_CONSISTENCY_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s}s: {check.__doc__ or check}")
        time.sleep(0.3)


def conditions(cluster: str, kind: str, namespace: str, name: str) -> list[dict[str, Any]]:
    """Per parent of a route: its conditions by type, as meshd wrote them."""
    obj = json.loads(
        meshlab("get", "--name", cluster, kind, name, "-n", namespace, "-o", "json").stdout
    )
    return [
        {c["type"]: c for c in parent["conditions"]}
        for parent in (obj.get("status") or {}).get("parents", [])
    ]


def waypoint_routes(cluster: str) -> set[str]:
    """The names of the routes the waypoint holds now (``namespace.route.rule``)."""
    done = subprocess.run(
        [WAYPOINT_CTL, "--cluster", cluster, "-n", NS, "config-dump"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    dump = json.loads(done.stdout) if done.returncode == 0 else {}
    names: set[str] = set()
    for config in dump.get("configs", []):
        for dynamic in config.get("dynamic_route_configs", []):
            for vhost in dynamic["route_config"].get("virtual_hosts", []):
                names.update(r.get("name", "") for r in vhost.get("routes", []))
    return names


def _carries(cluster: str, objects: Sequence[tuple[str, str, str]]) -> bool:
    names = waypoint_routes(cluster)
    return all(any(n.startswith(f"{ns}.{name}.") for n in names) for _, ns, name in objects)


def _dropped(cluster: str, objects: Sequence[tuple[str, str, str]]) -> bool:
    names = waypoint_routes(cluster)
    return not any(any(n.startswith(f"{ns}.{name}.") for n in names) for _, ns, name in objects)


@contextlib.contextmanager
def applied(
    cluster: str, tmp_path: Path, manifest: str, *, accepted: bool = True
) -> Iterator[list[tuple[str, str, str]]]:
    """The routes of ``manifest`` in force (meshd accepts them, the waypoint holds them).

    ``accepted=False``: only applied; the test checks the refusal itself.
    Deleted on the way out, and waited for until the waypoint has let them go.
    """
    path = tmp_path / "routes.yaml"
    path.write_text(manifest)
    objects = [
        (d["kind"], d["metadata"]["namespace"], d["metadata"]["name"])
        for d in yaml.safe_load_all(manifest)
        if d
    ]
    meshlab("apply", "--name", cluster, "-f", str(path))
    try:
        if accepted:
            for kind, ns, name in objects:

                def in_force(kind: str = kind, ns: str = ns, name: str = name) -> bool:
                    """every parent Accepted and ResolvedRefs"""
                    parents = conditions(cluster, kind, ns, name)
                    return bool(parents) and all(
                        p[t]["status"] == "True"
                        for p in parents
                        for t in ("Accepted", "ResolvedRefs")
                    )

                eventually(in_force)
            eventually(lambda: _carries(cluster, objects))
        yield objects
    finally:
        meshlab("delete", "--name", cluster, "-f", str(path))
        eventually(lambda: _dropped(cluster, objects))


def route(
    name: str, parent: str, rules: str, *, port: int | None = None, kind: str = "HTTPRoute"
) -> str:
    """An HTTPRoute (or GRPCRoute) of ``NS`` with one Service parent; ``rules`` is YAML."""
    port_field = f", port: {port}" if port is not None else ""
    body = "".join(f"  {line}\n" for line in rules.strip("\n").splitlines())
    return (
        f"apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\n"
        f"metadata:\n  name: {name}\n  namespace: {NS}\n"
        f'spec:\n  parentRefs:\n  - {{group: "", kind: Service, name: {parent}{port_field}}}\n'
        f"  rules:\n{body}"
    )


def http(target: str, *headers: tuple[str, str], host: str = "echo") -> Http:
    return Http(url=f"http://{host}{target}", headers=headers)


def grpc(*metadata: tuple[str, str]) -> Grpc:
    return Grpc(metadata=metadata)


def to(backend: str, request: Http | Grpc, **expect: Any) -> Case:
    """A case answered by ``backend``; an HTTP one also checks the path the backend saw."""
    if isinstance(request, Http):
        expect.setdefault("path", urlsplit(request.url).path + _query(request.url))
        return Case(
            f"{request.url} {request.headers or ''}", request, Expect(backend=backend, **expect)
        )
    return Case(f"grpc {request.metadata}", request, Expect(status="OK", backend=backend, **expect))


def _query(url: str) -> str:
    query = urlsplit(url).query
    return f"?{query}" if query else ""


def set_response_header(value: str) -> str:
    return (
        "- type: ResponseHeaderModifier\n"
        f"  responseHeaderModifier: {{set: [{{name: X-Header-Set, value: {value}}}]}}\n"
    )


def indent(text: str, by: int) -> str:
    return "".join(" " * by + line + "\n" for line in text.splitlines())
