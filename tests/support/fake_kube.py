"""A small Kubernetes API server for tests: real list and watch wire format, in memory.

No API server can run on the test machine, so the Kubernetes source is
tested through the official ``kubernetes`` client against this one. It speaks
what the client and a kind cluster speak: JSON lists with a list
``resourceVersion`` (built-in items without ``kind``/``apiVersion``, custom
resources with them), pagination with ``limit``/``continue``, and
``?watch=true`` streams of newline-delimited events over chunked transfer
encoding that start after the requested ``resourceVersion``, with bookmarks
on request and ``410 Gone`` once a version is compacted away; GET of one
object and POST to a collection (``404 NotFound``, ``409 AlreadyExists``).
Tests steer it: ``add``/``update``/``delete`` objects, ``send_bookmark``,
``expire``, ``close_watches``, ``fail_next``, ``before`` (another client's
write between two requests), and a token table for TokenReviews.
"""

from __future__ import annotations

import bisect
import copy
import json
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    plural: str
    group: str
    version: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def base(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def builtin(self) -> bool:
        # Lists of built-in kinds carry no kind/apiVersion on their items; CRs do.
        return not self.group.endswith(("istio.io", "networking.k8s.io"))


RESOURCES = {
    r.plural: r
    for r in (
        Resource("namespaces", "", "v1", "Namespace", namespaced=False),
        Resource("pods", "", "v1", "Pod"),
        Resource("services", "", "v1", "Service"),
        Resource("serviceaccounts", "", "v1", "ServiceAccount"),
        Resource("secrets", "", "v1", "Secret"),
        Resource("endpointslices", "discovery.k8s.io", "v1", "EndpointSlice"),
        Resource("authorizationpolicies", "security.istio.io", "v1", "AuthorizationPolicy"),
        Resource("gateways", "gateway.networking.k8s.io", "v1", "Gateway"),
    )
}
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


def status(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    """A ``metav1.Status``, the body of every API error."""
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass(frozen=True)
class TokenInfo:
    namespace: str
    service_account: str
    node: str | None
    pod: str | None
    audiences: tuple[str, ...]


@dataclass
class _Event:
    rv: int
    type: str
    namespace: str
    obj: Obj


@dataclass
class _Store:
    objects: dict[tuple[str, str], Obj] = field(default_factory=dict)
    history: list[_Event] = field(default_factory=list)
    history_rvs: list[int] = field(default_factory=list)
    floor: int = 0  # watches from below this version are answered 410 Gone
    gone_as_http: bool = False
    epoch: int = 0  # bumped by expire(): open watches end
    missing: bool = False  # the CRD is not installed: 404


class FakeKube:
    """The server and its controls. Use as a context manager, or start()/stop()."""

    def __init__(self, *, missing: Sequence[str] = (), first_resource_version: int = 1000) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._rv = first_resource_version
        self._stores = {name: _Store(missing=name in missing) for name in RESOURCES}
        self._bookmarks = 0
        self._closes = 0
        self._fail_next = 0
        self._continues: dict[str, tuple[int, str, list[Obj]]] = {}
        self._tokens: dict[str, TokenInfo] = {}
        self._before: list[tuple[str, str, Callable[[], object]]] = []
        self._stopping = False
        self._connections: set[socket.socket] = set()
        self.requests: list[Request] = []
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.kube = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="fake-kube"
        )

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeKube:
        self._thread.start()
        return self

    def stop(self) -> None:
        """End every stream and connection, then join every server thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            connections = list(self._connections)
        for conn in connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._httpd.shutdown()
        self._httpd.server_close()  # joins the handler threads
        self._thread.join()

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path, token: str = "fake-admin-token") -> Path:
        """A kubeconfig naming this server, as ``kind get kubeconfig`` would (JSON is YAML)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kind-fake", "cluster": {"server": self.url}}],
            "users": [{"name": "kind-fake", "user": {"token": token}}],
            "contexts": [
                {"name": "kind-fake", "context": {"cluster": "kind-fake", "user": "kind-fake"}}
            ],
            "current-context": "kind-fake",
        }
        path.write_text(json.dumps(config))
        return path

    # -- objects ---------------------------------------------------------------------------

    def add(self, resource: str, obj: Obj) -> Obj:
        """Create ``obj``; the server fills uid, resourceVersion and timestamps."""
        res = RESOURCES[resource]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            meta.setdefault("namespace", "default")
        with self._cond:
            store = self._stores[resource]
            key = (meta.get("namespace", ""), meta["name"])
            if key in store.objects:
                raise KeyError(f"{resource} {key} already exists")
            now = _now()
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now)
            if not res.builtin:
                meta.setdefault("generation", 1)
            meta.setdefault("managedFields", [_managed_field(res, now)])
            return self._record(resource, "ADDED", key, obj)

    def update(self, resource: str, obj: Obj) -> Obj:
        """Replace an existing object (a MODIFIED event); uid and creation time are kept."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if RESOURCES[resource].namespaced:
            meta.setdefault("namespace", "default")
        with self._cond:
            key = (meta.get("namespace", ""), meta["name"])
            old = self._stores[resource].objects[key]["metadata"]
            for kept in ("uid", "creationTimestamp", "managedFields", "generation"):
                if kept in old:
                    meta[kept] = old[kept]
            return self._record(resource, "MODIFIED", key, obj)

    def delete(self, resource: str, obj: Obj) -> None:
        """Delete by the object's namespace/name (a DELETED event with the last state)."""
        meta = obj["metadata"]
        namespace = meta.get("namespace", "default") if RESOURCES[resource].namespaced else ""
        with self._cond:
            last = copy.deepcopy(self._stores[resource].objects[(namespace, meta["name"])])
            self._record(resource, "DELETED", (namespace, meta["name"]), last)

    def get(self, resource: str, name: str, namespace: str = "") -> Obj:
        with self._cond:
            return copy.deepcopy(self._stores[resource].objects[(namespace, name)])

    def _record(self, resource: str, kind: str, key: tuple[str, str], obj: Obj) -> Obj:
        store = self._stores[resource]
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if kind == "DELETED":
            del store.objects[key]
        else:
            store.objects[key] = obj
        store.history.append(_Event(self._rv, kind, key[0], obj))
        store.history_rvs.append(self._rv)
        self._cond.notify_all()
        return copy.deepcopy(obj)

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._rv)

    # -- controls --------------------------------------------------------------------------

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold every watch stream: what happens inside reaches watchers only afterwards."""
        with self._cond:
            yield

    def send_bookmark(self) -> str:
        """Send a BOOKMARK on every open watch that asked for them; returns its version."""
        with self._cond:
            self._bookmarks += 1
            self._cond.notify_all()
            return str(self._rv)

    def close_watches(self) -> None:
        """End every open watch cleanly, as when its timeoutSeconds elapse."""
        with self._cond:
            self._closes += 1
            self._cond.notify_all()

    def expire(self, resource: str | None = None, *, how: str = "event") -> None:
        """Compact history: every version so far of ``resource`` (or all) becomes too old.

        ``how="event"``: open watches end with an ERROR event carrying a 410
        Status, and so does any later watch from an older version (what the
        API server's watch cache does). ``how="http"``: open watches end
        cleanly and later watches from older versions get HTTP 410.
        """
        assert how in ("event", "http")
        with self._cond:
            self._rv += 1  # the compaction point; a fresh list is not too old
            for name in [resource] if resource else list(RESOURCES):
                store = self._stores[name]
                store.floor = self._rv
                store.gone_as_http = how == "http"
                store.epoch += 1
            self._cond.notify_all()

    def fail_next(self, n: int) -> None:
        """The next ``n`` requests, whatever they are, fail with 500 Internal Server Error."""
        with self._cond:
            self._fail_next = n

    def before(self, method: str, resource: str, action: Callable[[], object]) -> None:
        """Run ``action`` once, just before the next ``method`` request on ``resource`` is
        served: another client's write landing between two of the tested client's requests."""
        with self._cond:
            self._before.append((method, resource, action))

    def add_token(
        self,
        token: str,
        *,
        namespace: str,
        service_account: str,
        node: str | None = None,
        pod: str | None = None,
        audiences: Sequence[str] = (API_AUDIENCE,),
    ) -> None:
        """A bound service account token the TokenReview API will vouch for."""
        self._tokens[token] = TokenInfo(namespace, service_account, node, pod, tuple(audiences))

    def list_requests(self, resource: str) -> list[Request]:
        return [r for r in self._matching(resource) if r.method == "GET" and not r.watch]

    def watch_requests(self, resource: str) -> list[Request]:
        return [r for r in self._matching(resource) if r.watch]

    def _matching(self, resource: str) -> list[Request]:
        """Requests to a collection of ``resource``, not to one of its objects."""
        with self._cond:
            requests = list(self.requests)
        routes = [(r, _route(r.path)) for r in requests]
        return [r for r, route in routes if route and route[0] == resource and route[2] is None]

    # -- serving (called by the handler threads) ------------------------------------------

    def _list(self, resource: str, namespace: str | None, query: Mapping[str, str]) -> Obj:
        res = RESOURCES[resource]
        with self._cond:
            store = self._stores[resource]
            token = query.get("continue")
            if token:
                if token not in self._continues:
                    raise _ApiError(status(410, "Expired", "continue token unknown"))
                rv, listed, items = self._continues.pop(token)
                if listed != resource or rv < store.floor:
                    raise _ApiError(
                        status(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent "
                            "list result. You can start a new list without the continue parameter.",
                        )
                    )
            else:
                rv = self._rv
                items = [
                    copy.deepcopy(obj)
                    for key, obj in sorted(store.objects.items())
                    if namespace is None or key[0] == namespace
                ]
            limit = int(query.get("limit") or 0)
            meta: Obj = {"resourceVersion": str(rv)}
            if limit and len(items) > limit:
                items, rest = items[:limit], items[limit:]
                token = uuid.uuid4().hex
                self._continues[token] = (rv, resource, rest)
                meta["continue"] = token
                meta["remainingItemCount"] = len(rest)
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": meta,
            "items": [_render(res, obj, in_list=True) for obj in items],
        }

    def _get_one(self, resource: str, namespace: str | None, name: str) -> Obj:
        res = RESOURCES[resource]
        with self._cond:
            obj = self._stores[resource].objects.get((namespace or "", name))
            if obj is None:
                raise _ApiError(_not_found(res, name))
            return _render(res, copy.deepcopy(obj))

    def _create(self, resource: str, namespace: str | None, body: Obj) -> Obj:
        res = RESOURCES[resource]
        meta = body.setdefault("metadata", {})
        name = meta.get("name") or ""
        if namespace is not None and meta.setdefault("namespace", namespace) != namespace:
            message = "the namespace of the provided object does not match the namespace sent "
            raise _ApiError(status(400, "BadRequest", message + "on the request"))
        if not name:
            message = f'{res.kind} "" is invalid: metadata.name: Required value: name is required'
            raise _ApiError(status(422, "Invalid", message))
        for server_filled in ("uid", "resourceVersion", "creationTimestamp", "managedFields"):
            meta.pop(server_filled, None)
        body.pop("kind", None)
        body.pop("apiVersion", None)
        try:
            return _render(res, self.add(resource, body))
        except KeyError:
            details = {"name": name, "kind": res.plural}
            message = f'{res.plural} "{name}" already exists'
            raise _ApiError(status(409, "AlreadyExists", message, details)) from None

    def _token_review(self, body: Obj) -> Obj:
        spec = body.get("spec") or {}
        wanted = list(spec.get("audiences") or [API_AUDIENCE])
        info = self._tokens.get(spec.get("token", ""))
        review: Obj = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
        }
        if info is None:
            review["status"] = {
                "user": {},
                "error": "[invalid bearer token, square/go-jose: error in cryptographic "
                "primitive, token lookup failed]",
            }
            return review
        common = [a for a in wanted if a in info.audiences]
        if not common:
            review["status"] = {
                "user": {},
                "error": f"[invalid bearer token, token audiences {json.dumps(info.audiences)} "
                f"is invalid for the target audiences {json.dumps(wanted)}, unknown]",
            }
            return review
        extra: dict[str, list[str]] = {
            "authentication.kubernetes.io/credential-id": [f"JTI={uuid.uuid4()}"]
        }
        if info.node:
            extra["authentication.kubernetes.io/node-name"] = [info.node]
            extra["authentication.kubernetes.io/node-uid"] = [
                str(uuid.uuid5(uuid.NAMESPACE_DNS, info.node))
            ]
        if info.pod:
            extra["authentication.kubernetes.io/pod-name"] = [info.pod]
            extra["authentication.kubernetes.io/pod-uid"] = [
                str(uuid.uuid5(uuid.NAMESPACE_DNS, info.pod))
            ]
        review["status"] = {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{info.namespace}:{info.service_account}",
                "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, info.service_account)),
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{info.namespace}",
                    "system:authenticated",
                ],
                "extra": extra,
            },
            "audiences": common,
        }
        return review


class _ApiError(Exception):
    def __init__(self, body: Obj) -> None:
        super().__init__(body["message"])
        self.body = body


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True
    kube: FakeKube

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client going away is no error
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked encoding, as the API server
    server: _Server

    def setup(self) -> None:
        super().setup()
        # As Go's net/http: without it, Nagle and delayed ACKs add 40 ms to each response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.kube._cond:
            self.server.kube._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.kube._cond:
            self.server.kube._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the tests read FakeKube.requests instead

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        kube = self.server.kube
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = Request(method, url.path, query)
        route = _route(url.path)
        with kube._cond:
            hook = next((h for h in kube._before if route and h[:2] == (method, route[0])), None)
            if hook is not None:
                kube._before.remove(hook)
        if hook is not None:
            hook[2]()
        with kube._cond:
            kube.requests.append(request)
            failing = kube._fail_next > 0
            kube._fail_next -= failing
        try:
            if failing:
                raise _ApiError(
                    status(
                        500,
                        "InternalError",
                        "Internal error occurred: etcdserver: request timed out",
                    )
                )
            if method == "POST" and url.path == TOKEN_REVIEWS:
                self._send_json(201, kube._token_review(json.loads(body or b"{}")))
                return
            if route is None or kube._stores[route[0]].missing:
                raise _ApiError(
                    status(404, "NotFound", "the server could not find the requested resource")
                )
            resource, namespace, name = route
            if method == "POST" and name is None:
                self._send_json(201, kube._create(resource, namespace, json.loads(body or b"{}")))
            elif method != "GET":
                raise _ApiError(status(405, "MethodNotAllowed", f"{method} is not supported"))
            elif name is not None:
                self._send_json(200, kube._get_one(resource, namespace, name))
            elif request.watch:
                self._watch(resource, namespace, query)
            else:
                self._send_json(200, kube._list(resource, namespace, query))
        except _ApiError as e:
            self._send_json(e.body["code"], e.body)

    def _send_json(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, resource: str, namespace: str | None, query: Mapping[str, str]) -> None:
        kube = self.server.kube
        res = RESOURCES[resource]
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        with kube._cond:
            store = kube._stores[resource]
            epoch, closes, bookmark_seen = store.epoch, kube._closes, kube._bookmarks
            lines: list[Obj] = []
            requested = query.get("resourceVersion") or "0"
            if requested == "0":  # "any version": start with the current objects
                cursor = kube._rv
                lines = [
                    {"type": "ADDED", "object": _render(res, obj)}
                    for key, obj in sorted(store.objects.items())
                    if namespace is None or key[0] == namespace
                ]
            else:
                cursor = int(requested)
                if cursor < store.floor:
                    message = f"too old resource version: {cursor} ({store.floor})"
                    if store.gone_as_http:
                        raise _ApiError(status(410, "Expired", message))
                    epoch = -1  # answered at once with the 410 event
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        ended = False
        while True:
            with kube._cond:
                while not lines and not ended:
                    if store.epoch != epoch:  # compacted: nothing more is delivered
                        ended = True
                        if epoch == -1 or not store.gone_as_http:
                            message = f"too old resource version: {cursor} ({store.floor})"
                            gone = status(410, "Expired", message)
                            lines.append({"type": "ERROR", "object": gone})
                        break
                    start = bisect.bisect_right(store.history_rvs, cursor)
                    for event in store.history[start:]:
                        if namespace is None or event.namespace == namespace:
                            lines.append({"type": event.type, "object": _render(res, event.obj)})
                    if store.history:
                        cursor = max(cursor, store.history_rvs[-1])
                    if bookmarks and kube._bookmarks != bookmark_seen:
                        bookmark_seen, cursor = kube._bookmarks, kube._rv
                        lines.append({"type": "BOOKMARK", "object": _bookmark(res, cursor)})
                    remaining = deadline - time.monotonic()
                    if lines:
                        break
                    # Pending events first, then an end: a closed watch loses nothing.
                    if kube._stopping or kube._closes != closes or remaining <= 0:
                        ended = True
                    elif self._peer_closed():
                        self.close_connection = True
                        return
                    else:
                        kube._cond.wait(min(remaining, 0.2))
            try:
                for line in lines:
                    data = json.dumps(line).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                lines = []
                if ended:
                    self.wfile.write(b"0\r\n\r\n")
                    return
            except OSError:
                self.close_connection = True
                return

    def _peer_closed(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True


def _route(path: str) -> tuple[str, str | None, str | None] | None:
    """``(resource, namespace or None, name or None)`` for a collection or object path."""
    for res in RESOURCES.values():
        if not path.startswith(f"{res.base}/"):
            continue
        parts = path[len(res.base) + 1 :].split("/")
        namespace = None
        if res.namespaced and len(parts) > 2 and parts[0] == "namespaces":
            namespace, parts = parts[1], parts[2:]
        if parts[0] == res.plural and len(parts) <= 2 and all(parts) and namespace != "":
            return res.plural, namespace, parts[1] if len(parts) == 2 else None
    return None


def _not_found(res: Resource, name: str) -> Obj:
    details = {"name": name, "kind": res.plural}
    return status(404, "NotFound", f'{res.plural} "{name}" not found', details)


def _render(res: Resource, obj: Obj, *, in_list: bool = False) -> Obj:
    if in_list and res.builtin:
        return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
    return {"kind": res.kind, "apiVersion": res.api_version, **obj}


def _bookmark(res: Resource, rv: int) -> Obj:
    # What the API server sends: an empty object of the kind, only the version set.
    obj: Obj = {
        "kind": res.kind,
        "apiVersion": res.api_version,
        "metadata": {"resourceVersion": str(rv), "creationTimestamp": None},
    }
    if res.plural == "pods":
        obj["spec"] = {"containers": None}
        obj["status"] = {}
    return obj


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _managed_field(res: Resource, now: str) -> Obj:
    return {
        "manager": "kubectl-client-side-apply",
        "operation": "Update",
        "apiVersion": res.api_version,
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:labels": {}}},
    }


# -- objects shaped as a kind cluster returns them ----------------------------------------
# The constant parts are as `kubectl get -o json` shows them on kind (v1.33).

KIND_NODES = {"kind-control-plane": "172.18.0.2", "kind-worker": "172.18.0.3"}
_CREATED = "2026-03-01T12:00:00Z"
_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.45"
_POD_SPEC = """{
  "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    {"downwardAPI": {"items": [{"path": "namespace",
      "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
  "containers": [{"name": "app", "image": "registry.k8s.io/e2e-test-images/agnhost:2.45",
    "args": ["netexec", "--http-port=8080"],
    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}], "resources": {},
    "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true,
      "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
    "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
    "imagePullPolicy": "IfNotPresent"}],
  "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
  "securityContext": {}, "schedulerName": "default-scheduler", "priority": 0,
  "tolerations": [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
     "tolerationSeconds": 300},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
     "tolerationSeconds": 300}],
  "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"}"""
_SERVICE_SPEC = """{"type": "ClusterIP", "sessionAffinity": "None", "ipFamilies": ["IPv4"],
  "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster"}"""


def namespace(name: str, labels: Mapping[str, str] | None = None) -> Obj:
    return {
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def service_account(name: str, namespace: str = "default") -> Obj:
    return {"metadata": {"name": name, "namespace": namespace}}


def pod(
    name: str,
    namespace: str = "default",
    ip: str | None = "10.244.1.5",
    node: str = "kind-worker",
    service_account: str = "default",
    labels: Mapping[str, str] | None = None,
    ready: bool = True,
    *,
    phase: str = "Running",
    host_network: bool = False,
) -> Obj:
    """A Deployment's pod as the kubelet reports it; ``ip=None`` for one not yet wired."""
    host_ip = KIND_NODES.get(node, "172.18.0.3")
    spec = json.loads(_POD_SPEC)
    spec.update(serviceAccountName=service_account, serviceAccount=service_account, nodeName=node)
    if host_network:
        spec["hostNetwork"] = True
        ip = host_ip  # a host-network pod has its node's address
    running = phase == "Running"
    is_ready = "True" if ready and running else "False"
    conditions: list[Obj] = [
        {"type": "PodReadyToStartContainers", "status": "True" if ip else "False"},
        {"type": "Initialized", "status": "True"},
        {"type": "Ready", "status": is_ready},
        {"type": "ContainersReady", "status": is_ready},
        {"type": "PodScheduled", "status": "True"},
    ]
    for c in conditions:
        c.update(lastProbeTime=None, lastTransitionTime=_CREATED)
        if c["status"] == "False" and c["type"] in ("Ready", "ContainersReady"):
            c.update(reason="ContainersNotReady", message="containers with unready status: [app]")
    state = {"running": {"startedAt": _CREATED}} if running else {"terminated": {"exitCode": 0}}
    status: Obj = {
        "phase": phase,
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": _CREATED,
        "containerStatuses": [
            {
                "name": "app",
                "state": state if ip else {"waiting": {"reason": "ContainerCreating"}},
                "lastState": {},
                "ready": is_ready == "True",
                "restartCount": 0,
                "image": _IMAGE,
                "imageID": _IMAGE.replace(":2.45", "@sha256:") + "7e8bdd27" * 8,
                "containerID": "containerd://" + uuid.uuid5(uuid.NAMESPACE_DNS, name).hex * 2,
                "started": running,
            }
        ],
        "qosClass": "BestEffort",
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "metadata": {
            "name": name,
            "generateName": name.rsplit("-", 1)[0] + "-",
            "namespace": namespace,
            "labels": dict(labels) if labels is not None else {"app": name.split("-")[0]},
        },
        "spec": spec,
        "status": status,
    }


def service(
    name: str,
    namespace: str = "default",
    cluster_ip: str = "10.96.0.10",
    ports: Sequence[int | tuple[int, int | str] | Obj] = (80,),
    selector: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Obj:
    """A ClusterIP service (``"None"``: headless); each port ``port`` or ``(port, targetPort)``."""
    spec_ports = []
    for p in ports:
        if isinstance(p, dict):
            spec_ports.append({"protocol": "TCP", "targetPort": p["port"], **p})
        else:
            port, target = (p, p) if isinstance(p, int) else p
            spec_ports.append(
                {"name": f"tcp-{port}", "protocol": "TCP", "port": port, "targetPort": target}
            )
    spec: Obj = {"ports": spec_ports, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip]}
    spec.update(json.loads(_SERVICE_SPEC))
    if selector is not None:
        spec["selector"] = dict(selector)
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(
    name: str,
    namespace: str,
    service: str,
    addresses: Sequence[str],
    *,
    not_ready: Sequence[str] = (),
    port: int = 80,
    node: str = "kind-worker",
) -> Obj:
    """An EndpointSlice as the controller writes it: one address per endpoint."""
    endpoints = [
        {
            "addresses": [address],
            "conditions": {"ready": ready, "serving": ready, "terminating": False},
            "nodeName": node,
        }
        for ready, group in ((True, addresses), (False, not_ready))
        for address in group
    ]
    return {
        "metadata": {
            "name": name,
            "generateName": f"{service}-",
            "namespace": namespace,
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": f"tcp-{port}", "protocol": "TCP", "port": port}],
    }


def authorization_policy(name: str, namespace: str, spec: Mapping[str, Any]) -> Obj:
    """An AuthorizationPolicy as ``kubectl apply`` leaves it."""
    applied = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"annotations": {}, "name": name, "namespace": namespace},
        "spec": spec,
    }
    annotation = {"kubectl.kubernetes.io/last-applied-configuration": json.dumps(applied) + "\n"}
    return {
        "metadata": {"name": name, "namespace": namespace, "annotations": annotation},
        "spec": copy.deepcopy(dict(spec)),
    }


def gateway(
    name: str, namespace: str, address: str | None, *, gateway_class: str = "istio-waypoint"
) -> Obj:
    """A waypoint Gateway after Istio has programmed it (``address=None``: not yet)."""
    status: Obj = {
        "conditions": [
            {
                "type": t,
                "status": "True" if address else "False",
                "reason": t if address else "Pending",
                "message": "Resource programmed" if address else "Waiting for the deployment",
                "observedGeneration": 1,
                "lastTransitionTime": _CREATED,
            }
            for t in ("Accepted", "Programmed")
        ]
    }
    if address:
        status["addresses"] = [{"type": "IPAddress", "value": address}]
    listener: Obj = {"name": "mesh", "port": 15008, "protocol": "HBONE"}
    listener["allowedRoutes"] = {"namespaces": {"from": "Same"}}
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"istio.io/waypoint-for": "service"},
        },
        "spec": {"gatewayClassName": gateway_class, "listeners": [listener]},
        "status": status,
    }
