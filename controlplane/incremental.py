"""Incremental translation: the result of :func:`translate`, redoing only what changed.

meshd translates on every change at the source. Redoing 10,000 workloads
because one pod moved was most of an update's latency, so this translator
keeps what it built last time and, given the next state:

* finds the pods, services and policies that changed (by identity first:
  the sources hand back the same object for what did not change);
* redoes those services and policies, and every pod that a changed one
  selected before or selects now, and the changed pods themselves;
* finds selections through label indexes, never by trying every pair.

What it cannot redo locally it redoes whole, still through the indexes: a
change of namespace labels, waypoints, the trust domain, cluster or root
namespace; and any change while two pods share an IP or two services a VIP
(the first in the state wins, so order matters and a full pass settles it).
A state with two objects under one name is handed to :func:`translate`
itself. The tests hold this class to :func:`translate` on random histories.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Generic, TypeVar

from controlplane.state import (
    AuthorizationPolicyInfo,
    EndpointSliceInfo,
    PodInfo,
    ServiceInfo,
    SourceState,
    WaypointInfo,
)
from controlplane.translate import (
    IPAddress,
    Resources,
    build_policy,
    build_service,
    build_workload,
    parse_ip,
    policy_key,
    resolve_waypoint,
    selects,
    service_key,
    service_key_of,
    service_vips,
    translate,
    workload_uid,
)
from mesh.model import Policy, Port, Service, Workload

PodKey = tuple[str, str]  # (namespace, name)
Item = tuple[str, str, str]  # (namespace, label key, label value)
SliceKey = tuple[str, str, str]  # (namespace, service, slice name)

_NO_LABELS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class _Globals:
    """Everything a change of which redoes the whole feed."""

    trust_domain: str
    cluster_id: str
    root_namespace: str
    namespaces: Mapping[str, Mapping[str, str]]
    waypoints: Mapping[tuple[str, str], WaypointInfo]
    rejected: tuple[str, ...]


def _globals(state: SourceState) -> _Globals:
    return _Globals(
        trust_domain=state.trust_domain,
        cluster_id=state.cluster_id,
        root_namespace=state.root_namespace,
        namespaces={ns.name: ns.labels for ns in state.namespaces},
        waypoints={(w.namespace, w.name): w for w in state.waypoints},
        rejected=state.rejected,
    )


K = TypeVar("K")
V = TypeVar("V")
Change = tuple[V | None, V | None]  # (before, after); None: absent


class _Objects(Generic[K, V]):
    """One kind's objects by key, and what changed from one state's tuple to the next.

    The sources hand back the very same object for what did not change, so
    the change is found by identity: which objects are new, which are gone.
    That is set arithmetic in C over ``id()``s, not a Python loop comparing
    10,000 pairs. (The ids cannot be reused: this class holds the objects.)
    """

    def __init__(self, key: Callable[[V], K]) -> None:
        self.key = key
        self.by_key: dict[K, V] = {}
        self._by_id: dict[int, V] = {}
        self._seq: tuple[V, ...] = ()

    def load(self, seq: tuple[V, ...]) -> bool:
        """Take ``seq`` whole; False when two of its objects share a key."""
        self._seq = seq
        self.by_key.clear()  # in place: the translator holds this dict
        self.by_key.update((self.key(o), o) for o in seq)
        self._by_id = {id(o): o for o in seq}
        return len(self.by_key) == len(seq)

    def update(self, seq: tuple[V, ...]) -> dict[K, Change[V]] | None:
        """Move to ``seq``; the keys whose value changed, or None when keys collide."""
        if seq is self._seq:
            return {}
        self._seq = seq
        ids = set(map(id, seq))
        gone = self._by_id.keys() - ids
        new = ids.difference(self._by_id)
        touched: dict[K, Change[V]] = {}
        for i in gone:
            obj = self._by_id.pop(i)
            touched[self.key(obj)] = (obj, None)
        for obj in (o for o in seq if id(o) in new) if new else ():
            self._by_id[id(obj)] = obj
            key = self.key(obj)
            touched[key] = (touched.get(key, (None, None))[0], obj)
        changes: dict[K, Change[V]] = {}
        for key, (before, after) in touched.items():
            if after is None:
                self.by_key.pop(key, None)
            else:
                self.by_key[key] = after
            if before != after:
                changes[key] = (before, after)
        if len(self.by_key) != len(seq) or len(self._by_id) != len(seq):
            return None
        return changes


def _index_item(selector: Mapping[str, str], namespace: str) -> Item:
    key, value = min(selector.items())
    return (namespace, key, value)


class IncrementalTranslator:
    """Gives ``translate(state)`` for each state in turn, redoing only what changed."""

    def __init__(self) -> None:
        self.full_passes = 0
        self.partial_passes = 0
        self._reset()

    def _reset(self) -> None:
        self._state: SourceState | None = None
        self._globals: _Globals | None = None
        self._pod_objects: _Objects[PodKey, PodInfo] = _Objects(lambda p: (p.namespace, p.name))
        self._service_objects: _Objects[str, ServiceInfo] = _Objects(service_key)
        self._policy_objects: _Objects[str, AuthorizationPolicyInfo] = _Objects(policy_key)
        self._pods = self._pod_objects.by_key
        self._services = self._service_objects.by_key
        self._policies = self._policy_objects.by_key
        self._slice_objects: _Objects[SliceKey, EndpointSliceInfo] = _Objects(
            lambda e: (e.namespace, e.service, e.name)
        )
        self._slices = self._slice_objects.by_key
        self._slices_by_service: dict[str, set[SliceKey]] = {}
        # Accepted services without a selector: the addresses their slices list, indexed.
        self._endpoints: dict[str, frozenset[str]] = {}
        self._endpoint_index: dict[tuple[str, str], set[str]] = {}
        # Pods by every (namespace, label, value) they carry.
        self._pod_index: dict[Item, set[PodKey]] = {}
        # Accepted selecting services and selector policies, by one selector item.
        self._service_index: dict[Item, set[str]] = {}
        self._policy_index: dict[Item, set[str]] = {}
        self._ip_users: dict[str, set[PodKey]] = {}
        self._vip_users: dict[IPAddress, set[str]] = {}
        self._clash = False
        # Output, and the refusal lines of each object.
        self._workloads: dict[str, Workload] = {}
        self._service_out: dict[str, Service] = {}
        self._policy_out: dict[str, Policy] = {}
        self._pod_lines: dict[PodKey, tuple[str, ...]] = {}
        self._service_lines: dict[str, tuple[str, ...]] = {}
        self._result = Resources()

    # ------------------------------------------------------------ entry point

    def translate(self, state: SourceState) -> Resources:
        if state is self._state:
            return self._result
        glob = _globals(state)
        if glob == self._globals:
            pods = self._pod_objects.update(state.pods)
            services = self._service_objects.update(state.services)
            policies = self._policy_objects.update(state.policies)
            slices = self._slice_objects.update(state.endpoint_slices)
            if (
                pods is not None
                and services is not None
                and policies is not None
                and slices is not None
                and self._partial(state, pods, services, policies, slices)
            ):
                return self._result
        return self._full(state, glob)

    # ------------------------------------------------------------- full pass

    def _full(self, state: SourceState, glob: _Globals) -> Resources:
        self._reset()
        self.full_passes += 1
        if not (
            self._pod_objects.load(state.pods)
            and self._service_objects.load(state.services)
            and self._policy_objects.load(state.policies)
            and self._slice_objects.load(state.endpoint_slices)
        ):
            # Two objects under one name: which one wins is order-dependent
            # in ways not worth tracking; the specification decides.
            self._reset()
            return translate(state)
        self._state, self._globals = state, glob
        pods, services, policies = self._pods, self._services, self._policies
        for slice_key in self._slices:
            self._slices_by_service.setdefault(service_key_of(*slice_key[:2]), set()).add(slice_key)
        vip_owner: dict[IPAddress, str] = {}
        for key, info in services.items():  # state order: the first VIP owner wins
            vips = service_vips(info)
            if not isinstance(vips, str):
                for vip in vips:
                    self._vip_users.setdefault(vip, set()).add(key)
                clash = next((vip_owner[v] for v in vips if v in vip_owner), None)
                if clash is not None:
                    self._clash = True
                    self._service_lines[key] = (
                        f"service {info.namespace}/{info.name}: VIP already used by {clash}",
                    )
                    continue
                for vip in vips:
                    vip_owner[vip] = f"{info.namespace}/{info.name}"
            self._put_service(key, info, vips)
        for key, policy in policies.items():
            self._put_policy(key, policy)
        for pk, pod in pods.items():
            self._index_pod(pk, pod)
        ip_owner: dict[str, str] = {}
        for pk, pod in pods.items():  # state order: the first IP owner wins
            where = f"pod {pod.namespace}/{pod.name}"
            if pod.ip and parse_ip(pod.ip) is not None:
                if pod.ip in ip_owner:
                    self._clash = True
                    self._pod_lines[pk] = (
                        f"{where}: IP {pod.ip} already used by {ip_owner[pod.ip]}",
                    )
                    continue
                ip_owner[pod.ip] = where
            self._build_pod(pk, pod)
        return self._publish()

    # ---------------------------------------------------------- partial pass

    def _partial(
        self,
        state: SourceState,
        pods: dict[PodKey, Change[PodInfo]],
        services: dict[str, Change[ServiceInfo]],
        policies: dict[str, Change[AuthorizationPolicyInfo]],
        slices: dict[SliceKey, Change[EndpointSliceInfo]],
    ) -> bool:
        """Redo what changed; False when a full pass must (the full pass starts afresh)."""
        if self._clash:
            return False  # who lost a clash depends on order: settle it whole
        # Would the change give an address two owners? Then order decides too.
        claimed: set[str] = set()
        for pk, (_, new) in pods.items():
            if new is None or not new.ip:
                continue
            if new.ip in claimed or self._ip_users.get(new.ip, set()) - {pk}:
                return False
            claimed.add(new.ip)
        new_vips: dict[str, tuple[IPAddress, ...] | str] = {}
        claimed_vips: set[IPAddress] = set()
        for key, (_, info) in services.items():
            if info is None:
                continue
            vips = new_vips[key] = service_vips(info)
            if isinstance(vips, str):
                continue
            for vip in set(vips):
                if vip in claimed_vips or self._vip_users.get(vip, set()) - {key}:
                    return False
                claimed_vips.add(vip)
        self.partial_passes += 1
        self._state = state
        dirty: set[PodKey] = set(pods)
        for pk, (old, new) in pods.items():
            if old is not None:
                self._unindex_pod(pk, old)
            if new is not None:
                self._index_pod(pk, new)
        sliced: set[str] = set()  # services whose EndpointSlices changed
        for slice_key, (_, new_slice) in slices.items():
            key = service_key_of(*slice_key[:2])
            sliced.add(key)
            members = self._slices_by_service.setdefault(key, set())
            if new_slice is None:
                members.discard(slice_key)
            else:
                members.add(slice_key)
            if not members:
                del self._slices_by_service[key]
        for key, (old_svc, info) in services.items():
            if old_svc is not None:
                dirty.update(self._service_pods(key, old_svc))
                self._drop_service(key, old_svc)
            if info is not None:
                self._put_service(key, info, new_vips[key])
                dirty.update(self._service_pods(key, info))
        for key in sliced - services.keys():
            info = self._services.get(key)
            if info is not None and key in self._endpoints:
                dirty.update(self._service_pods(key, info))
                self._unindex_endpoints(key, info.namespace)
                self._index_endpoints(key, info)
                dirty.update(self._service_pods(key, info))
        for key, (old_pol, policy) in policies.items():
            if old_pol is not None:
                dirty.update(self._selected(old_pol.selector or {}, old_pol.namespace))
                self._drop_policy(key, old_pol)
            if policy is not None:
                self._put_policy(key, policy)
                dirty.update(self._selected(policy.selector or {}, policy.namespace))
        for pk in dirty:
            self._drop_pod(pk)
            if (pod := self._pods.get(pk)) is not None:
                self._build_pod(pk, pod)
        self._publish()
        return True

    # -------------------------------------------------------------- services

    def _put_service(self, key: str, info: ServiceInfo, vips: tuple[IPAddress, ...] | str) -> None:
        assert self._globals is not None
        if isinstance(vips, str):
            self._service_lines[key] = (vips,)
            return
        for vip in vips:
            self._vip_users.setdefault(vip, set()).add(key)
        waypoint, error = resolve_waypoint(
            "service",
            f"service {key}",
            info.namespace,
            info.labels,
            self._globals.namespaces,
            self._globals.waypoints,
        )
        if error:
            self._service_lines[key] = (error,)
        self._service_out[key] = build_service(info, vips, waypoint)
        if info.selector:
            item = _index_item(info.selector, info.namespace)
            self._service_index.setdefault(item, set()).add(key)
        else:
            self._index_endpoints(key, info)

    def _drop_service(self, key: str, info: ServiceInfo) -> None:
        self._service_lines.pop(key, None)
        if self._service_out.pop(key, None) is not None:
            if info.selector:
                item = _index_item(info.selector, info.namespace)
                self._discard(self._service_index, item, key)
            else:
                self._unindex_endpoints(key, info.namespace)
        vips = service_vips(info)
        if not isinstance(vips, str):
            for vip in vips:
                self._discard(self._vip_users, vip, key)

    def _service_pods(self, key: str, info: ServiceInfo) -> Iterable[PodKey]:
        """The pods an accepted service has as endpoints now; none if it is not accepted."""
        if key not in self._service_out:
            return ()
        if info.selector:
            return self._selected(info.selector, info.namespace)
        return [
            pk
            for address in self._endpoints.get(key, ())
            for pk in self._ip_users.get(address, ())
            if pk[0] == info.namespace
        ]

    def _index_endpoints(self, key: str, info: ServiceInfo) -> None:
        addresses = frozenset(
            a for s in self._slices_by_service.get(key, ()) for a in self._slices[s].addresses
        )
        self._endpoints[key] = addresses
        for address in addresses:
            self._endpoint_index.setdefault((info.namespace, address), set()).add(key)

    def _unindex_endpoints(self, key: str, namespace: str) -> None:
        for address in self._endpoints.pop(key, ()):
            self._discard(self._endpoint_index, (namespace, address), key)

    # -------------------------------------------------------------- policies

    def _put_policy(self, key: str, policy: AuthorizationPolicyInfo) -> None:
        assert self._globals is not None
        self._policy_out[key] = build_policy(policy, self._globals.root_namespace)
        if policy.selector:
            item = _index_item(policy.selector, policy.namespace)
            self._policy_index.setdefault(item, set()).add(key)

    def _drop_policy(self, key: str, policy: AuthorizationPolicyInfo) -> None:
        self._policy_out.pop(key, None)
        if policy.selector:
            self._discard(self._policy_index, _index_item(policy.selector, policy.namespace), key)

    # ------------------------------------------------------------------ pods

    def _index_pod(self, pk: PodKey, pod: PodInfo) -> None:
        for k, v in pod.labels.items():
            self._pod_index.setdefault((pod.namespace, k, v), set()).add(pk)
        if pod.ip:
            self._ip_users.setdefault(pod.ip, set()).add(pk)

    def _unindex_pod(self, pk: PodKey, pod: PodInfo) -> None:
        for k, v in pod.labels.items():
            self._discard(self._pod_index, (pod.namespace, k, v), pk)
        if pod.ip:
            self._discard(self._ip_users, pod.ip, pk)

    def _selected(self, selector: Mapping[str, str], namespace: str) -> Iterable[PodKey]:
        """Pods ``selector`` selects now (by their current labels)."""
        if not selector:
            return ()
        candidates = self._pod_index.get(_index_item(selector, namespace), ())
        return [pk for pk in candidates if selects(selector, self._pods[pk].labels)]

    def _drop_pod(self, pk: PodKey) -> None:
        assert self._globals is not None
        self._pod_lines.pop(pk, None)
        self._workloads.pop(workload_uid(self._globals.cluster_id, *pk), None)

    def _build_pod(self, pk: PodKey, pod: PodInfo) -> None:
        """The workload for ``pod`` (whose IP, if any, is known to be its own)."""
        glob, state = self._globals, self._state
        assert glob is not None and state is not None
        if not pod.ip:
            return
        where = f"pod {pod.namespace}/{pod.name}"
        ip = parse_ip(pod.ip)
        if ip is None:
            self._pod_lines[pk] = (f"{where}: {pod.ip!r} is not an IP address",)
            return
        ns_labels = glob.namespaces.get(pod.namespace, _NO_LABELS)
        backing: dict[str, tuple[Port, ...]] = {}
        selected_by: list[str] = []
        for k, v in pod.labels.items():
            item = (pod.namespace, k, v)
            for key in self._service_index.get(item, ()):
                if selects(self._services[key].selector, pod.labels):
                    service = self._service_out[key]
                    backing[service.resource_name] = service.ports
            for key in self._policy_index.get(item, ()):
                if selects(self._policies[key].selector or {}, pod.labels):
                    selected_by.append(key)
        for key in self._endpoint_index.get((pod.namespace, pod.ip), ()):
            service = self._service_out[key]
            backing[service.resource_name] = service.ports
        waypoint, error = resolve_waypoint(
            "workload", where, pod.namespace, pod.labels, glob.namespaces, glob.waypoints
        )
        if error:
            self._pod_lines[pk] = (error,)
        workload = build_workload(
            state, pod, ip, ns_labels, backing, tuple(sorted(selected_by)), waypoint
        )
        self._workloads[workload.uid] = workload

    # ---------------------------------------------------------------- output

    def _publish(self) -> Resources:
        assert self._state is not None
        rejected = set(self._state.rejected)
        for lines in self._service_lines.values():
            rejected.update(lines)
        for lines in self._pod_lines.values():
            rejected.update(lines)
        self._result = Resources(
            workloads=MappingProxyType(dict(self._workloads)),
            services=MappingProxyType(dict(self._service_out)),
            policies=MappingProxyType(dict(self._policy_out)),
            rejected=tuple(sorted(rejected)),
        )
        return self._result

    @staticmethod
    def _discard(index: dict, key: object, member: object) -> None:  # type: ignore[type-arg]
        members = index.get(key)
        if members is not None:
            members.discard(member)
            if not members:
                del index[key]
