"""The objects of every kind, as the API server's storage keeps them: resourceVersions, the
event history the watches read, compaction, and the garbage collector."""

from __future__ import annotations

import copy
import ipaddress
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.support.fake_kube.errors import ApiError, status
from tests.support.fake_kube.resources import GENERATION, RESOURCES, Obj
from tests.support.fake_kube.strategy import managed_field, utc_now

SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")


@dataclass
class Event:
    rv: int
    type: str
    namespace: str
    obj: Obj
    old: Obj | None = None  # the object before (MODIFIED), for selected watches


@dataclass
class ResourceStore:
    objects: dict[tuple[str, str], Obj] = field(default_factory=dict)
    history: list[Event] = field(default_factory=list)
    history_rvs: list[int] = field(default_factory=list)
    floor: int = 0  # watches from below this version are answered 410 Gone
    gone_as_http: bool = False
    epoch: int = 0  # bumped by expire(): open watches end
    missing: bool = False  # the CRD is not installed: 404


class Store:
    """Every kind's objects and history under one lock, and the controls on them."""

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
        self._stores = {name: ResourceStore(missing=name in missing) for name in RESOURCES}
        self._bookmarks = 0
        self._closes = 0
        self._continues: dict[str, tuple[int, str, list[Obj]]] = {}

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
            now = utc_now()
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now)
            if not res.builtin or resource in GENERATION:
                meta.setdefault("generation", 1)
            meta.setdefault("managedFields", [managed_field(res, now)])
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
        store.history.append(Event(self._rv, kind, key[0], obj, old))
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
        raise ApiError(status(500, "InternalError", "range is full"))

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._rv)

    # -- watch controls --------------------------------------------------------------------

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
