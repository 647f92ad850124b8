"""The waypoint deployer: each waypoint Gateway's instance on Kubernetes, and its status.

For every Gateway of class ``istio-waypoint`` it keeps, as Istio's deployment
controller does (``pilot/pkg/config/kube/gateway/deploymentcontroller.go``
and the ``waypoint.yaml`` template), three objects named after the Gateway:

* a ServiceAccount, the waypoint's identity;
* a Deployment whose pods run our image's ``waypoint`` command, labelled as
  meshlab labels waypoint pods (:mod:`meshlab.waypoints`), with the mesh root
  (the ``istio-ca-root-cert`` ConfigMap, which the deployer writes into every
  namespace but Kubernetes' own, as istiod's namespace controller does) and a
  projected service-account token of audience ``istio-ca`` for meshd's CA;
* a Service (15008 ``mesh``, 15021 ``status-port``, 15020 ``metrics``)
  selecting those pods.

All three carry the label ``gateway.istio.io/managed=istio.io-mesh-controller``
and an owner reference to the Gateway (``controller: true``,
``blockOwnerDeletion: true``), so Kubernetes' garbage collector deletes them
with it. The deployer deletes them itself when the Gateway is no longer of
the class (at once), or is gone and the garbage collector has not deleted them
within ``orphan_grace_s`` (it is the GC's job first, and
``--cascade=orphan`` must keep them). Then it writes the
Gateway's ``status`` (the Service's cluster IPs as ``addresses``, and the
conditions meshd computes) and the routes' ``status.parents`` through the
status subresource, only when they change (:mod:`controlplane.kube_status`).

*Decide, then do*: the objects are rendered by pure functions
(:mod:`controlplane.kube_waypoints`); an object is updated only when the live
one does not already hold every field we set (``covers``: the API server's
defaults and other controllers' additions are not differences), with a JSON
merge patch of exactly those fields. What the deployer knows of the live
objects comes from its own informers (list+watch, label-selected), so a
deleted or edited child is repaired at once and an unchanged world costs no
request. :meth:`WaypointDeployer.reconcile` is one pass (blocking: the
official client blocks); :meth:`WaypointDeployer.run` runs the informers and
calls it, in a thread, on every change and every ``resync_s``.

With several meshd replicas only one may write (:mod:`controlplane.leader`):
given an election, the deployer reconciles only while this replica leads,
and each write asks the election first, so a pass that outlives the
leadership stops at its next write (the new leader redoes what is left).
Every replica keeps its informers running, so a new leader knows the
cluster at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import kubernetes.client
import yaml
from kubernetes.client.exceptions import ApiException

from controlplane import kube_status
from controlplane.kube_waypoints import (
    GATEWAY_API,
    GATEWAY_NAME,
    ISTIO_CONFIG_LABEL,
    DeployerSettings,
    GatewayRef,
    covers,
    instance_objects,
    now_rfc3339,
    replicas_of,
    root_cert_config_map,
)
from controlplane.l7.build import L7Result, build
from controlplane.l7.gateway_api import is_waypoint, parse_gateway
from controlplane.l7.reader import InvalidObject
from controlplane.l7.status import ObjectStatus
from controlplane.leader import NotLeading, WriteGate
from controlplane.sources.kube_convert import as_written
from controlplane.sources.kube_informer import Entry, Informer, Key, Kind, error_reason
from controlplane.state import MANAGED, MANAGED_VALUE, SourceState

log = logging.getLogger(__name__)
MERGE_PATCH = "application/merge-patch+json"
Obj = dict[str, Any]

# -- the API server ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Api:
    """Where each kind lives: the collection path's prefix and plural."""

    prefix: str  # "/api/v1" or "/apis/<group>/<version>"
    plural: str

    def path(self, namespace: str, name: str = "", sub: str = "") -> str:
        out = f"{self.prefix}/namespaces/{namespace}/{self.plural}"
        return out + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


APIS = {
    "ServiceAccount": _Api("/api/v1", "serviceaccounts"),
    "Service": _Api("/api/v1", "services"),
    "ConfigMap": _Api("/api/v1", "configmaps"),
    "Deployment": _Api("/apis/apps/v1", "deployments"),
    "Gateway": _Api(f"/apis/{GATEWAY_API}", "gateways"),
    "HTTPRoute": _Api(f"/apis/{GATEWAY_API}", "httproutes"),
    "GRPCRoute": _Api(f"/apis/{GATEWAY_API}", "grpcroutes"),
}
_MANAGED_SELECTOR = f"{MANAGED}={MANAGED_VALUE}"
_CORE = "CoreV1Api"
_ALL = "_for_all_namespaces"
_KINDS = {
    "Gateway": Kind("gateways", "gateway", "CustomObjectsApi", "list_cluster_custom_object",
                    as_written, ("gateway.networking.k8s.io", "v1", "gateways"), True),
    "ServiceAccount": Kind("serviceaccounts", "serviceaccount", _CORE,
                           f"list_service_account{_ALL}", as_written, selector=_MANAGED_SELECTOR),
    "Service": Kind("services", "service", _CORE, f"list_service{_ALL}", as_written,
                    selector=_MANAGED_SELECTOR),
    "Deployment": Kind("deployments", "deployment", "AppsV1Api", f"list_deployment{_ALL}",
                       lambda o: {k: v for k, v in as_written(o).items() if k != "status"},
                       selector=_MANAGED_SELECTOR),
    "ConfigMap": Kind("configmaps", "configmap", _CORE, f"list_config_map{_ALL}", as_written,
                      selector=f"{ISTIO_CONFIG_LABEL}=true"),
}  # fmt: skip
CHILD_KINDS = ("ServiceAccount", "Deployment", "Service")
# Kubernetes' own namespaces, which istiod leaves alone too (inject.IgnoredNamespaces).
ROOT_CERT_SKIPPED = frozenset(
    {"kube-system", "kube-public", "kube-node-lease", "local-path-storage"}
)
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10.0, 30.0
STATUS_ATTEMPTS = 3


def _request(
    client: kubernetes.client.ApiClient,
    method: str,
    path: str,
    body: Any = None,
    *,
    content_type: str = "application/json",
) -> Obj:
    """One request, its JSON answer; an ApiException for any status but 2xx."""
    serialized = client.param_serialize(
        method=method,
        resource_path=path,
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    response = client.call_api(*serialized, _request_timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    data: bytes = response.read()  # type: ignore[no-untyped-call]
    if not 200 <= response.status <= 299:
        raise ApiException(
            status=response.status, reason=response.reason, body=data.decode(errors="replace")
        )
    return dict(json.loads(data or b"{}"))


@dataclass(slots=True)
class ReconcileReport:
    """What one pass did (``writes``: one line per write) and what it could not do."""

    writes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # tried again soon, with a backoff
    conflicts: list[str] = field(default_factory=list)  # someone else's objects: not retried
    again_in_s: float | None = None  # something is due later (an orphan's grace ends)
    not_leading: bool = False  # stopped (or never started): another replica leads


# -- the deployer -----------------------------------------------------------------------------


class WaypointDeployer:
    """Makes and keeps the instances of waypoint Gateways, and writes their status.

    ``root_cert`` returns the mesh root (PEM) for the ``istio-ca-root-cert``
    ConfigMap, or None when meshd serves no CA (then the ConfigMap is not
    written and the pods wait for someone else's). ``leader``: the election
    that decides whether this replica may write (None: it always may).
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        settings: DeployerSettings | None = None,
        *,
        root_cert: Callable[[], str | None] = lambda: None,
        leader: WriteGate | None = None,
        logger: logging.Logger = log,
        clock: Callable[[], str] = now_rfc3339,
        watch_timeout_s: int = 300,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 30.0,
        stop_timeout_s: float = 2.0,
    ) -> None:
        self.api_client = api_client
        self.settings = settings or DeployerSettings()
        self.log = logger
        self.log_name = "waypoint deployer"
        self.stopping = threading.Event()
        self.watch_timeout_s = watch_timeout_s
        self.list_page_size = 500
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stop_timeout_s = stop_timeout_s
        self.root_cert = root_cert
        self.leader = leader
        self._clock = clock
        # Written by the informer threads and by reconcile (its own answers): under _lock.
        self._lock = threading.Lock()
        self._stores: dict[str, dict[Key, Entry]] = {k.name: {} for k in _KINDS.values()}
        self._pending: dict[tuple[str, Key], Entry] = {}  # our writes, not yet watched back
        self._synced: set[str] = set()
        # Handed over by meshd on the loop; read by reconcile.
        self._state: SourceState | None = None
        self._l7: L7Result | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # reconcile's own memory (one pass at a time).
        self._params: dict[tuple[str, str, int], int | None] = {}  # (ns, name, generation)
        self._said: set[str] = set()
        self._orphans: dict[tuple[Any, ...], float] = {}  # first seen without its Gateway
        self._foreign: dict[tuple[str, str, str], str] = {}  # (kind, ns, name): not ours
        self.passes = 0
        self._new_term = False
        if leader is not None:
            leader.listen(self._leadership)

    # -- meshd's side --------------------------------------------------------------------------

    def offer(self, state: SourceState, l7: L7Result | None = None) -> None:
        """A new state (and meshd's L7 result for it): reconcile soon. Call on the loop."""
        self._state, self._l7 = state, l7
        self._wake.set()

    @property
    def state(self) -> SourceState | None:
        """The latest state offered."""
        return self._state

    def leads(self) -> bool:
        """Whether this replica may write now."""
        return self.leader is None or self.leader.leading()

    @property
    def synced(self) -> bool:
        with self._lock:
            return len(self._synced) == len(_KINDS)

    def objects(self, kind: str) -> list[Obj]:
        """The live objects of ``kind`` the deployer follows (its own, and the Gateways),
        with its own writes that the watch has not brought back yet."""
        name = _KINDS[kind].name
        with self._lock:
            entries = dict(self._stores[name])
            entries.update({k: e for (n, k), e in self._pending.items() if n == name})
            return [dict(e.value) for e in entries.values() if isinstance(e.value, dict)]

    async def run(self) -> None:
        """Follow Gateways and the deployer's objects; reconcile on every change (and every
        ``resync_s``) with the latest state offered, one pass at a time, until cancelled."""
        self._loop = asyncio.get_running_loop()
        self.stopping.clear()
        informers = [Informer(self, kind) for kind in _KINDS.values()]
        for informer in informers:
            informer.start()
        backoff = self.backoff_initial_s
        try:
            while True:
                try:
                    # Not wait_for: on 3.11 it can swallow a cancellation that arrives as
                    # the event is set, and this loop would never end.
                    async with asyncio.timeout(self.settings.resync_s):
                        await self._wake.wait()
                except TimeoutError:
                    # A resync reads the parameters ConfigMaps and the others' objects again.
                    self._params.clear()
                    self._foreign.clear()
                self._wake.clear()
                state = self._state
                if state is None or not self.synced or not self.leads():
                    continue  # woken again by the change (or the leadership) it waits for
                if self._new_term:
                    self._new_term = False
                    self._params.clear()
                    self._foreign.clear()
                report = await asyncio.to_thread(self.reconcile, state, self._l7)
                if report.again_in_s is not None:
                    self._loop.call_later(report.again_in_s, self._wake.set)
                if report.errors:
                    # Try again soon, more slowly each time; a change comes in sooner.
                    self._loop.call_later(backoff, self._wake.set)
                    backoff = min(self.backoff_max_s, backoff * 2)
                else:
                    backoff = self.backoff_initial_s
        finally:
            self.stopping.set()
            for informer in informers:
                informer.interrupt()
            deadline = time.monotonic() + self.stop_timeout_s
            stuck = [i.thread.name for i in informers if not i.stop(deadline)]
            if stuck:
                self.log.warning("waypoint deployer: threads still stopping: %s", ", ".join(stuck))
            self._loop = None

    # -- the informers' sink (their threads) ------------------------------------------------

    def replace_kind(self, kind: Kind, entries: dict[Key, Entry]) -> None:
        with self._lock:
            self._stores[kind.name] = entries
            self._synced.add(kind.name)
            # A fresh list: the truth, whatever we wrote (at worst one write is repeated).
            self._pending = {k: e for k, e in self._pending.items() if k[0] != kind.name}
        self._changed()

    def put_object(self, kind: Kind, key: Key, entry: Entry) -> None:
        with self._lock:
            old = self._stores[kind.name].get(key)
            self._stores[kind.name][key] = entry
            mine = self._pending.get((kind.name, key))
            if mine is not None and mine.rv == entry.rv:
                del self._pending[(kind.name, key)]  # the watch has caught up with our write
        if old is None or old.value != entry.value:
            self._changed()

    def remove_object(self, kind: Kind, key: Key) -> None:
        with self._lock:
            gone = self._stores[kind.name].pop(key, None)
            self._pending.pop((kind.name, key), None)
        if gone is not None:
            self._changed()

    def _leadership(self, leading: bool) -> None:
        # A new term: read the parameters and the others' objects again, as on a resync
        # (what we remember may be older than what another leader saw).
        self._new_term = self._new_term or leading
        self._changed()

    def _changed(self) -> None:
        loop = self._loop
        if loop is not None and not self.stopping.is_set():
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self._wake.set)

    # -- one pass --------------------------------------------------------------------------

    def reconcile(self, state: SourceState, l7: L7Result | None = None) -> ReconcileReport:
        """Bring the cluster to what ``state`` asks for: instances, then status. Blocking.

        ``l7`` is meshd's :func:`~controlplane.l7.build.build` of ``state``, if it has one."""
        report = ReconcileReport()
        if not self.synced:
            # Until every list is in, a missing object may only be unseen: decide nothing.
            report.errors.append("not every kind has been listed yet")
            return report
        if not self.leads():
            report.not_leading = True
            return report
        self.passes += 1
        try:
            self._reconcile(state, l7, report)
        except NotLeading as e:
            # The lease is lost mid-pass: the writes stop here, the new leader does the rest.
            report.not_leading = True
            self.log.warning("waypoint deployer: stopped writing: %s", e)
        for line in report.writes:
            self.log.info("waypoint deployer: %s", line)
        for line in report.errors + report.conflicts:
            if line not in self._said:
                self.log.warning("waypoint deployer: %s", line)
        self._said = set(report.errors + report.conflicts)
        return report

    def _reconcile(self, state: SourceState, l7: L7Result | None, report: ReconcileReport) -> None:
        gateways = [g for g in self.objects("Gateway") if is_waypoint(g)]
        # The mesh root in every namespace (istiod's namespace controller): what
        # ztunnel, waypoints and any Istio proxy mount to trust meshd.
        namespaces = {ns.name for ns in state.namespaces} | {
            str(g["metadata"].get("namespace")) for g in gateways
        }
        for namespace in sorted(namespaces - ROOT_CERT_SKIPPED):
            self._ensure_root_cert(namespace, report)
        wanted_keys = set()
        for obj in sorted(
            gateways, key=lambda o: (o["metadata"].get("namespace"), o["metadata"]["name"])
        ):
            try:
                ref = GatewayRef.of(obj, self._replicas(obj, report))
            except (KeyError, TypeError, ValueError) as e:
                report.errors.append(f"Gateway: {e}")
                continue
            wanted_keys.add((ref.namespace, ref.name))
            for desired in instance_objects(ref, self.settings):
                self._ensure(desired, report)
        self._delete_orphans(wanted_keys, gateways, report)
        self._write_statuses(state, l7, gateways, report)

    def _write(
        self, method: str, path: str, body: Any, *, content_type: str = "application/json"
    ) -> Obj:
        """A write only the leader may make: NotLeading, unsent, when this replica does not
        lead (reads need no leadership and go straight to :func:`_request`)."""
        if self.leader is None:
            return _request(self.api_client, method, path, body, content_type=content_type)
        with self.leader.writing():
            return _request(self.api_client, method, path, body, content_type=content_type)

    def _live(self, kind: str, namespace: str, name: str) -> Obj | None:
        key = (_KINDS[kind].name, (namespace, name))
        with self._lock:
            entry = self._pending.get(key) or self._stores[key[0]].get(key[1])
            return (
                dict(entry.value) if entry is not None and isinstance(entry.value, dict) else None
            )

    def _remember(self, kind: str, obj: Obj) -> None:
        """Our own write's answer, until the watch brings that version back: the next pass
        must not repeat the write, nor take an older event for the truth. (Events come in
        order, so once that version is delivered, what the watch says is newer.)"""
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name")))
        entry = Entry(str(meta.get("resourceVersion")), _KINDS[kind].convert(obj))
        name = _KINDS[kind].name
        with self._lock:
            known = self._stores[name].get(key)
            if known is None or known.rv != entry.rv:  # else: a no-op, already watched
                self._pending[(name, key)] = entry

    def _forget(self, kind: str, namespace: str, name: str) -> None:
        name_ = _KINDS[kind].name
        with self._lock:
            self._stores[name_].pop((namespace, name), None)
            self._pending.pop((name_, (namespace, name)), None)

    def _ensure(self, desired: Obj, report: ReconcileReport) -> None:
        kind, meta = desired["kind"], desired["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        where = f"{kind.lower()} {namespace}/{name}"
        api = APIS[kind]
        live = self._live(kind, namespace, name)
        if live is None and (kind, namespace, name) in self._foreign:
            report.conflicts.append(self._foreign[(kind, namespace, name)])
            return
        try:
            if live is None:
                try:
                    created = self._write("POST", api.path(namespace), desired)
                    self._remember(kind, created)
                    report.writes.append(f"created {where}")
                    return
                except ApiException as e:
                    if e.status != 409:
                        raise
                # It exists, and is not (yet) in what we follow: ours only if it says so.
                live = _request(self.api_client, "GET", api.path(namespace, name))
                labels = (live.get("metadata") or {}).get("labels") or {}
                if kind != "ConfigMap" and labels.get(MANAGED) != MANAGED_VALUE:
                    line = (
                        f"{where} exists and is not managed by meshd (no label "
                        f"{MANAGED}={MANAGED_VALUE}); leaving it alone (delete it, or rename "
                        "the Gateway)"
                    )
                    # Not asked again until a resync: it is for someone to change.
                    self._foreign[(kind, namespace, name)] = line
                    report.conflicts.append(line)
                    return
            if covers(_patchable(desired), live):
                return
            patched = self._write(
                "PATCH", api.path(namespace, name), _patchable(desired), content_type=MERGE_PATCH
            )
            self._remember(kind, patched)
            report.writes.append(f"updated {where}")
        except ApiException as e:
            report.errors.append(f"cannot write {where}: {error_reason(e)}")

    def _ensure_root_cert(self, namespace: str, report: ReconcileReport) -> None:
        pem = self.root_cert()
        if pem:
            self._ensure(root_cert_config_map(namespace, pem), report)

    def _replicas(self, gateway: Obj, report: ReconcileReport) -> int | None:
        """Replicas from the Gateway's parameters ConfigMap (read once per generation and
        resync), or None."""
        meta = gateway["metadata"]
        ref = ((gateway.get("spec") or {}).get("infrastructure") or {}).get("parametersRef")
        if not isinstance(ref, Mapping) or ref.get("kind") != "ConfigMap" or ref.get("group"):
            return None
        namespace, name = str(meta.get("namespace")), str(ref.get("name"))
        key = (namespace, name, int(meta.get("generation") or 0))
        if key not in self._params:
            where = f"Gateway {namespace}/{meta['name']}: parameters ConfigMap {name}"
            try:
                cm = _request(self.api_client, "GET", APIS["ConfigMap"].path(namespace, name))
                self._params[key] = replicas_of(cm)
            except ApiException as e:
                report.errors.append(f"{where}: {error_reason(e)}")
                return None
            except (ValueError, yaml.YAMLError) as e:
                report.errors.append(f"{where}: {e}")
                self._params[key] = None
        return self._params[key]

    def _delete_orphans(
        self, wanted: set[tuple[str, str]], gateways: list[Obj], report: ReconcileReport
    ) -> None:
        """Delete what we made for a Gateway that is no longer a waypoint (at once) or that
        is gone (after ``orphan_grace_s``: that is the garbage collector's job first, and a
        ``kubectl delete --cascade=orphan`` takes our owner reference away meanwhile; what
        is left, the GC missed: children made without an owner it could follow)."""
        waypoint_uids = {g["metadata"].get("uid") for g in gateways}
        other_uids = {g["metadata"].get("uid") for g in self.objects("Gateway")} - waypoint_uids
        now = time.monotonic()
        seen = set()
        for kind in CHILD_KINDS:
            for obj in self.objects(kind):
                meta = obj.get("metadata") or {}
                labels = meta.get("labels") or {}
                refs = meta.get("ownerReferences") or ()
                owners = {r.get("uid") for r in refs if r.get("kind") == "Gateway"}
                gateway = labels.get(GATEWAY_NAME)
                if not owners or labels.get(MANAGED) != MANAGED_VALUE or not gateway:
                    continue
                if (meta.get("namespace"), gateway) in wanted:
                    continue
                why = "its Gateway is no longer a waypoint"
                if not owners & other_uids:  # its Gateway is gone, not of another class
                    why = "its Gateway is gone"
                    key = (kind, meta.get("namespace"), meta.get("name"), meta.get("uid"))
                    seen.add(key)
                    since = self._orphans.setdefault(key, now)
                    left = self.settings.orphan_grace_s - (now - since)
                    if left > 0:
                        report.again_in_s = min(report.again_in_s or left, left)
                        continue
                namespace, name = str(meta.get("namespace")), str(meta.get("name"))
                where = f"{kind.lower()} {namespace}/{name}"
                body = {
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "propagationPolicy": "Background",
                    "preconditions": {"uid": meta.get("uid")},
                }
                try:
                    self._write("DELETE", APIS[kind].path(namespace, name), body)
                    report.writes.append(f"deleted {where} ({why})")
                except ApiException as e:
                    if e.status not in (404, 409):  # gone already, or replaced meanwhile
                        report.errors.append(f"cannot delete {where}: {error_reason(e)}")
                self._forget(kind, namespace, name)
        self._orphans = {k: v for k, v in self._orphans.items() if k in seen}

    # -- status ---------------------------------------------------------------------------------

    def _write_statuses(
        self, state: SourceState, l7: L7Result | None, gateways: list[Obj], report: ReconcileReport
    ) -> None:
        addresses = {}
        for gw in gateways:
            meta = gw["metadata"]
            svc = self._live("Service", meta.get("namespace", ""), meta["name"])
            spec = (svc or {}).get("spec") or {}
            ips = [
                ip
                for ip in spec.get("clusterIPs") or [spec.get("clusterIP")]
                if ip and ip != "None"
            ]
            addresses[f"{meta.get('namespace')}/{meta['name']}"] = ips
        # The conditions of the addresses we are about to write, not of the ones the state saw.
        waypoints = tuple(
            replace(w, address=(addresses.get(w.key) or [None])[0]) for w in state.waypoints
        )
        if l7 is None or waypoints != state.waypoints:
            l7 = build(replace(state, waypoints=waypoints))
        computed = {s.key: s for s in l7.statuses}
        now = self._clock()
        for gw in gateways:
            meta = gw["metadata"]
            namespace, name = str(meta.get("namespace")), str(meta["name"])
            status = computed.get(f"Gateway/{namespace}/{name}")
            if status is None:
                try:
                    parse_gateway(gw)
                except InvalidObject as e:
                    status = kube_status.invalid_gateway(
                        namespace, name, int(meta.get("generation") or 0), str(e)
                    )
            if status is None:
                continue  # the state has not seen this Gateway yet: its turn comes
            ips = addresses[f"{namespace}/{name}"]
            self._write_status(
                "Gateway",
                namespace,
                name,
                gw.get("status"),
                functools.partial(_decide_gateway, status, ips, now),
                report,
            )
        for obj in state.l7:
            if obj.kind not in kube_status.ROUTE_KINDS:
                continue
            route_status = computed.get(f"{obj.kind}/{obj.namespace}/{obj.name}")
            self._write_status(
                obj.kind,
                obj.namespace,
                obj.name,
                obj.raw.get("status"),
                functools.partial(_decide_route, route_status, now),
                report,
            )

    def _write_status(
        self,
        kind: str,
        namespace: str,
        name: str,
        known: Mapping[str, Any] | None,
        decide: Callable[[Mapping[str, Any] | None], Obj | None],
        report: ReconcileReport,
    ) -> None:
        """PUT the new status through /status, from a fresh read of the object, only when it
        differs; a 409 (someone wrote in between) reads again and decides again."""
        if decide(known) is None:
            return
        api, where = APIS[kind], f"status of {kind} {namespace}/{name}"
        try:
            for _ in range(STATUS_ATTEMPTS):
                live = _request(self.api_client, "GET", api.path(namespace, name))
                if kind == "Gateway" and not is_waypoint(live):
                    return  # of another class now: its controller's to say
                new = decide(live.get("status"))
                if new is None:
                    return
                live["status"] = new
                try:
                    self._write("PUT", api.path(namespace, name, "status"), live)
                except ApiException as e:
                    if e.status == 409:
                        continue
                    raise
                report.writes.append(f"wrote the {where}")
                return
            report.errors.append(f"cannot write the {where}: it keeps changing (409 Conflict)")
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile: nothing to say
                report.errors.append(f"cannot write the {where}: {error_reason(e)}")


def _decide_gateway(
    computed: ObjectStatus, addresses: list[str], now: str, live: Mapping[str, Any] | None
) -> Obj | None:
    return kube_status.gateway_status(live, computed, addresses, now)


def _decide_route(
    computed: ObjectStatus | None, now: str, live: Mapping[str, Any] | None
) -> Obj | None:
    return kube_status.route_status(live, computed, now)


def _patchable(desired: Obj) -> Obj:
    """The merge patch that sets what we want (kind and apiVersion are the URL's)."""
    return {k: v for k, v in desired.items() if k not in ("kind", "apiVersion")}
