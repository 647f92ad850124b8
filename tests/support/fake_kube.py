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

Writes, as the API server does them: PUT replaces (``409 Conflict`` when the
body's ``resourceVersion`` is not the current one), PATCH with
``application/merge-patch+json`` (RFC 7386; a ``resourceVersion`` in the
patch is a precondition) and, for built-in kinds only, strategic merge
patches, which are applied as merge patches (lists are replaced, not merged
by key: a difference from the real server); custom resources refuse strategic
merge with 415, as the real server does, and JSON patch and apply patch are
refused with 415 (not implemented here). Kinds with a status subresource keep
their status on writes to the object and take only the status from writes to
``/status`` (a pod its labels and annotations too, as the API server does).
DELETE honours ``preconditions`` and ``propagationPolicy``; the garbage
collector then deletes (or, for ``Orphan``, releases) the dependents
that named the deleted object in their ``ownerReferences`` and have no owner
left, at once rather than a moment later. On writes through the API, Services
and Deployments get the defaults the API server fills in, and a Service
without a ``clusterIP`` is given one (also when added by a test); lists and
watches take equality- and set-based label selectors and field selectors
(``metadata.name``, ``metadata.namespace``, and a pod's ``spec.nodeName`` and
the other fields the API server selects pods by), and a selected watch
reports an object that stops (starts) matching as DELETED (ADDED). Leases
(``coordination.k8s.io/v1``) are checked as the API server checks them: their
``acquireTime`` and ``renewTime`` are ``metav1.MicroTime``, which it parses
with exactly six fractional digits (400 otherwise: what the official Python
client's own serialization of a whole-second datetime earns), and
``leaseDurationSeconds`` must be positive (422).

Tests steer it: ``add``/``update``/``delete`` objects, ``send_bookmark``,
``expire``, ``close_watches``, ``fail_next``, ``refusing`` (one client's requests
fail while the others' are served), ``before`` (another client's write between
two requests), ``writes`` (the write requests served, each with the bearer
token that made it), and a token table for TokenReviews.
"""

from __future__ import annotations

import bisect
import copy
import ipaddress
import json
import re
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
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    plural: str
    group: str
    version: str
    kind: str
    namespaced: bool = True
    status: bool = True  # has a status subresource

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
        Resource("serviceaccounts", "", "v1", "ServiceAccount", status=False),
        Resource("secrets", "", "v1", "Secret", status=False),
        Resource("configmaps", "", "v1", "ConfigMap", status=False),
        Resource("endpointslices", "discovery.k8s.io", "v1", "EndpointSlice", status=False),
        Resource("deployments", "apps", "v1", "Deployment"),
        Resource("authorizationpolicies", "security.istio.io", "v1", "AuthorizationPolicy"),
        Resource("gateways", "gateway.networking.k8s.io", "v1", "Gateway"),
        Resource("httproutes", "gateway.networking.k8s.io", "v1", "HTTPRoute"),
        Resource("grpcroutes", "gateway.networking.k8s.io", "v1", "GRPCRoute"),
        Resource("virtualservices", "networking.istio.io", "v1", "VirtualService"),
        Resource("destinationrules", "networking.istio.io", "v1", "DestinationRule"),
        Resource("leases", "coordination.k8s.io", "v1", "Lease", status=False),
    )
}
# Kinds whose metadata.generation counts changes to what they ask for.
GENERATION = {"deployments"}
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
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
    content_type: str = ""
    body: bytes = b""
    token: str = ""  # the bearer token it carried: which client made it

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

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
    old: Obj | None = None  # the object before (MODIFIED), for selected watches


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

    def __init__(
        self,
        *,
        missing: Sequence[str] = (),
        first_resource_version: int = 1000,
        garbage_collector: bool = True,
    ) -> None:
        self._cond = threading.Condition(threading.RLock())
        # False: a cluster whose garbage collector is not running (kube-controller-manager
        # down): dependents stay until someone else deletes them.
        self.garbage_collector = garbage_collector
        self._rv = first_resource_version
        self._stores = {name: _Store(missing=name in missing) for name in RESOURCES}
        self._bookmarks = 0
        self._closes = 0
        self._fail_next = 0
        self._refused: list[tuple[str, str | None]] = []  # (token, resource or None: any)
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
        """Create ``obj``; the server fills uid, resourceVersion and timestamps (and a
        Service's clusterIP when it has none)."""
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
            if not res.builtin or resource in GENERATION:
                meta.setdefault("generation", 1)
            meta.setdefault("managedFields", [_managed_field(res, now)])
            if resource == "services":
                self._allocate_cluster_ip(obj)
            added = self._record(resource, "ADDED", key, obj)
            self._collect(resource, key)
            return added

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
            updated = self._record(resource, "MODIFIED", key, obj)
            self._collect(resource, key)
            return updated

    def delete(self, resource: str, obj: Obj) -> None:
        """Delete by the object's namespace/name (a DELETED event with the last state); the
        garbage collector then deletes its dependents."""
        meta = obj["metadata"]
        namespace = meta.get("namespace", "default") if RESOURCES[resource].namespaced else ""
        with self._cond:
            self._delete(resource, (namespace, meta["name"]), "Background")

    def get(self, resource: str, name: str, namespace: str = "") -> Obj:
        with self._cond:
            return copy.deepcopy(self._stores[resource].objects[(namespace, name)])

    def find(self, resource: str, name: str, namespace: str = "") -> Obj | None:
        """The object, or None when there is none."""
        with self._cond:
            obj = self._stores[resource].objects.get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def _record(self, resource: str, kind: str, key: tuple[str, str], obj: Obj) -> Obj:
        store = self._stores[resource]
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        old = store.objects.get(key)
        if kind == "DELETED":
            del store.objects[key]
        else:
            store.objects[key] = obj
        store.history.append(_Event(self._rv, kind, key[0], obj, old))
        store.history_rvs.append(self._rv)
        self._cond.notify_all()
        return copy.deepcopy(obj)

    def _delete(self, resource: str, key: tuple[str, str], propagation: str) -> Obj:
        """Under the lock: delete, then collect the garbage (Background and Foreground alike:
        the dependents go at once; Orphan: they lose their reference to the deleted object)."""
        last = copy.deepcopy(self._stores[resource].objects[key])
        self._record(resource, "DELETED", key, last)
        if not self.garbage_collector:
            return last
        uid = last["metadata"].get("uid")
        for name, store in self._stores.items():
            for dep_key in list(store.objects):
                dep = store.objects.get(dep_key)
                if dep is None:  # gone earlier in this sweep
                    continue
                refs = dep["metadata"].get("ownerReferences") or []
                if not any(r.get("uid") == uid for r in refs):
                    continue
                rest = [r for r in refs if r.get("uid") != uid]
                if propagation != "Orphan" and not any(self._exists(r.get("uid")) for r in rest):
                    self._delete(name, dep_key, propagation)
                    continue
                changed = copy.deepcopy(dep)
                if rest:
                    changed["metadata"]["ownerReferences"] = rest
                else:
                    changed["metadata"].pop("ownerReferences", None)
                self._record(name, "MODIFIED", dep_key, changed)
        return last

    def _collect(self, resource: str, key: tuple[str, str]) -> None:
        """Under the lock: what the garbage collector does with an object whose owners are
        all absent (created after its owner was deleted, or naming one that never was)."""
        obj = self._stores[resource].objects.get(key)
        refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
        if self.garbage_collector and refs and not any(self._exists(r.get("uid")) for r in refs):
            self._delete(resource, key, "Background")

    def _exists(self, uid: object) -> bool:
        return any(
            o["metadata"].get("uid") == uid
            for st in self._stores.values()
            for o in st.objects.values()
        )

    def _allocate_cluster_ip(self, obj: Obj) -> None:
        """What the API server's allocator does for a Service without a clusterIP."""
        spec = obj.setdefault("spec", {})
        if spec.get("type") == "ExternalName" or spec.get("clusterIP"):
            if spec.get("clusterIP") and not spec.get("clusterIPs"):
                spec["clusterIPs"] = [spec["clusterIP"]]
            return
        taken = {
            ip
            for o in self._stores["services"].objects.values()
            for ip in (o.get("spec") or {}).get("clusterIPs")
            or [(o.get("spec") or {}).get("clusterIP")]
        }
        # From the top half of the range: the tests' fixed addresses are in the bottom.
        for offset in range(SERVICE_CIDR.num_addresses // 2 + 1, SERVICE_CIDR.num_addresses - 1):
            candidate = str(SERVICE_CIDR.network_address + offset)
            if candidate not in taken:
                spec["clusterIP"], spec["clusterIPs"] = candidate, [candidate]
                return
        raise _ApiError(status(500, "InternalError", "range is full"))

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

    @contextmanager
    def refusing(self, token: str, resource: str | None = None) -> Iterator[None]:
        """While inside, every request bearing ``token`` (to ``resource``, or to any) fails
        with 500, as an API server that cannot reach etcd answers; other clients are served."""
        entry = (token, resource)
        with self._cond:
            self._refused.append(entry)
        try:
            yield
        finally:
            with self._cond:
                self._refused.remove(entry)

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

    def writes(self, resource: str | None = None) -> list[Request]:
        """The write requests served (POST, PUT, PATCH, DELETE; not TokenReviews), in order."""
        with self._cond:
            requests = list(self.requests)
        return [
            r
            for r in requests
            if r.method in ("POST", "PUT", "PATCH", "DELETE")
            and r.path != TOKEN_REVIEWS
            and (resource is None or ((route := _route(r.path)) and route.resource == resource))
        ]

    def list_requests(self, resource: str) -> list[Request]:
        return [r for r in self._matching(resource) if r.method == "GET" and not r.watch]

    def watch_requests(self, resource: str) -> list[Request]:
        return [r for r in self._matching(resource) if r.watch]

    def _matching(self, resource: str) -> list[Request]:
        """Requests to a collection of ``resource``, not to one of its objects."""
        with self._cond:
            requests = list(self.requests)
        routes = [(r, _route(r.path)) for r in requests]
        return [r for r, route in routes if route and route.resource == resource and not route.name]

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
                selects = _selects(resource, query)
                items = [
                    copy.deepcopy(obj)
                    for key, obj in sorted(store.objects.items())
                    if (namespace is None or key[0] == namespace) and selects(obj)
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
        _validate(res, body)
        _defaults(resource, body)
        with self._cond:
            try:
                return _render(res, self.add(resource, body))
            except KeyError:
                raise _ApiError(_already_exists(res, name)) from None

    def _write(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        subresource: str,
        change: Callable[[Obj], Obj],
    ) -> Obj:
        """PUT and PATCH: ``change`` turns the stored object into the new one; the server
        checks the precondition, keeps what a client may not change, and records it."""
        res = RESOURCES[resource]
        key = (namespace or "", name)
        with self._cond:
            current = self._stores[resource].objects.get(key)
            if current is None:
                raise _ApiError(_not_found(res, name))
            new = change(copy.deepcopy(current))
            meta = new.setdefault("metadata", {})
            old_meta = current["metadata"]
            wanted_rv = meta.get("resourceVersion")
            if wanted_rv and wanted_rv != old_meta["resourceVersion"]:
                raise _ApiError(_conflict(res, name))
            if meta.get("name", name) != name or meta.get("namespace", key[0]) != key[0]:
                raise _ApiError(status(400, "BadRequest", "the name of the object does not match"))
            new.pop("kind", None)
            new.pop("apiVersion", None)
            _validate(res, new)
            if subresource == "status":
                # Only the status changes through /status; for a pod its metadata too
                # (Kubernetes' podStatusStrategy resets only the spec and ownerReferences),
                # which is how istio-cni annotates pods with pods/status rights alone.
                taken = {**copy.deepcopy(current), "status": new.get("status") or {}}
                if resource == "pods":
                    taken["metadata"] = {
                        **new.get("metadata", {}),
                        **{k: v for k, v in old_meta.items() if k in _POD_STATUS_KEEPS},
                    }
                    for k in _POD_STATUS_KEEPS - set(old_meta):
                        taken["metadata"].pop(k, None)
                new = taken
            else:
                if res.status:
                    new["status"] = copy.deepcopy(current.get("status") or {})
                    if "status" not in current:
                        new.pop("status")
                for kept in ("uid", "creationTimestamp", "managedFields", "generation"):
                    if kept in old_meta:
                        meta[kept] = old_meta[kept]
                    else:
                        meta.pop(kept, None)
                meta["name"] = name
                if res.namespaced:
                    meta["namespace"] = key[0]
                _defaults(resource, new)
                if resource == "services":
                    _keep_cluster_ip(current, new)
                asked = {k: v for k, v in new.items() if k not in ("metadata", "status")}
                before = {k: v for k, v in current.items() if k not in ("metadata", "status")}
                if "generation" in old_meta and asked != before:
                    meta["generation"] = old_meta["generation"] + 1
            new["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
            if new == current:
                return _render(res, copy.deepcopy(current))  # a no-op write: no new version
            written = self._record(resource, "MODIFIED", key, new)
            self._collect(resource, key)
            return _render(res, written)

    def _replace(
        self, resource: str, namespace: str | None, name: str, subresource: str, body: Obj
    ) -> Obj:
        return self._write(resource, namespace, name, subresource, lambda _: body)

    def _patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        subresource: str,
        body: Obj,
        content_type: str,
    ) -> Obj:
        res = RESOURCES[resource]
        media = content_type.split(";")[0].strip().lower()
        if media == STRATEGIC_MERGE_PATCH and not res.builtin:
            raise _ApiError(
                status(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media types "
                    f"include: application/json-patch+json, {MERGE_PATCH}, "
                    "application/apply-patch+yaml",
                )
            )
        if media not in (MERGE_PATCH, STRATEGIC_MERGE_PATCH):
            raise _ApiError(
                status(415, "UnsupportedMediaType", f"fake_kube does not implement {media!r}")
            )
        if not isinstance(body, dict):
            raise _ApiError(status(400, "BadRequest", "a merge patch must be a JSON object"))
        return self._write(resource, namespace, name, subresource, lambda obj: _merge(obj, body))

    def _delete_request(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        options: Obj,
        query: Mapping[str, str],
    ) -> Obj:
        res = RESOURCES[resource]
        key = (namespace or "", name)
        propagation = options.get("propagationPolicy") or query.get("propagationPolicy")
        with self._cond:
            current = self._stores[resource].objects.get(key)
            if current is None:
                raise _ApiError(_not_found(res, name))
            pre = options.get("preconditions") or {}
            meta = current["metadata"]
            for field_name in ("uid", "resourceVersion"):
                if pre.get(field_name) and pre[field_name] != meta.get(field_name):
                    raise _ApiError(
                        status(
                            409,
                            "Conflict",
                            f'Operation cannot be fulfilled on {_qualified(res)} "{name}": '
                            f"Precondition failed: {field_name.title()} in precondition: "
                            f"{pre[field_name]}, {field_name.title()} in object meta: "
                            f"{meta.get(field_name)}",
                            {"name": name, "group": res.group, "kind": res.plural},
                        )
                    )
            self._delete(resource, key, str(propagation or "Background"))
        details = {"name": name, "group": res.group, "kind": res.plural, "uid": meta.get("uid")}
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

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

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        kube = self.server.kube
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        content_type = self.headers.get("Content-Type") or ""
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        request = Request(method, url.path, query, content_type, body, token)
        route = _route(url.path)
        with kube._cond:
            hook = next(
                (h for h in kube._before if route and h[:2] == (method, route.resource)), None
            )
            if hook is not None:
                kube._before.remove(hook)
        if hook is not None:
            hook[2]()
        with kube._cond:
            kube.requests.append(request)
            failing = kube._fail_next > 0
            kube._fail_next -= failing
            failing = failing or any(
                t == token and r in (None, route and route.resource) for t, r in kube._refused
            )
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
            if (
                route is None
                or kube._stores[route.resource].missing
                or (route.subresource and not RESOURCES[route.resource].status)
            ):
                raise _ApiError(
                    status(404, "NotFound", "the server could not find the requested resource")
                )
            resource, namespace, name, sub = route
            try:
                decoded = json.loads(body) if body else {}
            except ValueError:
                raise _ApiError(status(400, "BadRequest", "the body is not JSON")) from None
            if method == "POST" and not name:
                self._send_json(201, kube._create(resource, namespace, decoded))
            elif method == "GET" and name:
                self._send_json(200, kube._get_one(resource, namespace, name))
            elif method == "GET" and request.watch:
                self._watch(resource, namespace, query)
            elif method == "GET":
                self._send_json(200, kube._list(resource, namespace, query))
            elif method == "PUT" and name:
                self._send_json(200, kube._replace(resource, namespace, name, sub, decoded))
            elif method == "PATCH" and name:
                self._send_json(
                    200, kube._patch(resource, namespace, name, sub, decoded, content_type)
                )
            elif method == "DELETE" and name and not sub:
                self._send_json(
                    200, kube._delete_request(resource, namespace, name, decoded, query)
                )
            else:
                raise _ApiError(status(405, "MethodNotAllowed", f"{method} is not supported"))
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
        selects = _selects(resource, query)
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
                    if (namespace is None or key[0] == namespace) and selects(obj)
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
                        if namespace is not None and event.namespace != namespace:
                            continue
                        seen = _selected_as(event, selects)
                        if seen is not None:
                            lines.append({"type": seen, "object": _render(res, event.obj)})
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


class _Route(NamedTuple):
    resource: str
    namespace: str | None
    name: str | None
    subresource: str  # "status", or "" for the object itself


def _route(path: str) -> _Route | None:
    """The resource, namespace, name and subresource a collection or object path names."""
    for res in RESOURCES.values():
        if not path.startswith(f"{res.base}/"):
            continue
        parts = path[len(res.base) + 1 :].split("/")
        namespace = None
        if res.namespaced and len(parts) > 2 and parts[0] == "namespaces":
            namespace, parts = parts[1], parts[2:]
        if parts[0] != res.plural or not all(parts) or namespace == "":
            continue
        if len(parts) <= 2:
            return _Route(res.plural, namespace, parts[1] if len(parts) == 2 else None, "")
        if len(parts) == 3 and parts[2] == "status":
            return _Route(res.plural, namespace, parts[1], "status")
    return None


def _selected_as(event: _Event, selects: Callable[[Obj], bool]) -> str | None:
    """How a watch with a label selector reports an event: an object that starts matching
    is ADDED, one that stops is DELETED, one that never matched is not reported."""
    now = selects(event.obj)
    before = event.old is not None and selects(event.old)
    if event.type == "MODIFIED":
        if before and now:
            return "MODIFIED"
        return "ADDED" if now else ("DELETED" if before else None)
    return event.type if now else None


_REQUIREMENT = re.compile(
    r"\s*(?:(?P<not>!)\s*(?P<absent>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)"
    r"|\s+(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?)\s*(?:,|$)"
)


# What a write to pods/status may not change in a pod's metadata.
_POD_STATUS_KEEPS = frozenset(
    {"name", "namespace", "uid", "creationTimestamp", "managedFields", "ownerReferences"}
    | {"deletionTimestamp", "generation"}
)
# The fields each kind can be selected by besides metadata.name and metadata.namespace
# (the API server refuses others with 400).
_FIELDS = {
    "pods": frozenset(
        {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.hostNetwork"}
        | {"spec.serviceAccountName", "status.phase", "status.podIP"}
        | {"status.nominatedNodeName"}
    ),
}


def _selects(resource: str, query: Mapping[str, str]) -> Callable[[Obj], bool]:
    """The request's label and field selectors, both."""
    labels = _selector(query.get("labelSelector") or "")
    fields = _field_selector(resource, query.get("fieldSelector") or "")
    return lambda obj: labels(obj) and fields(obj)


def _field_selector(resource: str, text: str) -> Callable[[Obj], bool]:
    """A field selector (``spec.nodeName=n,status.phase!=Failed``) as a predicate."""
    terms: list[tuple[str, bool, str]] = []  # (field, equal?, value)
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", part)
        if m is None:
            message = f"invalid selector: '{text}'; can't understand '{part}'"
            raise _ApiError(status(400, "BadRequest", message))
        name, op, value = m.groups()
        if name not in {"metadata.name", "metadata.namespace"} | _FIELDS.get(resource, set()):
            raise _ApiError(status(400, "BadRequest", f"field label not supported: {name}"))
        terms.append((name, op != "!=", value))

    def value_of(obj: Obj, name: str) -> str:
        at: Any = obj
        for part in name.split("."):
            at = at.get(part) if isinstance(at, dict) else None
        if isinstance(at, bool):
            return "true" if at else "false"
        return "" if at is None else str(at)

    return lambda obj: all((value_of(obj, name) == value) == eq for name, eq, value in terms)


def _selector(text: str) -> Callable[[Obj], bool]:
    """A label selector (``a=b,c!=d,e,!f,g in (h,i),j notin (k)``) as a predicate."""
    requirements: list[tuple[str, str, frozenset[str]]] = []  # (operator, key, values)
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _REQUIREMENT.match(text, pos)
        if m is None or m.end() == pos:
            raise _ApiError(
                status(400, "BadRequest", f"unable to parse requirement: {text[pos:]!r}")
            )
        pos = m.end()
        if m["absent"]:
            requirements.append(("!", m["absent"], frozenset()))
        elif m["op"]:
            requirements.append(
                ("!=" if m["op"] == "!=" else "=", m["key"], frozenset([m["value"]]))
            )
        elif m["set"]:
            values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
            requirements.append((m["set"], m["key"], values))
        else:
            requirements.append(("exists", m["key"], frozenset()))

    def holds(op: str, key: str, values: frozenset[str], labels: Mapping[str, str]) -> bool:
        if op == "!":
            return key not in labels
        if op == "exists":
            return key in labels
        if op in ("=", "in"):
            return labels.get(key) in values
        return labels.get(key) not in values  # != and notin: true when the label is absent

    def selects(obj: Obj) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(holds(op, key, values, labels) for op, key, values in requirements)

    return selects


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def _defaults(resource: str, obj: Obj) -> None:
    """The defaults the API server fills in on a write (the ones a controller sees back)."""
    spec = obj.setdefault("spec", {}) if resource in ("services", "deployments") else None
    if resource == "services" and spec is not None:
        for k, v in json.loads(_SERVICE_SPEC).items():
            spec.setdefault(k, v)
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
        obj.setdefault("status", {"loadBalancer": {}})
    elif resource == "deployments" and spec is not None:
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault(
            "strategy",
            {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
            },
        )
        template = spec.setdefault("template", {})
        template.setdefault("metadata", {}).setdefault("creationTimestamp", None)
        pod = template.setdefault("spec", {})
        for k, v in (
            ("restartPolicy", "Always"),
            ("terminationGracePeriodSeconds", 30),
            ("dnsPolicy", "ClusterFirst"),
            ("securityContext", {}),
            ("schedulerName", "default-scheduler"),
        ):
            pod.setdefault(k, v)
        if pod.get("serviceAccountName"):
            pod.setdefault("serviceAccount", pod["serviceAccountName"])  # the deprecated alias
        for c in pod.get("containers") or []:
            c.setdefault("resources", {})
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            latest = ":" not in str(c.get("image", "")).rsplit("/", 1)[-1] or str(
                c.get("image", "")
            ).endswith(":latest")
            c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
            for port in c.get("ports") or []:
                port.setdefault("protocol", "TCP")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in c:
                    p = c[probe]
                    for k, v in (
                        ("timeoutSeconds", 1),
                        ("periodSeconds", 10),
                        ("successThreshold", 1),
                        ("failureThreshold", 3),
                    ):
                        p.setdefault(k, v)
                    if "httpGet" in p:
                        p["httpGet"].setdefault("scheme", "HTTP")
        for volume in pod.get("volumes") or []:
            for source in ("configMap", "secret", "projected", "downwardAPI"):
                if source in volume:
                    volume[source].setdefault("defaultMode", 420)
            for part in (volume.get("projected") or {}).get("sources") or []:
                if "serviceAccountToken" in part:
                    part["serviceAccountToken"].setdefault("expirationSeconds", 3600)


# metav1.MicroTime's one accepted form (RFC3339Micro: "2006-01-02T15:04:05.000000Z07:00").
_MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)")


def _validate(res: Resource, obj: Obj) -> None:
    """What the API server refuses in a written object (of the kinds checked here: Lease)."""
    if res.plural != "leases":
        return
    spec = obj.get("spec") or {}
    for name in ("acquireTime", "renewTime"):
        value = spec.get(name)
        if value is not None and not (isinstance(value, str) and _MICRO_TIME.fullmatch(value)):
            raise _ApiError(
                status(
                    400,
                    "BadRequest",
                    f'Lease in version "v1" cannot be handled as a Lease: parsing time '
                    f'"{value}" as "2006-01-02T15:04:05.000000Z07:00": cannot parse',
                )
            )
    invalid = []
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and (not isinstance(duration, int) or duration <= 0):
        invalid.append(f"spec.leaseDurationSeconds: Invalid value: {duration}: must be positive")
    transitions = spec.get("leaseTransitions")
    if transitions is not None and (not isinstance(transitions, int) or transitions < 0):
        invalid.append(f"spec.leaseTransitions: Invalid value: {transitions}: must be >= 0")
    if invalid:
        lease = (obj.get("metadata") or {}).get("name")
        message = f'Lease.coordination.k8s.io "{lease}" is invalid: ' + ", ".join(invalid)
        raise _ApiError(status(422, "Invalid", message))


def _keep_cluster_ip(current: Obj, new: Obj) -> None:
    """A Service keeps its clusterIP when a write leaves it out, and may not change it."""
    old_spec, spec = current.get("spec") or {}, new.setdefault("spec", {})
    for field_name in ("clusterIP", "clusterIPs"):
        if field_name in old_spec and not spec.get(field_name):
            spec[field_name] = copy.deepcopy(old_spec[field_name])
    if old_spec.get("clusterIP") and spec.get("clusterIP") != old_spec["clusterIP"]:
        name = current["metadata"]["name"]
        raise _ApiError(
            status(
                422,
                "Invalid",
                f'Service "{name}" is invalid: spec.clusterIPs[0]: Invalid value: '
                f'["{spec.get("clusterIP")}"]: may not change once set',
            )
        )


def _qualified(res: Resource) -> str:
    return f"{res.plural}.{res.group}" if res.group else res.plural


def _conflict(res: Resource, name: str) -> Obj:
    message = (
        f'Operation cannot be fulfilled on {_qualified(res)} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again"
    )
    details = {"name": name, "group": res.group, "kind": res.plural}
    return status(409, "Conflict", message, details)


def _already_exists(res: Resource, name: str) -> Obj:
    details = {"name": name, "group": res.group, "kind": res.plural}
    return status(409, "AlreadyExists", f'{_qualified(res)} "{name}" already exists', details)


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
